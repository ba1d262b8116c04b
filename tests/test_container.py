"""container: the LoRA-Mini file as written and read back: random outers shared by shape or
regenerated per module name, stored svd outers behind header room, checksums and fingerprints."""
import pytest
import torch

import lora_convert as lc
from lora_convert import quant
from lora_convert.adapter import LoraModule, from_modules
from lora_convert.container import MiniAdapter, MiniModule
from lora_convert.outer import random as random_outer


def test_random_outers_are_shared_by_shape_and_files_without_a_stream_still_load(tmp_path, lowrank):
    shapes = {"a.q_proj": (64, 48), "b.q_proj": (64, 48), "c.up_proj": (80, 48)}
    mods = [LoraModule(n, down=lowrank(o, i, 4, seed=k)[1], up=lowrank(o, i, 4, seed=k)[0], alpha=8.0)
            for k, (n, (o, i)) in enumerate(shapes.items())]
    mini = lc.compress(from_modules("peft", mods), "random", seed=5, outer_dim=16)
    a, b, c = (mini.module(n) for n in shapes)
    assert a.outer["stream"] == "" and torch.equal(a.U, b.U) and a.outer["u_sha256"] == b.outer["u_sha256"]
    assert a.outer["u_sha256"] != c.outer["u_sha256"] and torch.equal(a.V, c.V)  # V: same b×in

    # a file written per module (no "stream"): outers keyed on the module name
    legacy = []
    for m in (a, b):
        U, u_sha = random_outer.outer_matrix(5, m.name, "U", m.out_features, 16)
        V, v_sha = random_outer.outer_matrix(5, m.name, "V", 16, m.in_features)
        spec = {k: v for k, v in m.outer.items() if k != "stream"} | {"u_sha256": u_sha, "v_sha256": v_sha}
        legacy.append(MiniModule(name=m.name, kind="linear", kernel={}, rank=4, alpha=8.0, use_rslora=False,
                                 dtype="float64", outer=spec, U=U, V=V, X=m.X, Y=m.Y))
    table = {m.name: m for m in legacy}
    lc.save(MiniAdapter(source_format="peft", module_names=list(table), load_module=table.__getitem__), tmp_path / "old")
    loaded = lc.load(tmp_path / "old")
    la, lb = loaded.module("a.q_proj"), loaded.module("b.q_proj")
    assert "stream" not in la.outer and not torch.equal(la.U, lb.U) and not torch.equal(la.U, a.U)
    assert lc.verify(tmp_path / "old").modules  # fingerprints of the per-module streams check out


