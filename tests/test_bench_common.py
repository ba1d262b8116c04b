"""The benchmarks' baseline quantizer (benchmarks/common.py): byte count, round-trip bound, truncation."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "common.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n", [64, 200, 576])
def test_quantize_round_trip_within_half_a_step(common, bits, n):
    g = torch.Generator().manual_seed(n + bits)
    # rows of very different magnitudes, one all-zero row, one row with a single spike
    x = torch.randn(5, n, generator=g, dtype=torch.float64) * torch.tensor([1e-4, 1.0, 30.0, 0.0, 1.0])[:, None]
    x[4, 7] = 50.0
    q, s = common.quantize(x, bits)
    assert q.dtype == torch.int8 and s.dtype == torch.float16
    assert q.shape == x.shape and s.shape == (5, math.ceil(n / 64))
    qmax = 2 ** (bits - 1) - 1
    assert int(q.abs().max()) <= qmax
    y = common.dequantize(q, s)
    step = s.double().repeat_interleave(64, dim=1)[:, :n]
    assert torch.all((y - x).abs() <= step / 2 + 1e-12)
    assert torch.all(y[3] == 0)
    # the scale is the smallest fp16 that covers the group's largest magnitude
    amax = torch.nn.functional.pad(x.abs(), (0, (-n) % 64)).reshape(5, -1, 64).amax(-1)
    below = torch.nextafter(s, torch.tensor(0.0, dtype=torch.float16)).double()
    assert torch.all(s.double() * qmax >= amax)
    assert torch.all((below * qmax < amax) | (amax == 0))


def test_quantized_bytes_counts_packed_ints_and_scales(common):
    assert common.quantized_bytes(8 * 576, 8, 576, 4) == 8 * 576 // 2 + 2 * 8 * 9
    assert common.quantized_bytes(8 * 576, 8, 576, 8) == 8 * 576 + 2 * 8 * 9
    assert common.quantized_bytes(3 * 100, 3, 100, 4) == 150 + 2 * 3 * 2
    assert common.quantized_bytes(1 * 65, 1, 65, 4) == 33 + 2 * 2


def _peft_dir(path: Path, shapes: dict, r: int, alpha: int, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    path.mkdir()
    sd = {}
    for name, (out_f, in_f) in shapes.items():
        prefix = f"base_model.model.model.layers.0.self_attn.{name}"
        # a decaying spectrum, like a trained adapter
        sd[prefix + ".lora_A.weight"] = torch.randn(r, in_f, generator=g) * torch.logspace(0, -2, r)[:, None]
        sd[prefix + ".lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.1
    save_file(sd, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(shapes),
           "base_model_name_or_path": "x", "task_type": "CAUSAL_LM", "use_rslora": False}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


SHAPES = {"q_proj": (96, 64), "v_proj": (32, 160)}


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_baseline_adapter_bytes_and_truncation(common, tmp_path, bits):
    teacher = _peft_dir(tmp_path / "t", SHAPES, r=8, alpha=16)
    res = common.baseline_adapter(teacher, tmp_path / "out", rank=3, bits=bits)
    cfg_bytes = (tmp_path / "out" / "adapter_config.json").stat().st_size
    expect = cfg_bytes
    for out_f, in_f in SHAPES.values():
        if bits is None:
            expect += 2 * 3 * (out_f + in_f)
        else:
            expect += math.ceil(3 * in_f * bits / 8) + 2 * 3 * math.ceil(in_f / 64)
            expect += math.ceil(3 * out_f * bits / 8) + 2 * 3 * math.ceil(out_f / 64)
    assert res.bytes == expect
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 3
    t = load_file(str(teacher / "adapter_model.safetensors"))
    o = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    for prefix in {k.rsplit(".lora_", 1)[0] for k in t}:
        dense = 2.0 * t[prefix + ".lora_B.weight"].double() @ t[prefix + ".lora_A.weight"].double()
        u, s, vh = torch.linalg.svd(dense)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        got = o[prefix + ".lora_B.weight"].double() @ o[prefix + ".lora_A.weight"].double()
        # truncation error is the optimum (Eckart-Young) up to the storage rounding
        tol = {None: 1e-3, 8: 2e-2, 4: 0.3}[bits]
        assert torch.linalg.norm(got - best) <= tol * torch.linalg.norm(best)
        assert o[prefix + ".lora_A.weight"].shape == (3, dense.shape[1])


def test_truncate_is_exact_at_full_rank(common):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 50, generator=g), torch.randn(30, 4, generator=g)
    ak, bk = common.truncate(a, b, 0.5, 4)
    assert torch.allclose(bk @ ak, 0.5 * b.double() @ a.double(), atol=1e-10)
    # balanced split: both factors carry the same singular values
    assert torch.allclose(torch.linalg.norm(ak, dim=1), torch.linalg.norm(bk, dim=0), rtol=1e-10)


def test_baseline_refuses_a_rank_above_the_teachers(common, tmp_path):
    teacher = _peft_dir(tmp_path / "t", SHAPES, r=2, alpha=2)
    with pytest.raises(ValueError, match="rank 2 < 3"):
        common.baseline_adapter(teacher, tmp_path / "out", rank=3, bits=4)
