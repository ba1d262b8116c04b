"""Portable counter-based generator for random outer matrices (generator version 1).

The matrix is a pure function of (seed, module name, role, shape, version), computed
with 64-bit integer arithmetic only, so it is bit-identical on every platform,
numpy/torch version and device. docs/CONTAINER.md ("Random outer generator") is the
normative spec; the golden vectors in tests/test_rng.py pin it.

Per element (row-major counter c = i*cols + j):
    z  = key + (c + 1) * 0x9E3779B97F4A7C15          (mod 2**64)
    z  = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9        (SplitMix64 finaliser)
    z  = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z  =  z ^ (z >> 31)
    m  = z >> 40                                     (top 24 bits)
    x  = (2*m + 1 - 2**24) / 2**24                   (exact in float32, in (-1, 1))
"""
from __future__ import annotations

import hashlib

import numpy as np

GENERATOR_VERSION = 1
GENERATOR_NAME = "splitmix64-dyadic24"
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_CHUNK = 1 << 16  # elements per block: 0.5 MB uint64 temporaries, cache-resident (1 << 20 was 2.6x slower)


def derive_key(seed: int, module: str, role: str, rows: int, cols: int) -> int:
    """64-bit stream key: first 8 bytes (little-endian) of SHA-256 of the identity string."""
    ident = f"lora-mini-rng/v{GENERATOR_VERSION}\0{int(seed)}\0{module}\0{role}\0{rows}x{cols}"
    return int.from_bytes(hashlib.sha256(ident.encode("utf-8")).digest()[:8], "little")


def _mix(counter: np.ndarray, key: np.uint64) -> np.ndarray:
    z = key + (counter + np.uint64(1)) * _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def uniform_stream(key: int, count: int) -> np.ndarray:
    """`count` float32 values in (-1, 1), each an odd multiple of 2**-24."""
    out = np.empty(count, dtype=np.float32)
    k = np.uint64(key)
    with np.errstate(over="ignore"):
        for start in range(0, count, _CHUNK):
            stop = min(count, start + _CHUNK)
            z = _mix(np.arange(start, stop, dtype=np.uint64), k)
            m = (z >> np.uint64(40)).astype(np.int64)
            out[start:stop] = (2 * m + 1 - (1 << 24)).astype(np.float32) * np.float32(2.0**-24)
    return out


def random_matrix(seed: int, module: str, role: str, rows: int, cols: int) -> np.ndarray:
    """The outer matrix `role` ("U" or "V") of `module`, shape (rows, cols), float32."""
    key = derive_key(seed, module, role, rows, cols)
    return uniform_stream(key, rows * cols).reshape(rows, cols)


def subset_matrix(seed: int, module: str, role: str, rows: int, cols: int) -> np.ndarray:
    """The coordinate-subset outer `role` of `module`, shape (rows, cols), float32: m = min(rows,
    cols) distinct coordinates of the long side, the first m positions of the stable ascending
    order of uniform_stream(derive_key(...), max(rows, cols)) (ties: the lower position first);
    a tall matrix (U, out×a) has a 1 at (coordinate j, j), a wide one (V, b×in) at (j, coordinate j)."""
    n, m = max(rows, cols), min(rows, cols)
    picked = np.argsort(uniform_stream(derive_key(seed, module, role, rows, cols), n), kind="stable")[:m]
    out = np.zeros((rows, cols), dtype=np.float32)
    if rows >= cols:
        out[picked, np.arange(m)] = 1.0
    else:
        out[np.arange(m), picked] = 1.0
    return out


def fingerprint(matrix: np.ndarray) -> str:
    """SHA-256 hex of the matrix as contiguous little-endian float32, row-major."""
    data = np.ascontiguousarray(matrix, dtype="<f4")
    return hashlib.sha256(data.tobytes()).hexdigest()