def test_select_outers_are_coordinate_subsets_regenerated_and_checked(tmp_path, lowrank):
    """`select` files store the seed only; outers regenerated from another seed fail their
    fingerprints (load and the torch-free check alike); a quantized select file reads back."""
    import json
    import struct

    from lora_convert import outer
    from lora_convert.errors import IntegrityError

    shapes = {"a.q_proj": (64, 48), "b.v_proj": (32, 48)}
    mods = [LoraModule(n, down=lowrank(o, i, 4, seed=k)[1], up=lowrank(o, i, 4, seed=k)[0], alpha=8.0)
            for k, (n, (o, i)) in enumerate(shapes.items())]
    mini = lc.compress(from_modules("peft", mods), "select", seed=3, outer_dim=16)
    for m in mini.modules():
        assert m.outer["source"] == "select"
        for M in (m.U, m.V.T):  # one 1 per column of U and per row of V, on distinct coordinates
            assert torch.equal(M.sum(0), torch.ones(M.shape[1], dtype=M.dtype)) and M.sum(1).max() <= 1
    lc.save(mini, tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    assert all(k.rsplit(".", 1)[-1] in ("X", "Y") for k in header if k != "__metadata__")  # no stored outers
    back = lc.load(tmp_path / "m.safetensors")
    for name in shapes:
        assert torch.equal(back.module(name).U, mini.module(name).U)
        torch.testing.assert_close(back.module(name).factors()[0], mini.module(name).factors()[0])
    m = mini.module("a.q_proj")
    wrong = dict(m.outer, seed=4)
    for check in (outer.get("select").check, lambda *a: outer.get("select").restore(*a, tensors=None)):
        with pytest.raises(IntegrityError, match="fingerprint"):
            check(m.name, wrong, m.out_features, m.in_features)
    with pytest.raises(IntegrityError, match="fingerprint"):  # a random outer's fingerprint is not a subset's
        outer.get("random").check(m.name, m.outer, m.out_features, m.in_features)
    lc.save(lc.compress(from_modules("peft", mods), "select", seed=3, outer_dim=16, bits=4), tmp_path / "q")
    assert lc.load(tmp_path / "q").module("b.v_proj").quant == {"bits": 4, "group": quant.DEFAULT_GROUP}


@pytest.mark.parametrize("source", ["svd", "random"])
def test_stored_outers_are_written_behind_header_room_and_tiny_files_are_not_padded(tmp_path, source, lowrank):
    from lora_convert.container import FILE_NAME
    ms = [LoraModule(f"layers.{i}.q_proj", *lowrank(4096, 4096, 16, seed=i)[::-1], alpha=32.0) for i in range(6)]
    for m in ms:
        m.down, m.up = m.down.half(), m.up.half()
    lc.save(lc.compress(from_modules("peft", ms, config={"r": 16, "lora_alpha": 32}), source, seed=1), tmp_path / "m")
    raw = (tmp_path / "m" / FILE_NAME).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    padding = len(raw[8:8 + n]) - len(raw[8:8 + n].rstrip(b" "))
    assert (padding > 1000) == (source == "svd") and padding < 0.03 * len(raw)
    lc.verify(tmp_path / "m")  # checks every checksum and fingerprint
    assert lc.load(tmp_path / "m").module("layers.3.q_proj").U.shape[0] == 4096


def test_the_header_knows_torchs_floating_dtypes_without_torch():
    """containerspec checks a module's dtype name without importing torch: its list holds every
    floating-point dtype this torch has, and nothing this torch has that is not one."""
    from lora_convert.containerspec import FLOAT_DTYPE_NAMES

    have = {n for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype)}
    assert {n for n in have if getattr(torch, n).is_floating_point} <= set(FLOAT_DTYPE_NAMES)
    assert all(getattr(torch, n).is_floating_point for n in set(FLOAT_DTYPE_NAMES) & have)
    assert {"float16", "bfloat16", "float32", "float64"} <= set(FLOAT_DTYPE_NAMES) and "int8" not in FLOAT_DTYPE_NAMES


@pytest.mark.parametrize("source", ["svd", "random"])
def test_a_remembered_blob_is_written_only_while_it_stands_for_the_tensors(tmp_path, lowrank, source):
    """Save writes the bytes the fit (or the file) encoded instead of encoding again, but never
    once a module's tensors or quant spec have changed: replaced or modified in place."""
    from lora_convert import quant
    from lora_convert.container import load, quantized_blob

    B, A = lowrank(96, 64, 6, seed=3)
    adapter = from_modules("peft", [LoraModule("m.q_proj", down=A, up=B, alpha=12.0)])
    dims = {} if source == "svd" else {"outer_dim": 24}
    m = lc.compress(adapter, source, bits=4, rank=3, **dims).module("m.q_proj")
    first, second = (m.U, m.V) if source == "svd" else (m.X, m.Y)
    fresh = quant.encode_many([first.double().numpy(), second.double().numpy()], 4, m.quant["group"])[0]
    assert m.remembered_blob() == fresh and quantized_blob(m) == fresh

    second.mul_(3.0)  # in place: the remembered bytes no longer stand for the module
    assert m.remembered_blob() is None
    assert quantized_blob(m) == quant.encode_many([first.double().numpy(), second.double().numpy()], 4,
                                                  m.quant["group"])[0] != fresh
    m.quant = {**m.quant, "bits": 8}  # a new width, same tensors
    assert m.remembered_blob() is None
    m.quant = {**m.quant, "bits": 4}
    m.remember_blob(b"x")
    m.X = m.X.clone()  # replaced
    assert m.remembered_blob() is None

    lc.save(lc.compress(adapter, source, bits="nf4", rank=3, **dims), tmp_path / "f")
    back = load(tmp_path / "f").module("m.q_proj")  # a file's blob, as read
    first, second = (back.U, back.V) if source == "svd" else (back.X, back.Y)
    assert back.remembered_blob() == quant.encode_many([first.double().numpy(), second.double().numpy()], "nf4",
                                                       back.quant["group"])[0]
