"""Grouped quantization of factor matrices: symmetric integers, or the NF4 codebook
(docs/CONTAINER.md, "Quantized factors", is the normative spec; tests/test_quant.py pins it with
golden vectors).

Pure functions on numpy arrays; the math is float64 and every step is exact or specified
bit-exactly, so any reader recovers the same float32 values on any platform.

A matrix (rows × cols) is cut into *vectors* along its long side: its columns when
rows >= cols, else its rows. Each vector is split into groups of `group` consecutive
elements (the last one may be shorter). Per group, with qmax = 2^(bits-1) - 1:

    scale = fp16(c · max|x| / qmax)             (round to nearest even; float64 division)
    q     = clamp(round_half_even(x / scale), -qmax, qmax)      (0 where scale == 0)
    value = q · scale                            (exact in float32)

with c = 1, except that 2-4 bit groups take whichever of c = 1, 7/8, 3/4, 5/8 decodes nearest
to their values (CLIP_RATIOS; a reader only multiplies, so this binds the writer alone).

Codes are stored offset-binary, u = q + 2^(bits-1) in [1, 2^bits - 1], packed LSB-first into a
bit stream. bits == 16 stores the matrix as float16 row-major instead (no scales).

A codebook width (bits = "nf4": QLoRA's NormalFloat4 levels c_0 < ... < c_15, c_0 = -1,
c_15 = 1) groups the same way with scale = fp16(max|x|); a value's code is the index u of the
level nearest to x / scale (ties to the lower index), 4-bit packed as above, and it decodes to
float32(c_u · scale). The width is a string so that readers that know only integer widths
refuse it instead of decoding its codes as integers.
"""
from __future__ import annotations

import math

import numpy as np

BITS = (2, 3, 4, 8, 16)  # integer widths a file may use; 16 = plain float16, no scales
NF4 = "nf4"
# Non-uniform 4-bit codebooks, by the name a file gives as its width: 16 float32 levels, sorted.
# NF4: QLoRA's NormalFloat4 (Dettmers et al. 2023), the levels bitsandbytes ships; written
# exactly (float32 bit patterns) in docs/CONTAINER.md.
CODEBOOKS = {NF4: np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                            -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                            0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                            0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                            0.7229568362236023, 1.0], dtype=np.float32)}
CODEBOOK_BITS = 4  # bits per code of every codebook (16 levels)
WIDTHS = (2, 3, 4, NF4, 8, 16)  # every width a file may use, by increasing size
# 128 values per fp16 scale: at 3-4 bits the scales of groups of 64 take 6-8% of the bytes, and
# byte budgets kept more effect with 128 at 12 of 14 measured points, the same at the other two
# (benchmarks/README.md, "Values per scale")
DEFAULT_GROUP = 128
MAX_GROUP = 1 << 16
FP16_MAX = 65504.0


def check_bits(bits) -> int | str:
    """`bits` when it is a width a file may use: an integer of BITS or a codebook name."""
    if not (type(bits) is int and bits in BITS) and not (type(bits) is str and bits in CODEBOOKS):
        raise ValueError(f"bits must be one of {', '.join(map(str, WIDTHS))}, got {bits!r}")
    return bits


def is_codebook(bits) -> bool:
    return type(bits) is str


def code_bits(bits) -> int:
    """Bits one stored code of this width takes (16: a float16 value)."""
    return CODEBOOK_BITS if is_codebook(bits) else bits


def width_key(bits) -> tuple[int, int]:
    """Sort key of widths: by code bits, a codebook after the integers of its size."""
    return code_bits(bits), int(is_codebook(bits))


def width_name(bits) -> str:
    """How reports name a width: "int4", "nf4", "fp16"."""
    return bits if is_codebook(bits) else "fp16" if bits == 16 else f"int{bits}"


def _midpoints(name: str) -> np.ndarray:
    """The 15 decision points of a codebook, (c_i + c_{i+1}) / 2: exact in float64."""
    c = CODEBOOKS[name].astype(np.float64)
    return (c[:-1] + c[1:]) / 2


_MIDPOINTS = {name: _midpoints(name) for name in CODEBOOKS}


def codebook_midpoints(name: str) -> np.ndarray:
    """The decision points of codebook `name` (float64): a value's level is the number of them
    strictly below it. Shared, do not modify."""
    return _MIDPOINTS[name]


