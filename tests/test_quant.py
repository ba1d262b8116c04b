"""Quantized factors: the bit-exact encoding (docs/CONTAINER.md, "Quantized factors"), its use
in the container (format version 2), integrity of the packed bytes, old files still read, and
the total regeneration bound."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import lora_convert as lc
from lora_convert import container, containerspec, quant
from lora_convert.cli import main
from lora_convert.errors import BadInputError, IntegrityError
from lora_convert.st import LazyTensors

SRC = "peft-tiny-llama"

# The example of docs/CONTAINER.md: 3×5 (rows < cols: vectors are rows), group 4.
GOLDEN_M = np.array([[0.5, -1.0, 0.25, 0.75, 0.1], [2.0, -0.3, 0.0, 1.5, -2.5], [0, 0, 0, 0, 0]])
GOLDEN = {4: "923050239234b735000000001cdaff871d888808",
          3: "ab3444285539ab3a000000004eff930e4912",
          8: "0820731208240a2500000000c001a0dfffff6d80df018080808080",
          "nf4": "003c662e00400041000000000ceaff750e777707"}
# NF4's levels as float32 bit patterns, as docs/CONTAINER.md writes them
NF4_HEX = ["bf800000", "bf3239b1", "bf066b30", "beca32a0", "be91a24d", "be3d353f", "bdba7871", "00000000",
           "3da2faff", "3e24cae3", "3e7c04dd", "3ead033a", "3ee1a4b8", "3f1007ab", "3f3913b3", "3f800000"]


@pytest.mark.parametrize("bits", list(GOLDEN))
def test_golden_vectors(bits):
    raw, values = quant.encode(GOLDEN_M, bits, 4)
    assert raw.hex() == GOLDEN[bits]
    assert np.array_equal(quant.decode(raw, (3, 5), bits, 4), values)


def test_golden_group_by_hand():
    """Row 0, first group of 4 at 4 bits, from the spec's formulas alone."""
    raw = bytes.fromhex(GOLDEN[4])
    scales = np.frombuffer(raw[:12], dtype="<f2")
    assert scales[0] == np.float16(1.0 / 7)  # max|x| = 1, qmax = 7
    assert scales[1] == np.float16(0.1 / 7)  # the last group of row 0 holds one value
    assert scales[4] == 0 and scales[5] == 0  # the all-zero row
    s = float(scales[0])
    q = [int(np.clip(np.rint(x / s), -7, 7)) for x in GOLDEN_M[0, :4]]
    assert q == [4, -7, 2, 5]
    u = [v + 8 for v in q]  # offset binary, LSB-first: two codes per byte, the first in the low nibble
    assert raw[12] == u[0] | (u[1] << 4) and raw[13] == u[2] | (u[3] << 4)


def test_three_bit_golden_scale_by_hand():
    """3 bits: a group takes the candidate scale c·max|x|/qmax (c = 1, 7/8, 3/4, 5/8) whose decoded
    values lie nearest; row 0's first group clamps its largest value for a finer grid."""
    raw = bytes.fromhex(GOLDEN[3])
    scales = np.frombuffer(raw[:12], dtype="<f2")
    g = GOLDEN_M[0, :4]
    errs = []
    for c in (1, 7 / 8, 3 / 4, 5 / 8):
        s = float(np.float16(c * 1.0 / 3))
        errs.append(float(((np.clip(np.rint(g / s), -3, 3) * s - g) ** 2).sum()))
    assert int(np.argmin(errs)) == 1 and scales[0] == np.float16(7 / 24)
    assert scales[1] == np.float16(0.1 / 3) and scales[2] == np.float16(2.0 / 3)  # c = 1 elsewhere
    q, _ = quant.quantize(GOLDEN_M, 3, 4)
    assert q[0].tolist() == [2, -3, 1, 3, 3]


