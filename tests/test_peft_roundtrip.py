"""compress -> save -> load -> reconstruct -> real PEFT loads it and computes the same outputs;
large PEFT adapters are written in one pass and read back by the reference safetensors reader."""
import json

import pytest
import torch

import lora_convert as lc
from helpers.models import tiny_llama
from lora_convert.adapter import LoraModule, from_modules

peft = pytest.importorskip("peft")

FIXTURE_SEEDS = {"peft-tiny-llama": 0, "peft-tiny-llama-fp16": 1, "peft-tiny-llama-patterns": 2}
TOKENS = torch.tensor([[1, 5, 9, 17, 33, 64, 100, 127]])


def peft_logits(adapter_dir, seed):
    model = peft.PeftModel.from_pretrained(tiny_llama(seed), str(adapter_dir)).float().eval()
    with torch.no_grad():
        return model(TOKENS).logits


def merged_logits(adapter: lc.Adapter, seed):
    """Directly computed: W + scale·B·A merged by hand into the base model (float64 product)."""
    model = tiny_llama(seed)
    params = dict(model.named_modules())
    with torch.no_grad():
        for m in adapter.modules():
            weight = params[m.name].weight
            delta = m.scale * (m.up.double() @ m.down.double())
            weight.add_(delta.to(weight.dtype))
        for name, tensor in adapter.passthrough():
            mod = name.removeprefix("base_model.model.").removesuffix(".weight")
            params[mod].weight.copy_(tensor)
        return model(TOKENS).logits


def roundtrip(src, tmp_path, **opts):
    mini = lc.compress(lc.load_adapter(src), **opts)
    report = lc.save(mini, tmp_path / "mini")
    restored = lc.reconstruct(lc.load(tmp_path / "mini"), trim_rank=opts.pop("trim", False))
    lc.save_adapter(restored, tmp_path / "restored")
    return report, tmp_path / "restored"


@pytest.mark.parametrize("name", list(FIXTURE_SEEDS))
def test_svd_full_rank_reconstruction_matches_original_in_peft(name, fixtures, tmp_path):
    report, restored = roundtrip(fixtures / name, tmp_path, outer="svd", dtype="fp32")
    assert report.rel_error < 1e-6
    seed = FIXTURE_SEEDS[name]
    expected = peft_logits(fixtures / name, seed)
    got = peft_logits(restored, seed)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_random_outer_reconstruction_loads_in_peft_and_equals_direct_computation(fixtures, tmp_path):
    report, restored = roundtrip(fixtures / "peft-tiny-llama", tmp_path, outer="random", seed=7,
                                 outer_dim=16, rank=4, dtype="fp32")
    assert 0.0 < report.retained_energy < 1.0
    direct = merged_logits(lc.reconstruct(lc.load(tmp_path / "mini")), 0)
    assert torch.allclose(peft_logits(restored, 0), direct, atol=1e-4, rtol=1e-4)
    original = peft_logits(fixtures / "peft-tiny-llama", 0)
    assert not torch.allclose(original, direct, atol=1e-4)  # it is lossy, and the test can tell


def test_scale_and_patterns_are_preserved_exactly(fixtures, tmp_path):
    src = fixtures / "peft-tiny-llama-patterns"
    _, restored = roundtrip(src, tmp_path, outer="svd")
    original, back = lc.load_adapter(src), lc.load_adapter(restored)
    assert back.module_names == original.module_names
    for name in original.module_names:
        o, b = original.module(name), back.module(name)
        assert (b.rank, b.alpha, b.use_rslora, b.scale) == (o.rank, o.alpha, o.use_rslora, o.scale)
    cfg = json.loads((restored / "adapter_config.json").read_text())
    src_cfg = json.loads((src / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == src_cfg["rank_pattern"] and cfg["alpha_pattern"] == src_cfg["alpha_pattern"]
    assert back.passthrough_names == ["base_model.model.lm_head.weight"]
    assert torch.equal(dict(back.passthrough())["base_model.model.lm_head.weight"],
                       dict(original.passthrough())["base_model.model.lm_head.weight"])


def test_trimmed_rank_keeps_the_scale(fixtures, tmp_path):
    src = fixtures / "peft-tiny-llama"
    mini = lc.compress(lc.load_adapter(src), outer="svd", rank=3, dtype="fp32")
    lc.save(mini, tmp_path / "mini")
    padded, trimmed = (lc.reconstruct(lc.load(tmp_path / "mini"), trim_rank=t) for t in (False, True))
    lc.save_adapter(padded, tmp_path / "padded")
    lc.save_adapter(trimmed, tmp_path / "trimmed")
    cfg = json.loads((tmp_path / "trimmed" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 16 and not cfg["alpha_pattern"]  # k/r folded into lora_B
    assert torch.allclose(peft_logits(tmp_path / "trimmed", 0), peft_logits(tmp_path / "padded", 0), atol=1e-5)


def test_fp16_storage_is_reported_honestly(fixtures, tmp_path):
    src = lc.load_adapter(fixtures / "peft-tiny-llama")
    exact = lc.save(lc.compress(src, outer="svd", dtype="fp32"), tmp_path / "a")
    half = lc.save(lc.compress(src, outer="svd", dtype="fp16"), tmp_path / "b")
    assert half.rel_error > exact.rel_error and half.rel_error < 1e-2
    measured = lc.verify(tmp_path / "b", against=fixtures / "peft-tiny-llama")
    assert measured.rel_error == pytest.approx(half.rel_error, rel=1e-6)


def test_embedding_adapter_saved_with_peft_defaults_round_trips(tmp_path):
    """PEFT saves a targeted embedding's base weights beside its factors (save_embedding_layers
    "auto") and loads them back into the model: they must survive compress and reconstruct."""
    from safetensors.torch import load_file, save_file

    model = peft.get_peft_model(tiny_llama(3), peft.LoraConfig(r=4, lora_alpha=8,
                                                               target_modules=["embed_tokens", "q_proj"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    src = tmp_path / "emb"
    model.save_pretrained(src)
    tensors = load_file(src / "adapter_model.safetensors")
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in tensors, sorted(tensors)
    tensors[key] = tensors[key] * 1.5  # as after a vocabulary change: loading must apply it
    save_file(tensors, src / "adapter_model.safetensors", metadata={"format": "pt"})
    _, restored = roundtrip(src, tmp_path, outer="svd", dtype="fp32")
    assert torch.equal(load_file(restored / "adapter_model.safetensors")[key], tensors[key])
    assert torch.allclose(peft_logits(restored, 3), peft_logits(src, 3), atol=1e-4, rtol=1e-4)


def test_large_peft_adapters_are_written_behind_header_room_and_load_in_safetensors(tmp_path, lowrank):
    from safetensors import safe_open
    ms = [LoraModule(f"model.layers.{i}.self_attn.q_proj", *[t.half() for t in lowrank(4096, 4096, 16, seed=i)[::-1]],
                     alpha=32.0) for i in range(6)]
    cfg = {"r": 16, "lora_alpha": 32, "peft_type": "LORA", "target_modules": ["q_proj"]}
    lc.save_adapter(from_modules("peft", ms, config=cfg), tmp_path / "a", "peft")
    raw = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert len(raw[8:8 + n]) - len(raw[8:8 + n].rstrip(b" ")) > 500  # written once, behind padded room
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", framework="pt") as fh:
        for m in ms:
            key = f"base_model.model.{m.name}.lora_B.weight"
            assert torch.equal(fh.get_tensor(key), m.up)
    back = lc.load_adapter(tmp_path / "a")
    assert torch.equal(back.module(ms[2].name).down, ms[2].down)
