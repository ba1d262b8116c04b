"""lora_convert.apply (lora_convert.modeling): LoRA-Mini layers straight into a model, against PEFT with the reconstructed
adapter on real models built from configs (a tiny Llama, a tiny diffusers UNet)."""
from __future__ import annotations

import copy

import pytest
import torch

import lora_convert as lc
from lora_convert.modeling import AdapterLayer
from lora_convert.errors import BadInputError
from tests.helpers.clients import tiny_llama_lora
from tests.helpers.models import tiny_llama

IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 4]])


def _mini(tmp_path, lora, name, **opts):
    lc.save(lc.compress(lc.load_adapter(lora), **{"outer": "random", "seed": 3, "outer_dim": 16, "rank": 4,
                                                 "dtype": "fp32", **opts}), tmp_path / name)
    mini = lc.load(tmp_path / name)
    lc.save_adapter(lc.reconstruct(mini), tmp_path / f"{name}-peft")
    return tmp_path / name, tmp_path / f"{name}-peft"


@torch.no_grad()
def _logits(model):
    return model(IDS).logits.double()


@torch.no_grad()
def _peft(restored: dict, active):
    from peft import PeftModel

    names = list(restored)
    model = PeftModel.from_pretrained(tiny_llama(0), restored[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(restored[n], adapter_name=n)
    model.base_model.set_adapter(active)
    return model.eval()(IDS).logits.double()


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two LoRA-Mini adapters of one tiny Llama (random and SVD outers) and their PEFT restorations."""
    tmp = tmp_path_factory.mktemp("apply")
    _, lora_a = tiny_llama_lora(tmp / "a", seed=0)
    _, lora_b = tiny_llama_lora(tmp / "b", seed=0, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    minis = {"a": _mini(tmp, lora_a, "mini-a"), "b": _mini(tmp, lora_b, "mini-b", outer="svd", outer_dim=None, rank=2)}
    return minis


def test_apply_equals_peft_with_the_reconstructed_adapter(two):
    mini, restored = two["a"]
    model = tiny_llama(0)
    base = _logits(model)
    adapters = lc.apply(model, mini)
    got, want = _logits(model), _peft({"a": restored}, "a")
    assert (got - want).abs().max() < 1e-5 * (want - base).abs().max() + 1e-6
    assert (want - base).abs().max() > 1e-2  # the adapter changes the model: the comparison means something
    assert adapters.names == ["default"] and adapters.active == ["default"]
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, AdapterLayer)
    # no dense ΔW held: only the outers and the small inners
    assert all(t.numel() < 64 * 64 for t in layer.adapters["default"].state_dict(keep_vars=True).values())


def test_merge_and_unmerge_round_trip(two):
    mini, restored = two["a"]
    model = tiny_llama(0)
    before = copy.deepcopy(model.state_dict())
    adapters = lc.apply(model, mini)
    unmerged = _logits(model)
    adapters.merge()
    assert adapters.merged == ["default"]
    w = model.model.layers[1].mlp.down_proj.base.weight
    assert not torch.equal(w, before["model.layers.1.mlp.down_proj.weight"])
    assert torch.allclose(_logits(model), unmerged, atol=1e-5)
    adapters.unmerge()
    assert adapters.merged == []
    for key, value in model.state_dict().items():
        if ".adapters." not in key:
            assert torch.allclose(value, before[key.replace(".base.", ".")], atol=1e-6), key
    assert torch.allclose(_logits(model), unmerged, atol=1e-6)
    adapters.unload()
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert model.state_dict().keys() == before.keys()


def test_several_adapters_switch_by_name_like_peft(two):
    model = tiny_llama(0)
    base = _logits(model)
    adapters = lc.apply(model, two["a"][0], adapter_name="a")
    lc.apply(model, two["b"][0], adapter_name="b")
    restored = {"a": two["a"][1], "b": two["b"][1]}
    assert adapters.names == ["a", "b"] and adapters.active == ["b"]
    for active in ("b", "a", ["a", "b"]):
        adapters.set_adapter(active)
        want = _peft(restored, active)
        assert torch.allclose(_logits(model), want, atol=1e-5), active
    adapters.merge()
    assert torch.allclose(_logits(model), _peft(restored, ["a", "b"]), atol=1e-5)
    with adapters.disabled():
        assert torch.allclose(_logits(model), base, atol=1e-5)
    assert adapters.active == ["a", "b"] and adapters.merged == ["a", "b"]
    adapters.set_adapter("a")  # switching unmerges first
    assert adapters.merged == [] and torch.allclose(_logits(model), _peft(restored, "a"), atol=1e-5)
    adapters.delete("a")
    assert adapters.names == ["b"]
    assert isinstance(model.model.layers[0].self_attn.q_proj, AdapterLayer)  # b still targets it
    assert not isinstance(model.model.layers[0].self_attn.k_proj, AdapterLayer)  # only a did
    with pytest.raises(BadInputError, match="already applied"):
        lc.apply(model, two["b"][0], adapter_name="b")
    with pytest.raises(BadInputError, match="no adapter named 'a'"):
        adapters.set_adapter("a")


def test_wrong_base_model_is_refused_without_changing_it(two):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(BadInputError, match="wrong base model"):
        lc.apply(model, two["a"][0])
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8).eval()


def test_apply_on_a_diffusers_unet_with_conv_layers_equals_peft(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(1)
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv_in"])
    get_peft_model(_tiny_unet(), cfg).save_pretrained(tmp_path / "lora")
    kinds = {m.kind for m in lc.load_adapter(tmp_path / "lora").modules()}
    assert kinds == {"linear", "conv"}
    mini, restored = _mini(tmp_path, tmp_path / "lora", "mini", outer_dim=8, rank=3)
    sample, t, text = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 16)
    with torch.no_grad():
        base = _tiny_unet()(sample, t, text).sample
        want = PeftModel.from_pretrained(_tiny_unet(), restored).eval()(sample, t, text).sample
        unet = _tiny_unet()
        adapters = lc.apply(unet, mini)
        got = unet(sample, t, text).sample
        adapters.merge()
        merged = unet(sample, t, text).sample
    effect = (want - base).abs().max()
    assert effect > 1e-3 and (got - want).abs().max() < 1e-4 * effect
    assert (merged - want).abs().max() < 1e-4 * effect