def test_clipped_scales_beat_the_largest_value_rule_on_bell_shaped_groups():
    M = np.random.default_rng(5).standard_normal((4096, 4))
    for bits in (2, 3, 4):
        T = M.T.reshape(4, -1, 64)
        plain = quant.group_scales(np.abs(T).max(axis=2), bits)
        chosen = quant.scales_for(T, bits)
        assert (chosen <= plain).all() and (chosen < plain).mean() > 0.5
        err = np.linalg.norm(quant.rounded(M, bits, 64, np.float64) - M)
        top = quant.qmax(bits)
        s = plain.astype(np.float64)[:, :, None]
        old = np.clip(np.rint(T / s), -top, top) * s
        assert err < np.linalg.norm(old - T)


def test_nf4_golden_group_by_hand():
    """NF4: scale fp16(max|x|), code = index of the nearest level, level indices packed as 4-bit
    codes are (low nibble first), values float32(level · scale)."""
    raw = bytes.fromhex(GOLDEN["nf4"])
    scales = np.frombuffer(raw[:12], dtype="<f2")
    assert scales.tolist() == [1.0, float(np.float16(0.1)), 2.0, 2.5, 0.0, 0.0]
    levels = quant.CODEBOOKS["nf4"].astype(np.float64)
    # row 0, first group (scale 1): 0.5 is below the midpoint of 0.4407 and 0.5626 -> 12, -1 -> 0,
    # 0.25 -> 0.2461 (10), 0.75 -> 0.7230 (14); its second group 0.1 / fp16(0.1) > 1 -> 15
    codes = [int(np.abs(levels - x).argmin()) for x in GOLDEN_M[0, :4]] + [15]
    assert codes == [12, 0, 10, 14, 15]
    assert raw[12] == codes[0] | (codes[1] << 4) and raw[13] == codes[2] | (codes[3] << 4)
    assert raw[14] & 0xF == 15 and raw[-1] == 0x07  # the zero row is all index 7 (level 0), zero-padded
    values = quant.decode(raw, (3, 5), "nf4", 4)
    assert values[1, 1] == np.float32(levels[5] * 2.0)  # -0.3 / 2 = -0.15 -> level 5
    s = float(np.float16(0.3))
    got = quant.decode(quant.encode(np.array([[0.3, 0.17]]), "nf4", 64)[0], (1, 2), "nf4", 64)
    assert got.dtype == np.float32 and got[0, 1] == np.float32(levels[13] * s)  # one rounding of the exact product


def test_nf4_levels_are_the_documented_ones(fixtures):
    """The codebook is QLoRA's NF4 exactly, and docs/CONTAINER.md states every level's bits."""
    levels = quant.CODEBOOKS["nf4"]
    assert levels.dtype == np.float32 and [f"{u:08x}" for u in levels.view("<u4")] == NF4_HEX
    assert levels[0] == -1 and levels[7] == 0 and levels[15] == 1 and (np.diff(levels) > 0).all()
    doc = (fixtures.parent / "docs" / "CONTAINER.md").read_text(encoding="utf-8")
    assert all(f"`{h}`" in doc for h in NF4_HEX)
    assert GOLDEN["nf4"] in doc


def test_codebook_codes_are_the_nearest_level_ties_low():
    levels = quant.CODEBOOKS["nf4"].astype(np.float64)
    t = np.random.default_rng(5).uniform(-1.3, 1.3, 20000)
    assert np.array_equal(quant.codebook_codes(t, "nf4"), np.abs(t[:, None] - levels).argmin(1))
    mids = (levels[:-1] + levels[1:]) / 2  # exact ties go to the lower index, anything above to the upper
    assert quant.codebook_codes(mids, "nf4").tolist() == list(range(15))
    assert quant.codebook_codes(np.nextafter(mids, 2.0), "nf4").tolist() == list(range(1, 16))
    assert quant.codebook_codes(np.nextafter(mids, -2.0), "nf4").tolist() == list(range(15))
    # the lookup's bin edges (any power-of-two grid of [-1, 1]) and their neighbours, zeros, far values
    grid = np.arange(-1024, 1025) / 1024
    t = np.concatenate([grid, np.nextafter(grid, 2.0), np.nextafter(grid, -2.0), [-0.0, 1e300, -1e300]])
    assert np.array_equal(quant.codebook_codes(t, "nf4"), (t[:, None] > mids).sum(1))
    # through encode: a group of max |x| = 1 (scale exactly 1) holding the midpoints
    q, scales = quant.quantize(np.concatenate([[1.0], mids])[None, :], "nf4", 16)
    assert scales.tolist() == [[1.0]] and q[0, 1:].tolist() == list(range(15))


