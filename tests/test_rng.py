"""The random-outer generator is a written spec: golden vectors, a pure-Python reference
implementation of docs/CONTAINER.md, and regeneration in a separate process."""
import hashlib
import subprocess
import sys

import numpy as np
import pytest

from lora_convert.outer.rng import derive_key, fingerprint, random_matrix, subset_matrix, uniform_stream

MASK = (1 << 64) - 1
NAME = "model.layers.0.self_attn.q_proj"


def reference_element(key: int, counter: int) -> int:
    """docs/CONTAINER.md, written with Python integers only: returns 2**24 * value."""
    z = (key + (counter + 1) * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    z ^= z >> 31
    return 2 * (z >> 40) + 1 - (1 << 24)


def test_key_derivation_matches_spec():
    ident = f"lora-mini-rng/v1\0{7}\0{NAME}\0U\0{4}x{3}".encode()
    expected = int.from_bytes(hashlib.sha256(ident).digest()[:8], "little")
    assert derive_key(7, NAME, "U", 4, 3) == expected == 3949986582091677129


def test_golden_vector():
    m = random_matrix(7, NAME, "U", 4, 3)
    assert m.dtype == np.float32 and m.shape == (4, 3)
    assert [int(x) for x in (m.ravel().astype(np.float64) * 2**24)] == [
        9509549, -12520571, 14181313, -11171179, 15796181, 15477115,
        -4165847, -8177475, -7279427, 829033, -13484827, -3249225]


@pytest.mark.parametrize("seed,name,role,rows,cols,digest", [
    (0, "x", "V", 16, 1000, "936f95d584415c7f91cd814f8f6da32bb4a537da556984c6b9d183901e6affb0"),
    (123456789, "lora_unet_down_blocks_0", "U", 320, 64,
     "e04c17cfc740982b887404ea45dd6b5eec80364a87db90aa6d36b1d13c7d492d"),
])
def test_golden_fingerprints(seed, name, role, rows, cols, digest):
    assert fingerprint(random_matrix(seed, name, role, rows, cols)) == digest


def test_subset_outers_golden_vector_and_rule():
    """docs/CONTAINER.md, "Subset outers": the first m positions of the stable ascending order of
    the stream, a 1 at (coordinate, j) in a tall U and at (j, coordinate) in a wide V."""
    U, V = subset_matrix(7, "", "U", 10, 3), subset_matrix(7, "", "V", 2, 9)
    assert U.dtype == V.dtype == np.float32 and U.shape == (10, 3) and V.shape == (2, 9)
    assert np.nonzero(U.T)[1].tolist() == [8, 7, 3] and np.nonzero(V)[1].tolist() == [6, 5]
    for rows, cols in ((40, 7), (5, 33), (6, 6)):
        M = subset_matrix(3, NAME, "U", rows, cols)
        stream = uniform_stream(derive_key(3, NAME, "U", rows, cols), max(rows, cols)).tolist()
        order = sorted(range(max(rows, cols)), key=lambda i: (stream[i], i))[:min(rows, cols)]
        picked = np.nonzero(M.T)[1] if rows >= cols else np.nonzero(M)[1]
        assert picked.tolist() == order and M.sum() == min(rows, cols)
    assert fingerprint(subset_matrix(0, "x", "V", 16, 1000)) == \
        "c80e040ddb3051d93c506c4e42bc76d50cc9cdd9a20214e010b9d1672c11716a"


def test_numpy_implementation_equals_integer_reference():
    key = derive_key(3, "blk", "V", 9, 333)
    fast = uniform_stream(key, 3000).astype(np.float64) * 2**24
    ref = [reference_element(key, c) for c in range(3000)]
    assert fast.astype(np.int64).tolist() == ref


def test_chunk_boundaries_do_not_change_the_stream():
    key = derive_key(1, "big", "U", 1, 1)
    n = (1 << 20) + 17  # crosses the internal chunk size
    full = uniform_stream(key, n)
    ref_tail = [reference_element(key, c) for c in range(n - 40, n)]
    assert (full[-40:].astype(np.float64) * 2**24).astype(np.int64).tolist() == ref_tail


def test_values_are_odd_dyadics_inside_the_open_interval():
    m = random_matrix(5, "m", "U", 64, 64).astype(np.float64) * 2**24
    assert np.all(np.abs(m) < 2**24) and np.all(m % 2 == 1)


def test_distinct_identities_give_distinct_streams():
    base = random_matrix(1, "a", "U", 8, 8)
    for other in (random_matrix(2, "a", "U", 8, 8), random_matrix(1, "b", "U", 8, 8),
                  random_matrix(1, "a", "V", 8, 8), random_matrix(1, "a", "U", 16, 4).reshape(8, 8)):
        assert not np.array_equal(base, other)


def test_regeneration_identical_in_a_separate_process():
    code = ("from lora_convert.outer.rng import random_matrix, fingerprint;"
            f"print(fingerprint(random_matrix(42, {NAME!r}, 'U', 4096, 64)))")
    out = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
           for _ in range(2)]
    assert out[0] == out[1] == fingerprint(random_matrix(42, NAME, "U", 4096, 64))