def codebook_codes(t: np.ndarray, name: str) -> np.ndarray:
    """Index of the level nearest to each t (float64, already divided by its scale): the number
    of midpoints below t, so that a tie goes to the lower index. (Fifteen vectorised comparisons
    run several times faster than a binary search per element, and faster than a table of bins
    whose lookups gather.)"""
    u = np.zeros(np.shape(t), dtype=np.int8)
    for m in _MIDPOINTS[name]:
        u += t > m
    return u


def codebook_levels(name: str) -> np.ndarray:
    """The levels of codebook `name` as float64 (exact). Shared, do not modify."""
    return _LEVELS[name]


_LEVELS = {name: c.astype(np.float64) for name, c in CODEBOOKS.items()}


def codebook_values(codes: np.ndarray, scales: np.ndarray, name: str) -> np.ndarray:
    """float32(c_u · scale), float64 scales broadcast against the codes: the product is exact
    in float64 and rounded once, to nearest even."""
    return (_LEVELS[name].take(codes) * scales).astype(np.float32)


def check_group(group) -> int:
    if type(group) is not int or not 1 <= group <= MAX_GROUP:
        raise ValueError(f"group must be an integer in [1, {MAX_GROUP}], got {group!r}")
    return group


def qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def _vectors(M: np.ndarray) -> np.ndarray:
    """The matrix as a (vectors × long side) view: columns when rows >= cols, else rows."""
    return M.T if M.shape[0] >= M.shape[1] else M