def test_nf4_beats_int4_on_normal_values_and_not_on_uniform_ones():
    """What the allocator weighs: NF4's levels suit bell-shaped groups (factors of real adapters),
    uniform integer levels suit flat ones; the same bytes either way."""
    rng = np.random.default_rng(11)
    for M, nf4_better in ((rng.standard_normal((512, 4)), True), (rng.uniform(-1, 1, (512, 4)), False)):
        err = {b: np.linalg.norm(quant.rounded(M, b, 64, np.float64) - M) for b in (4, "nf4")}
        assert (err["nf4"] < err[4]) == nf4_better
        assert quant.nbytes(M.shape, "nf4", 64) == quant.nbytes(M.shape, 4, 64)


def test_three_bit_codes_straddle_bytes():
    # u = q + 4 = 1, 7, 4, 5, 3; LSB-first stream 100 111 001 101 110 (+ one zero bit):
    # byte 0 = bits 0..7 = 1,0,0,1,1,1,0,0 = 0x39; byte 1 = 1,1,0,1,1,1,0,0 = 0x3b
    assert quant.pack(np.array([-3, 3, 0, 1, -1], dtype=np.int8), 3).hex() == "393b"
    assert quant.unpack(bytes.fromhex("393b"), 3, 5).tolist() == [-3, 3, 0, 1, -1]


@pytest.mark.parametrize("shape", [(100, 3), (3, 130), (64, 64), (1, 1), (7, 200)])
@pytest.mark.parametrize("bits", quant.WIDTHS)
def test_encode_decode_is_stable(shape, bits):
    """Decoding gives what encode said a reader gets; encoding that again gives the same bytes
    (a file loaded and saved again does not drift)."""
    M = np.random.default_rng(sum(shape) + quant.code_bits(bits)).standard_normal(shape)
    raw, values = quant.encode(M, bits, 64)
    assert len(raw) == quant.nbytes(shape, bits, 64)
    assert np.array_equal(quant.decode(raw, shape, bits, 64), values)
    assert quant.encode(values, bits, 64)[0] == raw
    err = np.linalg.norm(values - M) / np.linalg.norm(M)
    assert err < {2: 0.9, 3: 0.35, 4: 0.15, "nf4": 0.15, 8: 0.01, 16: 1e-3}[bits]


def test_more_bits_never_worse():
    M = np.random.default_rng(3).standard_normal((256, 8))
    errs = [np.linalg.norm(quant.encode(M, b, 64)[1] - M) for b in quant.BITS]
    assert errs == sorted(errs, reverse=True)


def test_codes_of_unused_value_and_bad_scales_are_refused():
    with pytest.raises(ValueError, match="unused value 0"):
        quant.unpack(b"\x00", 4, 2)
    raw = bytearray(bytes.fromhex(GOLDEN[4]))
    raw[0:2] = np.array([-1.0], dtype="<f2").tobytes()
    with pytest.raises(ValueError, match="scales"):
        quant.decode(bytes(raw), (3, 5), 4, 4)
    with pytest.raises(ValueError, match="float16"):
        quant.encode(np.array([[1e6]]), 4, 64)


# ---------------------------------------------------------------- the container

@pytest.fixture
def adapter(fixtures):
    return lc.load_adapter(fixtures / SRC)


def _dense(B, A):
    return B.double() @ A.double()


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("outer,kw", [("svd", {"bits": 4}), ("svd", {"bits": 8, "rank": 3}), ("svd", {"bits": 16}),
                                      ("random", {"bits": 4, "outer_dim": 16}), ("svd", {"bits": 3, "group_size": 16}),
                                      ("svd", {"bits": "nf4"}), ("random", {"bits": "nf4", "outer_dim": 16})])
