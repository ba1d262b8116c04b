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
from lora_convert import container, quant
from lora_convert.cli import main
from lora_convert.errors import BadInputError

SRC = "peft-tiny-llama"

# The example of docs/CONTAINER.md: 3×5 (rows < cols: vectors are rows), group 4.
GOLDEN_M = np.array([[0.5, -1.0, 0.25, 0.75, 0.1], [2.0, -0.3, 0.0, 1.5, -2.5], [0, 0, 0, 0, 0]])
GOLDEN = {4: "923050239234b735000000001cdaff871d888808",
          3: "553544285539ab3a000000004efd930e4912",
          8: "0820731208240a2500000000c001a0dfffff6d80df018080808080"}


@pytest.mark.parametrize("bits", sorted(GOLDEN))
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


def test_three_bit_codes_straddle_bytes():
    # u = q + 4 = 1, 7, 4, 5, 3; LSB-first stream 100 111 001 101 110 (+ one zero bit):
    # byte 0 = bits 0..7 = 1,0,0,1,1,1,0,0 = 0x39; byte 1 = 1,1,0,1,1,1,0,0 = 0x3b
    assert quant.pack(np.array([-3, 3, 0, 1, -1], dtype=np.int8), 3).hex() == "393b"
    assert quant.unpack(bytes.fromhex("393b"), 3, 5).tolist() == [-3, 3, 0, 1, -1]


@pytest.mark.parametrize("shape", [(100, 3), (3, 130), (64, 64), (1, 1), (7, 200)])
@pytest.mark.parametrize("bits", quant.BITS)
def test_encode_decode_is_stable(shape, bits):
    """Decoding gives what encode said a reader gets; encoding that again gives the same bytes
    (a file loaded and saved again does not drift)."""
    M = np.random.default_rng(sum(shape) + bits).standard_normal(shape)
    raw, values = quant.encode(M, bits, 64)
    assert len(raw) == quant.nbytes(shape, bits, 64)
    assert np.array_equal(quant.decode(raw, shape, bits, 64), values)
    assert quant.encode(values, bits, 64)[0] == raw
    err = np.linalg.norm(values - M) / np.linalg.norm(M)
    assert err < {2: 0.9, 3: 0.35, 4: 0.15, 8: 0.01, 16: 1e-3}[bits]


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


@pytest.mark.parametrize("outer,kw", [("svd", {"bits": 4}), ("svd", {"bits": 8, "rank": 3}), ("svd", {"bits": 16}),
                                      ("random", {"bits": 4, "outer_dim": 16}), ("svd", {"bits": 3, "group_size": 16})])
def test_quantized_file_round_trip(adapter, tmp_path, outer, kw):
    mini = lc.compress(adapter, outer, **kw)
    out = tmp_path / "q.safetensors"
    report = lc.save(mini, out)
    meta = container.LazyTensors(out).metadata
    assert meta["format_version"] == "2"
    assert all(k.endswith(".q") for k in container.LazyTensors(out).keys())
    loaded = lc.load(out)
    again = lc.verify(out, adapter.source)  # measured anew against the original
    for row, fresh in zip(report.modules, again.modules):
        assert fresh.rel_error == pytest.approx(row.rel_error, rel=1e-4)  # recorded to 6 digits
        assert fresh.bits == row.bits and (fresh.bits > kw["bits"] or kw["bits"] == 16)
    restored = lc.reconstruct(loaded)
    for name in adapter.module_names:
        o, r, m = adapter.module(name), restored.module(name), loaded.module(name)
        assert m.quant == {"bits": kw["bits"], "group": kw.get("group_size", 64)}
        assert r.down.dtype == o.down.dtype and r.rank == o.rank and r.alpha == o.alpha
        err = torch.linalg.matrix_norm(_dense(r.up, r.down) - _dense(o.up, o.down)) / \
            torch.linalg.matrix_norm(_dense(o.up, o.down))
        stored = next(x for x in report.modules if x.name == name)
        assert float(err) == pytest.approx(stored.rel_error, rel=1e-3, abs=1e-6)
    # saving what was loaded writes the same bytes (nothing re-rounded)
    lc.save(loaded, tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == out.read_bytes()


def test_unquantized_files_stay_version_1_and_old_fixtures_read(adapter, tmp_path, fixtures):
    lc.save(lc.compress(adapter, "svd"), tmp_path / "v1.safetensors")
    assert container.LazyTensors(tmp_path / "v1.safetensors").metadata["format_version"] == "1"
    for old in sorted((fixtures / "bad" / "_valid").glob("mini_*.safetensors")):
        assert container.LazyTensors(old).metadata["format_version"] == "1"
        assert lc.verify(old).modules


def _tamper(path, key, offset, xor=0x01):
    blob = bytearray(path.read_bytes())
    n = struct.unpack("<Q", blob[:8])[0]
    start = json.loads(blob[8:8 + n])[key]["data_offsets"][0]
    blob[8 + n + start + offset] ^= xor
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("where", ["scale", "codes"])
def test_tampered_packed_bytes_are_caught(adapter, tmp_path, where):
    out = tmp_path / "q.safetensors"
    lc.save(lc.compress(adapter, "svd", bits=4), out)
    key = f"{adapter.module_names[0]}.q"
    _tamper(out, key, 0 if where == "scale" else 40)
    res = CliRunner().invoke(main, ["verify", str(out)])
    assert res.exit_code == 2 and "checksum" in res.stderr and res.stderr.count("\n") == 1


def test_quant_spec_in_a_version_1_file_is_refused(adapter, tmp_path):
    out = tmp_path / "q.safetensors"
    lc.save(lc.compress(adapter, "svd", bits=4), out)
    header = container.LazyTensors(out).header
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
    lc.save(lc.compress(adapter, "svd", bits=4), out)
    doc = json.loads(container.LazyTensors(out).metadata["lora_mini"])
    assert doc["module_defaults"] == {"kind": "linear", "kernel": {}, "rank": 8, "alpha": 16.0,
                                      "use_rslora": False, "dtype": "float32"}
    assert all("alpha" not in spec for spec in doc["modules"].values())
    assert all(m.alpha == 16.0 and m.rank == 8 for m in lc.load(out).modules())
    doc["modules"][adapter.module_names[0]]["alpha"] = 32.0
    header = container.LazyTensors(out).header
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
    U2, V2 = quant.decode_many(blob, shapes, 8, 64)
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
    assert all(r["quant"] == {"bits": 4, "group": 64} and 4 < r["bits"] < 5 for r in rows)
    res = CliRunner().invoke(main, ["verify", str(out)])
    assert " bits " in res.output.splitlines()[0]


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