def _from_vectors(T: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return T.T if shape[0] >= shape[1] else T


def n_groups(shape: tuple[int, int], group: int) -> int:
    """Number of scales of a rows × cols matrix."""
    rows, cols = shape
    long, short = max(rows, cols), min(rows, cols)
    return short * -(-long // group) if long else 0


def nbytes(shape: tuple[int, int], bits: int | str, group: int) -> int:
    """Bytes of one encoded factor: its fp16 scales, then its packed codes (whole bytes)."""
    count = shape[0] * shape[1]
    if bits == 16:
        return 2 * count
    return 2 * n_groups(shape, group) + -(-count * code_bits(bits) // 8)


def top_level(bits) -> float:
    """The code value a group's largest |x| maps to: qmax, or a codebook's largest level (1)."""
    return 1.0 if is_codebook(bits) else float(qmax(bits))


def group_scales(maxabs: np.ndarray, bits: int | str) -> np.ndarray:
    """fp16 scales of groups whose largest |x| is `maxabs` (float64): fp16(maxabs / qmax)
    (codebooks: fp16(maxabs))."""
    top = top_level(bits)
    if not np.isfinite(maxabs).all():
        raise ValueError("cannot quantize non-finite values")
    if (maxabs / top > FP16_MAX).any():
        raise ValueError(f"values up to {maxabs.max():.3g} overflow the float16 scales")
    return (maxabs / top).astype(np.float16)


# Integer widths of up to CLIP_BITS bits pick each group's scale among CLIP_RATIOS · max|x| / qmax:
# the one whose decoded group lies nearest the values (least squared error, ties to the larger
# scale). The factors of a truncated SVD are bell-shaped within a group, and letting its few
# largest values clamp loses markedly less at 3 bits (benchmarks/README.md). Encoding decoded
# values again gives them back: ratio 1 reproduces them exactly, any smaller one clamps the largest.
CLIP_BITS = 4
CLIP_RATIOS = (1.0, 0.875, 0.75, 0.625)


def clipped(bits) -> bool:
    """Whether groups of this width choose their scale among CLIP_RATIOS."""
    return not is_codebook(bits) and bits <= CLIP_BITS


def scales_for(G: np.ndarray, bits: int | str, maxabs: np.ndarray | None = None) -> np.ndarray:
    """fp16 scales (vectors × groups) of groups G (vectors × groups × group, float64, zero-padded)
    as the spec chooses them; `maxabs`: each group's largest |x| if the caller has it. Every
    implementation of the rounding (the plan's, quantization-aware training's) takes its scales
    from here, so that they agree with the writer bit for bit."""
    if maxabs is None:
        maxabs = np.abs(G).max(axis=2) if G.size else np.zeros(G.shape[:2])
    best = group_scales(maxabs, bits)  # ratio 1 (and the checks every scale needs)
    if not clipped(bits) or not G.size:
        return best
    top = qmax(bits)
    ratios = np.array(CLIP_RATIOS)[:, None, None]
    cands = (maxabs * ratios / top).astype(np.float16)  # candidates × vectors × groups
    # compared in float32: the choice needs no more precision, and all candidates at once run
    # several times faster than one at a time
    G32 = G.astype(np.float32)
    s = cands.astype(np.float32)
    q = G32 / np.where(s > 0, s, 1)[..., None]  # a zero scale: its values all round to 0 either way
    np.rint(q, out=q)
    np.clip(q, -top, top, out=q)
    # Σ(qs − x)² less Σx² (the same for every candidate); argmin takes the first, largest, of ties
    err = s * (s * np.einsum("cijk,cijk->cij", q, q) - 2 * np.einsum("cijk,ijk->cij", q, G32))
    return np.take_along_axis(cands, err.argmin(axis=0)[None], 0)[0]


def round_codes(x: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """Codes (float64) of values x with their groups' scales (float64, broadcast against x):
    round half to even, clamped to ±qmax; 0 where the scale is 0."""
    top = qmax(bits)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scales > 0, np.rint(x / np.where(scales > 0, scales, 1.0)), 0.0)
    return np.clip(q, -top, top)


class GroupQuantizer:
    """The spec's rounding, one group at a time, for callers that choose values group by group
    (error-feedback rounding, lora_convert.whiten): `scales(block)` of a rows×g block whose rows
    are vectors (float64 values of the fp16 scales, one per row) and `round(x, scales)`, the
    decoded values. A wide matrix (rows < cols) processed this way in groups of `group` columns
    encodes to exactly these values (its vectors are its rows)."""

    def __init__(self, bits: int | str, group: int = DEFAULT_GROUP):
        self.bits, self.group = check_bits(bits), check_group(group)
        if bits == 16:
            raise ValueError("bits 16 is float16 storage, not quantized")
        self.qmax = 1.0 if is_codebook(bits) else qmax(bits)  # the largest code (level) magnitude, in scales

    def scales(self, block: np.ndarray) -> np.ndarray:
        return scales_for(np.asarray(block, dtype=np.float64)[:, None, :], self.bits)[:, 0].astype(np.float64)

    def round(self, x: np.ndarray, scales: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if is_codebook(self.bits):
            t = np.divide(x, scales, out=np.zeros(np.broadcast(x, scales).shape), where=scales > 0)
            return codebook_values(codebook_codes(t, self.bits), scales, self.bits).astype(np.float64)
        return round_codes(x, scales, self.bits) * scales


def quantize(M: np.ndarray, bits: int | str, group: int,
             scales: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(codes q as int8 in the matrix's vector order (vectors × long side), scales as float16
    (vectors × groups per vector)). M is read as float64; it must be finite. A codebook's codes
    are its level indices u (0-15). `scales`: the float16 scales scales_for chose for these very
    values before (a plan keeps them), used instead of choosing them again."""
    check_bits(bits)
    if bits == 16:
        raise ValueError("bits 16 is float16 storage, not quantized")
    T = np.asarray(_vectors(np.asarray(M, dtype=np.float64)))
    S, L = T.shape
    ng = -(-L // group)
    pad = np.zeros((S, ng * group))
    pad[:, :L] = T
    G = pad.reshape(S, ng, group)
    if scales is None:
        scales = scales_for(G, bits)
    elif scales.shape != (S, ng) or scales.dtype != np.float16:
        raise ValueError(f"scales of shape {scales.shape} ({scales.dtype}) given for {S}×{ng} float16 ones")
    s64 = scales.astype(np.float64)[:, :, None]
    if is_codebook(bits):
        q = codebook_codes(np.divide(G, s64, out=np.zeros_like(G), where=s64 > 0), bits)
    else:
        q = round_codes(G, s64, bits)
    q = q.astype(np.int8).reshape(S, ng * group)[:, :L]
    return np.ascontiguousarray(q), scales


def rounded(M: np.ndarray, bits: int | str, group: int, dtype=np.float32) -> np.ndarray:
    """The float32 matrix a reader decodes from encode(M, bits, group), without packing any
    bytes (the same numbers: each value q·s is exact in float32 and in float64, `dtype`)."""
    return rounded_widths(M, (bits,), group, dtype)[0]


def rounded_widths(M: np.ndarray, widths, group: int, dtype=np.float64) -> list[np.ndarray]:
    """rounded(M, bits, group) for each of `widths`, sharing the grouping and each group's
    largest magnitude between them."""
    M = np.asarray(M, dtype=np.float64)
    for bits in widths:
        check_bits(bits)
    T = _vectors(M)
    S, L = T.shape
    ng = -(-L // group)
    if L % group:
        G = np.zeros((S, ng * group))
        G[:, :L] = T
    else:
        G = np.ascontiguousarray(T)
    G = G.reshape(S, ng, group)
    maxabs = np.abs(G).max(axis=2, keepdims=True) if G.size else np.zeros((S, ng, 1))
    if not np.isfinite(maxabs).all():
        raise ValueError("cannot quantize non-finite values")
    out = []
    for bits in widths:
        if bits == 16:
            if (maxabs > FP16_MAX).any():
                raise ValueError("values overflow float16")
            out.append(M.astype(np.float16).astype(dtype))
            continue
        top = top_level(bits)
        scales = scales_for(G, bits, maxabs[:, :, 0]).astype(np.float64)[:, :, None]
        q = np.divide(G, scales, out=np.zeros_like(G), where=scales > 0)
        if is_codebook(bits):
            vals = codebook_values(codebook_codes(q, bits), scales, bits).reshape(S, ng * group)[:, :L]
            out.append(np.ascontiguousarray(_from_vectors(vals.astype(dtype, copy=False), M.shape)))
            continue
        np.rint(q, out=q)
        np.clip(q, -top, top, out=q)
        q *= scales
        vals = q.reshape(S, ng * group)[:, :L].astype(dtype, copy=False)
        out.append(np.ascontiguousarray(_from_vectors(vals, M.shape)))
    return out


def dequantize(q: np.ndarray, scales: np.ndarray, shape: tuple[int, int], group: int,
               bits: int | str | None = None) -> np.ndarray:
    """The float32 matrix (rows × cols) that codes and scales stand for (`bits`: needed for a
    codebook, whose codes are level indices)."""
    S, L = q.shape
    ng = scales.shape[1]
    if is_codebook(bits):
        full = np.full((S, ng * group), np.searchsorted(CODEBOOKS[bits], 0.0), dtype=np.int8)
        full[:, :L] = q
        vals = codebook_values(full.reshape(S, ng, group), scales.astype(np.float64)[:, :, None], bits)
        return np.ascontiguousarray(_from_vectors(vals.reshape(S, ng * group)[:, :L], shape))
    full = np.zeros((S, ng * group), dtype=np.float32)
    full[:, :L] = q
    vals = (full.reshape(S, ng, group) * scales.astype(np.float32)[:, :, None]).reshape(S, ng * group)[:, :L]
    return np.ascontiguousarray(_from_vectors(vals, shape))


def pack(q: np.ndarray, bits: int | str) -> bytes:
    """Offset-binary codes u = q + 2^(bits-1) (a codebook's: its level indices u = q),
    LSB-first: code i holds stream bits [i·bits, (i+1)·bits), stream bit j is bit (j mod 8) of
    byte j div 8; zero-padded."""
    if is_codebook(bits):
        u, bits = q.reshape(-1).astype(np.uint8), CODEBOOK_BITS
    else:
        u = (q.reshape(-1).astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    if bits == 8:
        return u.tobytes()
    # eight codes fill exactly `bits` bytes (at most 4): build each run of eight as one
    # little-endian 32-bit word, one shift per position (several times faster than a bit stream)
    n = u.size
    runs = np.zeros(-(-n // 8) * 8, dtype=np.uint8)
    runs[:n] = u
    runs = runs.reshape(-1, 8).astype(np.uint32)
    words = runs[:, 0].copy()
    for i in range(1, 8):
        words |= runs[:, i] << np.uint32(i * bits)
    return words.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :bits].tobytes()[:-(-n * bits // 8)]


def unpack(buf: bytes, bits: int | str, count: int) -> np.ndarray:
    """Inverse of pack: `count` int8 codes. Raises ValueError on the unused integer code u = 0
    (every code of a codebook is used)."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    width = code_bits(bits)
    if width == 8:
        u = raw[:count]
    else:
        need = -(-count * width // 8)
        if raw.size < need:
            raise ValueError(f"packed codes are {raw.size} bytes, expected {need}")
        runs = np.zeros((-(-count // 8), 4), dtype=np.uint8)  # each run of eight codes as a 32-bit word
        flat = np.zeros(runs.shape[0] * width, dtype=np.uint8)
        flat[:need] = raw[:need]
        runs[:, :width] = flat.reshape(-1, width)
        words = runs.view("<u4")[:, 0].astype(np.uint32)
        mask = np.uint32((1 << width) - 1)
        u = np.empty((runs.shape[0], 8), dtype=np.uint8)
        for i in range(8):
            u[:, i] = (words >> np.uint32(i * width)) & mask
        u = u.reshape(-1)[:count]
    if is_codebook(bits):
        return u.astype(np.int8)
    if count and not u.all():
        raise ValueError("packed codes hold the unused value 0")
    return (u.astype(np.int16) - (1 << (bits - 1))).astype(np.int8)


def encode(M: np.ndarray, bits: int | str, group: int, scales: np.ndarray | None = None) -> tuple[bytes, np.ndarray]:
    """(bytes of one factor, the float32 matrix a reader decodes from them); `scales`: as
    quantize's."""
    shape = tuple(M.shape)
    if bits == 16:
        M16 = np.asarray(M, dtype=np.float64)
        if not np.isfinite(M16).all() or (np.abs(M16) > FP16_MAX).any():
            raise ValueError("values overflow float16")
        h = M16.astype("<f2")
        return h.tobytes(), h.astype(np.float32)
    q, scales = quantize(M, bits, group, scales)
    return encode_codes(q, scales, shape, bits, group)


def encode_codes(q: np.ndarray, scales: np.ndarray, shape: tuple[int, int], bits: int | str,
                 group: int) -> tuple[bytes, np.ndarray]:
    """encode's result from the codes and float16 scales quantize gave for a matrix of `shape`
    (a planner that rounded the values already keeps them)."""
    return scales.astype("<f2").tobytes() + pack(q, bits), dequantize(q, scales, tuple(shape), group, bits)


def decode(buf: bytes, shape: tuple[int, int], bits: int | str, group: int) -> np.ndarray:
    """The float32 matrix of one encoded factor; `buf` must be exactly nbytes(...) long."""
    if len(buf) != nbytes(shape, bits, group):
        raise ValueError(f"encoded factor is {len(buf)} bytes, expected {nbytes(shape, bits, group)}")
    if bits == 16:
        out = np.frombuffer(buf, dtype="<f2").astype(np.float32).reshape(shape)
        if not np.isfinite(out).all():
            raise ValueError("float16 values are not finite")
        return out
    ng = n_groups(shape, group)
    scales = np.frombuffer(buf[:2 * ng], dtype="<f2").astype(np.float16)
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise ValueError("scales must be finite and non-negative")
    S = min(shape) if ng else 0
    L = max(shape)
    q = unpack(buf[2 * ng:], bits, shape[0] * shape[1]).reshape(S, L) if S else np.zeros((0, L), np.int8)
    return dequantize(q, scales.reshape(S, -1) if S else scales.reshape(0, 0), shape, group, bits)


def encode_many(mats: list[np.ndarray], bits: int | str, group: int,
                scales: list[np.ndarray | None] | None = None) -> tuple[bytes, list[np.ndarray]]:
    """Several factors back to back (a module's blob) and their decoded values; `scales`: each
    factor's, as quantize's (None: chosen here)."""
    parts, values = [], []
    for M, given in zip(mats, scales or [None] * len(mats)):
        raw, val = encode(M, bits, group, given)
        parts.append(raw)
        values.append(val)
    return b"".join(parts), values


def decode_many(buf: bytes, shapes: list[tuple[int, int]], bits: int | str, group: int) -> list[np.ndarray]:
    sizes = [nbytes(s, bits, group) for s in shapes]
    if len(buf) != sum(sizes):
        raise ValueError(f"packed tensor is {len(buf)} bytes, expected {sum(sizes)}")
    out, at = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(decode(buf[at:at + size], shape, bits, group))
        at += size
    return out


def bits_per_value(shapes: list[tuple[int, int]], bits: int | str, group: int) -> float:
    """Average stored bits per matrix element, scales included."""
    count = sum(math.prod(s) for s in shapes)
    return 8 * sum(nbytes(s, bits, group) for s in shapes) / count if count else 0.0