def test_quantized_file_round_trip(adapter, tmp_path, outer, kw, version):
    mini = lc.compress(adapter, outer, **kw)
    out = tmp_path / "q.safetensors"
    report = container.save(mini, out, format_version=version)
    meta = LazyTensors(out).metadata
    assert meta["format_version"] == str(version)
    keys = LazyTensors(out).keys()
    if version == 2:
        assert all(k.endswith(".q") for k in keys)
    else:  # one packed tensor for the whole (small) file
        assert list(keys) == [container.PACKED + "0"]
    loaded = lc.load(out)
    assert loaded.module_names == adapter.module_names
    again = lc.verify(out, adapter.source)  # measured anew against the original
    for row, fresh in zip(report.modules, again.modules):
        assert fresh.rel_error == pytest.approx(row.rel_error, rel=5.01e-4)  # recorded to 4 digits
        assert fresh.bits == row.bits and (fresh.bits > quant.code_bits(kw["bits"]) or kw["bits"] == 16)
        assert fresh.codebook == row.codebook == (kw["bits"] if kw["bits"] == "nf4" else None)
    restored = lc.reconstruct(loaded)
    for name in adapter.module_names:
        o, r, m = adapter.module(name), restored.module(name), loaded.module(name)
        assert m.quant == {"bits": kw["bits"], "group": kw.get("group_size", quant.DEFAULT_GROUP)}
        assert r.down.dtype == o.down.dtype and r.rank == o.rank and r.alpha == o.alpha
        err = torch.linalg.matrix_norm(_dense(r.up, r.down) - _dense(o.up, o.down)) / \
            torch.linalg.matrix_norm(_dense(o.up, o.down))
        stored = next(x for x in report.modules if x.name == name)
        assert float(err) == pytest.approx(stored.rel_error, rel=1e-3, abs=1e-6)
    # saving what was loaded writes the same bytes (nothing re-rounded)
    container.save(loaded, tmp_path / "again.safetensors", format_version=version)
    assert (tmp_path / "again.safetensors").read_bytes() == out.read_bytes()


def test_unquantized_files_stay_version_1_and_old_fixtures_read(adapter, tmp_path, fixtures):
    lc.save(lc.compress(adapter, "svd"), tmp_path / "v1.safetensors")
    assert LazyTensors(tmp_path / "v1.safetensors").metadata["format_version"] == "1"
    for old in sorted((fixtures / "bad" / "_valid").glob("mini_*.safetensors")):
        assert LazyTensors(old).metadata["format_version"] == "1"
        assert lc.verify(old).modules


def _tamper(path, key, offset, xor=0x01):
    blob = bytearray(path.read_bytes())
    n = struct.unpack("<Q", blob[:8])[0]
    start = json.loads(blob[8:8 + n])[key]["data_offsets"][0]
    blob[8 + n + start + offset] ^= xor
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("where", ["scale", "codes"])
@pytest.mark.parametrize("bits", [4, "nf4"])
def test_tampered_packed_bytes_are_caught(adapter, tmp_path, where, version, bits):
    out = tmp_path / "q.safetensors"
    container.save(lc.compress(adapter, "svd", bits=bits), out, format_version=version)
    key = f"{adapter.module_names[0]}.q" if version == 2 else container.PACKED + "0"
    _tamper(out, key, 0 if where == "scale" else 40)
    res = CliRunner().invoke(main, ["verify", str(out)])
    assert res.exit_code == 2 and "checksum" in res.stderr and res.stderr.count("\n") == 1


def test_quant_spec_in_a_version_1_file_is_refused(adapter, tmp_path):
    out = tmp_path / "q.safetensors"
    container.save(lc.compress(adapter, "svd", bits=4), out, format_version=2)
    header = LazyTensors(out).header
    blob = out.read_bytes()
    raw = json.loads(blob[8:header.data_start])
    meta = raw["__metadata__"]
    meta["format_version"] = "1"
    layout = {k: (v["dtype"], v["shape"]) for k, v in raw.items() if k != "__metadata__"}
    meta[container.METADATA_SHA256] = container.metadata_digest(meta, layout)
    new = json.dumps(raw, separators=(",", ":")).encode()
    new += b" " * (-(8 + len(new)) % 8)
    out.write_bytes(struct.pack("<Q", len(new)) + new + blob[header.data_start:])
    with pytest.raises(BadInputError, match="format version 2"):
        lc.load(out)


