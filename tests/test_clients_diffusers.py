"""diffusers' model-level LoRA files (``save_lora_adapter`` / ``load_lora_adapter``), with diffusers
itself: adapters made by PEFT on a tiny UNet built from a config, saved by diffusers, read,
compressed, written back and loaded again by diffusers, which must apply the same update."""
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import lora_convert as lc
from lora_convert import formats
from lora_convert.cli import main
from lora_convert.errors import FormatDetectionError
from tests.helpers.unet import tiny_unet, unet_inputs, unet_output

pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def inputs():
    return unet_inputs()


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def rel(a, b):
    return float((a - b).norm() / b.norm())


def saved_adapter(inputs, dest, seed=0):
    """A LoRA on linear and conv layers (3x3 and 1x1, mixed ranks and alphas) saved with
    save_lora_adapter; returns the change it makes to the UNet's output."""
    unet = tiny_unet()
    base = unet_output(unet, inputs)
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "conv1", "conv_shortcut",
                                                                         "proj_in", "time_emb_proj"],
                                     rank_pattern={"conv1": 2}, alpha_pattern={"to_k": 3}), adapter_name="src")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    delta = unet_output(unet, inputs) - base
    unet.save_lora_adapter(str(dest), adapter_name="src")
    return delta


def loaded_delta(inputs, path, prefix=None):
    unet = tiny_unet()
    base = unet_output(unet, inputs)
    unet.load_lora_adapter(str(path / "pytorch_lora_weights.safetensors"), prefix=prefix, adapter_name="x")
    return unet_output(unet, inputs) - base


def test_save_lora_adapter_files_are_read_and_written_back_the_same_way(inputs, tmp_path):
    want = saved_adapter(inputs, tmp_path / "src")
    assert formats.detect(tmp_path / "src") == "diffusers"
    adapter = lc.load_adapter(tmp_path / "src")
    assert "unet.down_blocks.0.resnets.0.conv1" in adapter.module_names  # the component its root names
    assert adapter.module("unet.down_blocks.0.resnets.0.conv1").kind == "conv"
    lc.save(lc.compress(adapter, outer="svd"), tmp_path / "mini")
    assert run("reconstruct", tmp_path / "mini", "-o", tmp_path / "out").exit_code == 0
    keys = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert not any(k.startswith("unet.") for k in keys)  # model-level, like the source
    assert rel(loaded_delta(inputs, tmp_path / "out"), want) < 1e-4


def test_model_level_file_converts_to_a_pipeline_file(inputs, tmp_path):
    """--to kohya from a model-level file (components come from the module paths' roots), then
    back to diffusers: a pipeline-level file that diffusers loads under the unet prefix."""
    want = saved_adapter(inputs, tmp_path / "src")
    assert run("convert", tmp_path / "src", "--to", "kohya", "-o", tmp_path / "k.safetensors").exit_code == 0
    assert run("convert", tmp_path / "k.safetensors", "--to", "diffusers", "-o", tmp_path / "d").exit_code == 0
    assert rel(loaded_delta(inputs, tmp_path / "d", prefix="unet"), want) < 1e-4


def test_unprefixed_factors_of_an_unknown_model_need_from_diffusers(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {"encoder.block.0.dense.lora_A.weight": torch.randn(2, 8, generator=g),
         "encoder.block.0.dense.lora_B.weight": torch.randn(8, 2, generator=g)}
    save_file(t, tmp_path / "x.safetensors")
    with pytest.raises(FormatDetectionError):
        formats.detect(tmp_path / "x.safetensors")
    assert run("inspect", tmp_path / "x.safetensors").exit_code == 2
    assert run("inspect", "--from", "diffusers", tmp_path / "x.safetensors").exit_code == 0
    adapter = formats.read(tmp_path / "x.safetensors", "diffusers")
    assert adapter.module_names == ["encoder.block.0.dense"] and adapter.module("encoder.block.0.dense").scale == 1.0
    lc.save_adapter(adapter, tmp_path / "back")
    assert sorted(load_file(tmp_path / "back" / "pytorch_lora_weights.safetensors")) == sorted(t)