def test_shared_spec_entries_are_stated_once(adapter, tmp_path):
    """Version 2 files state spec entries every module shares once, in module_defaults; a reader
    sees the full specs, and a module repeating a default is refused."""
    out = tmp_path / "q.safetensors"
    container.save(lc.compress(adapter, "svd", bits=4), out, format_version=2)
    doc = json.loads(LazyTensors(out).metadata["lora_mini"])
    assert doc["module_defaults"] == {"kind": "linear", "kernel": {}, "rank": 8, "alpha": 16.0,
                                      "use_rslora": False, "dtype": "float32"}
    assert all("alpha" not in spec for spec in doc["modules"].values())
    assert all(m.alpha == 16.0 and m.rank == 8 for m in lc.load(out).modules())
    doc["modules"][adapter.module_names[0]]["alpha"] = 32.0
    header = LazyTensors(out).header
    blob = out.read_bytes()
    raw = json.loads(blob[8:header.data_start])
    raw["__metadata__"]["lora_mini"] = json.dumps(doc)
    layout = {k: (v["dtype"], v["shape"]) for k, v in raw.items() if k != "__metadata__"}
    raw["__metadata__"][container.METADATA_SHA256] = container.metadata_digest(raw["__metadata__"], layout)
    new = json.dumps(raw, separators=(",", ":")).encode()
    new += b" " * (-(8 + len(new)) % 8)
    out.write_bytes(struct.pack("<Q", len(new)) + new + blob[header.data_start:])
    with pytest.raises(BadInputError, match="repeats a key"):
        lc.load(out)


def test_recovered_quantized_inners_are_folded_and_requantized(adapter, tmp_path):
    """A quantized svd module whose X, Y are no longer the identity (recover changes them) is
    stored by folding them into U, V and quantizing again: the file stays loadable."""
    import dataclasses
    out = tmp_path / "q.safetensors"
    lc.save(lc.compress(adapter, "svd", bits=8), out)
    mini = lc.load(out)
    m = mini.module(mini.module_names[0])
    X = torch.diag(torch.linspace(0.5, 1.5, m.inner_rank))
    changed = dataclasses.replace(m, X=X)
    blob = container.quantized_blob(changed)
    shapes = container.quantized_shapes("svd", m.out_features, m.in_features, m.inner_rank, m.inner_rank,
                                        m.inner_rank)
    U2, V2 = quant.decode_many(blob, shapes, 8, quant.DEFAULT_GROUP)
    want = (m.U.double() @ X.double() @ m.V.double())
    got = torch.from_numpy(U2).double() @ torch.from_numpy(V2).double()
    assert float(torch.linalg.matrix_norm(got - want) / torch.linalg.matrix_norm(want)) < 0.02


def test_reconstructed_quantized_adapter_loads_in_peft(adapter, tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file
    out = tmp_path / "q"
    lc.save(lc.compress(adapter, "svd", bits=4), out)
    res = CliRunner().invoke(main, ["reconstruct", str(out), "-o", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    cfg = peft.LoraConfig.from_pretrained(str(tmp_path / "r"))
    assert cfg.r == adapter.config["r"]
    weights = load_file(str(tmp_path / "r" / "adapter_model.safetensors"))
    assert weights and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())


def test_inspect_shows_bits(adapter, tmp_path):
    out = tmp_path / "q.safetensors"
    lc.save(lc.compress(adapter, "svd", bits=4), out)
    res = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    rows = json.loads(res.output)["modules"]
    assert all(r["quant"] == {"bits": 4, "group": quant.DEFAULT_GROUP} and 4 < r["bits"] < 5 for r in rows)
    res = CliRunner().invoke(main, ["verify", str(out)])
    assert " bits " in res.output.splitlines()[0]


def test_inspect_and_verify_name_nf4(adapter, tmp_path):
    out = tmp_path / "q.safetensors"
    lc.save(lc.compress(adapter, "svd", bits="nf4", rank=3), out)
    res = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    rows = json.loads(res.output)["modules"]
    assert all(r["quant"] == {"bits": "nf4", "group": quant.DEFAULT_GROUP} and 4 < r["bits"] < 5 for r in rows)
    assert all("(nf4)" in line for line in CliRunner().invoke(main, ["inspect", str(out)]).output.splitlines()[1:])
    res = CliRunner().invoke(main, ["verify", str(out), "--against", str(adapter.source)])
    assert res.exit_code == 0 and all(line.split()[5] == "nf4" for line in res.output.splitlines()[1:15])
    doc = json.loads(CliRunner().invoke(main, ["verify", str(out), "--json"]).output)
    assert {m["codebook"] for m in doc["modules"]} == {"nf4"}


def _pre_nf4_check_bits(bits):
    """The width check of readers that predate codebooks (integer widths only)."""
    if type(bits) is not int or bits not in (2, 3, 4, 8, 16):
        raise ValueError(f"bits must be one of 2, 3, 4, 8, 16, got {bits!r}")
    return bits


@pytest.mark.parametrize("version", [2, 3])
def test_readers_without_codebooks_refuse_nf4_files(adapter, tmp_path, monkeypatch, version):
    """An NF4 module records its width as the string "nf4", which a reader that knows only
    integer widths refuses (one line, exit 2) rather than decoding its codes as int4."""
    out = tmp_path / "q.safetensors"
    container.save(lc.compress(adapter, "svd", bits="nf4", rank=2), out, format_version=version)
    doc = json.loads(LazyTensors(out).metadata["lora_mini"])
    widths = [e[4] for e in doc["modules"]] if version == 3 else [s["quant"]["bits"] for s in doc["modules"].values()]
    assert widths == ["nf4"] * len(adapter.module_names)
    monkeypatch.setattr(quant, "check_bits", _pre_nf4_check_bits)
    with pytest.raises(BadInputError, match="bits must be one of 2, 3, 4, 8, 16, got 'nf4'"):
        lc.load(out).module(adapter.module_names[0])
    res = CliRunner().invoke(main, ["reconstruct", str(out), "-o", str(tmp_path / "r")])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "nf4" in res.stderr
    assert not (tmp_path / "r").exists()


def test_unknown_codebook_is_refused(adapter, tmp_path):
    out = tmp_path / "q.safetensors"
    lc.save(lc.compress(adapter, "svd", bits="nf4", rank=2), out)
    header = LazyTensors(out).header
    blob = out.read_bytes()
    raw = json.loads(blob[8:header.data_start])
    doc = json.loads(raw["__metadata__"]["lora_mini"])
    doc["modules"][0][4] = "nf3"
    raw["__metadata__"]["lora_mini"] = json.dumps(doc)
    layout = {k: (v["dtype"], v["shape"]) for k, v in raw.items() if k != "__metadata__"}
    raw["__metadata__"][container.METADATA_SHA256] = container.metadata_digest(raw["__metadata__"], layout)
    new = json.dumps(raw, separators=(",", ":")).encode()
    new += b" " * (-(8 + len(new)) % 8)
    out.write_bytes(struct.pack("<Q", len(new)) + new + blob[header.data_start:])
    res = CliRunner().invoke(main, ["verify", str(out)])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "'nf3'" in res.stderr


# ---------------------------------------------------------------- the total regeneration bound

def test_total_regeneration_bound(adapter, tmp_path, monkeypatch):
    out = tmp_path / "r.safetensors"
    lc.save(lc.compress(adapter, "random", outer_dim=16, outer_stream="module"), out)
    mini = lc.load(out)
    total = sum((m.out_features + m.in_features) * m.rank + (m.out_features + m.in_features) * 16
                for m in mini.modules())
    monkeypatch.setenv("LORA_CONVERT_MAX_TOTAL_ELEMENTS", str(total))
    assert len(lc.verify(out).modules) == len(adapter.module_names)
    monkeypatch.setenv("LORA_CONVERT_MAX_TOTAL_ELEMENTS", str(total - 1))
    with pytest.raises(BadInputError, match="LORA_CONVERT_MAX_TOTAL_ELEMENTS"):
        lc.load(out)


def test_shared_outers_count_once(adapter, tmp_path, monkeypatch):
    out = tmp_path / "r.safetensors"
    lc.save(lc.compress(adapter, "random", outer_dim=16), out)
    mini = lc.load(out)
    factors = sum((m.out_features + m.in_features) * m.rank for m in mini.modules())
    outers = {("U", m.out_features) for m in mini.modules()} | {("V", m.in_features) for m in mini.modules()}
    total = factors + sum(16 * d for _, d in outers)
    monkeypatch.setenv("LORA_CONVERT_MAX_TOTAL_ELEMENTS", str(total))
    lc.load(out)
    monkeypatch.setenv("LORA_CONVERT_MAX_TOTAL_ELEMENTS", str(total - 1))
    with pytest.raises(BadInputError):
        lc.load(out)


# ---------------------------------------------------------------- version 3: packed tensors, short entries

def test_version_3_entries_state_shared_keys_once_and_read_back(adapter, tmp_path):
    """Entries are [name, out, in, k, bits, rel_error, energy]; what all modules share (svd
    outers without their a = b = k, the group) is in module_defaults; a reader sees full specs."""
    out = tmp_path / "q.safetensors"
    mini = lc.compress(adapter, "svd", bits=4, rank=3)
    lc.save(mini, out)
    doc = json.loads(LazyTensors(out).metadata["lora_mini"])
    assert doc["module_defaults"] == {"kind": "linear", "kernel": {}, "rank": 8, "alpha": 16.0, "use_rslora": False,
                                      "dtype": "float32", "outer": {"source": "svd"}, "group": quant.DEFAULT_GROUP}
    assert [e[0] for e in doc["modules"]] == adapter.module_names
    assert all(len(e) == container.V3_FIELDS and e[3:5] == [3, 4] for e in doc["modules"])
    loaded = lc.load(out)
    for m in mini.modules():
        spec = loaded.module(m.name).spec()
        assert spec == json.loads(json.dumps(m.spec()))


def test_version_3_round_trips_odd_specs():
    """Random outers, conv kernels, unquantized modules and extra fidelity keys survive the
    entry form; keys that differ between modules stay in each entry's object."""
    def spec(kind, k, q, outer_spec, **fid):
        kernel = {"down_shape": [4, 3, 3, 3], "up_shape": [8, 4, 1, 1]} if kind == "conv" else {}
        return container.module_spec(kind, kernel, 4, 8.0, False, "float16", 8, 27, k, outer_spec,
                                     {"rel_error": 0.5, "energy": 2.0, **fid}, q)
    rnd = {"source": "random", "generator": "splitmix64-dyadic24", "generator_version": 1, "seed": 7, "stream": "",
           "a": 4, "b": 4, "u_sha256": "ab", "v_sha256": "cd"}
    specs = {"a": spec("linear", 2, {"bits": 4, "group": 32}, {"source": "svd", "a": 2, "b": 2}),
             "b": spec("conv", 3, {"bits": 8, "group": 32}, {"source": "svd", "a": 3, "b": 3}, recovery_steps=5),
             "c": spec("linear", 2, {"bits": 3, "group": 32}, rnd),
             "d": spec("linear", 2, None, {"source": "svd", "a": 2, "b": 2})}
    defaults, entries = container.v3_entries(specs)
    assert defaults == {"rank": 4, "alpha": 8.0, "use_rslora": False, "dtype": "float16"}
    back = dict(containerspec.v3_spec(json.loads(json.dumps(e)), defaults) for e in entries)
    assert back == json.loads(json.dumps(specs))


def test_packed_tensors_split_at_chunk_size_and_fail_alone(adapter, tmp_path, monkeypatch):
    """Modules fill several packed tensors in order, none spanning two; a tampered tensor is
    named with its modules, and modules of the other tensors still load."""
    monkeypatch.setattr(container, "CHUNK_BYTES", 600)
    out = tmp_path / "q.safetensors"
    mini = lc.compress(adapter, "svd", bits=8, rank=2)
    lc.save(mini, out)
    keys = sorted(LazyTensors(out).keys())
    assert len(keys) > 2 and keys == sorted(f"{container.PACKED}{i}" for i in range(len(keys)))
    sizes = [LazyTensors(out).header.tensors[k].shape[0] for k in keys]
    assert all(600 <= s < 1200 for s in sizes[:-1])
    want = {m.name: m.factors() for m in mini.modules()}
    for m in lc.load(out).modules():
        B, A = m.factors()
        assert torch.equal(B, want[m.name][0]) and torch.equal(A, want[m.name][1])
    _tamper(out, f"{container.PACKED}1", 5)
    loaded = lc.load(out)
    spans = containerspec.packed_spans(loaded_specs(out), dict(zip(keys, sizes)), out)
    first, second = ([n for n, (k, _, _) in spans.items() if k == key] for key in (f"{container.PACKED}0",
                                                                                   f"{container.PACKED}1"))
    assert all(loaded.module(n).inner_rank == 2 for n in first)
    with pytest.raises(IntegrityError, match=f"{container.PACKED}1.*{second[0]}"):
        loaded.module(second[-1])


def loaded_specs(path):
    doc = json.loads(LazyTensors(path).metadata["lora_mini"])
    return dict(containerspec.v3_spec(e, doc["module_defaults"]) for e in doc["modules"])


def test_version_3_holds_unquantized_modules_beside_packed_ones(adapter, tmp_path):
    """A module without quant keeps its own X, Y (U, V) tensors in a version 3 file."""
    import dataclasses
    out = tmp_path / "q.safetensors"
    lc.save(lc.compress(adapter, "svd", bits=4), out)
    plain = lc.compress(adapter, "svd", rank=2).module(adapter.module_names[1])
    loaded = lc.load(out)
    mods = {m.name: m for m in loaded.modules()}
    mods[plain.name] = plain
    mixed = dataclasses.replace(loaded, load_module=lambda n: mods[n], load_window=None)
    lc.save(mixed, tmp_path / "mixed.safetensors")
    keys = set(LazyTensors(tmp_path / "mixed.safetensors").keys())
    assert {f"{plain.name}.{r}" for r in "UVXY"} < keys and f"{container.PACKED}0" in keys
    again = lc.load(tmp_path / "mixed.safetensors")
    assert not again.module(plain.name).quant and again.module(adapter.module_names[0]).quant
    assert torch.equal(again.module(plain.name).U, plain.U)


@pytest.mark.parametrize("bits", [2, 3, 4, "nf4", 8, 16])
@pytest.mark.parametrize("shape,group", [((70, 5), 16), ((5, 70), 64), ((3, 128), 64), ((9, 9), 4)])
def test_rounded_values_are_the_decoded_values(bits, shape, group):
    """quant.rounded (what budgets and compress compute with) gives exactly what a reader decodes."""
    rng = np.random.default_rng(quant.code_bits(bits) * 100 + group + (bits == "nf4"))
    M = rng.standard_normal(shape) * np.exp(rng.standard_normal(shape))
    M[0, :2] = 0.0
    raw, values = quant.encode(M, bits, group)
    assert np.array_equal(quant.rounded(M, bits, group), values)
    assert np.array_equal(quant.decode(raw, shape, bits, group), values)


def test_quantize_with_given_scales_is_quantize():
    """Scales chosen before (a plan keeps them) encode exactly as choosing them again does; scales
    of another shape or dtype are refused."""
    M = np.random.default_rng(3).standard_normal((40, 300))
    for bits in (3, "nf4", 8):
        q, scales = quant.quantize(M, bits, 64)
        q2, scales2 = quant.quantize(M, bits, 64, scales)
        assert np.array_equal(q, q2) and np.array_equal(scales, scales2)
        assert quant.encode(M, bits, 64, scales)[0] == quant.encode(M, bits, 64)[0]
    with pytest.raises(ValueError, match="scales of shape"):
        quant.quantize(M, 3, 64, scales[:, :-1])
    with pytest.raises(ValueError, match="scales of shape"):
        quant.quantize(M, 3, 64, scales.astype(np.float32))
