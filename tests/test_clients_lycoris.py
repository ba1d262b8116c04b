"""LyCORIS files made by the LyCORIS library itself, through LoRA-Mini and back, loaded by LyCORIS.

Networks are created with `create_lycoris` on a tiny SD-style UNet built from a diffusers
config, given random factors, and saved with LyCORIS's own `save_weights`. What they do to the
UNet is measured with LyCORIS's forward pass (its `get_diff_weight` applies alpha/dim twice for
LoHa/LoKr, so it is not the reference). The adapter we write back is loaded with LyCORIS's
`create_lycoris_from_weights` (and, for diffusers, with diffusers' `load_lora_adapter`) and must
change the UNet's output the same way.
"""
import logging

import pytest
import torch
from click.testing import CliRunner

import lora_convert as lc
from lora_convert import formats
from lora_convert.cli import main
from tests.helpers.unet import tiny_unet, unet_inputs, unet_output

lycoris = pytest.importorskip("lycoris")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)

SD1 = {"ss_base_model_version": "sd_v1"}  # what kohya's trainers record; LyCORIS alone records nothing


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def inputs():
    return unet_inputs()


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def make_network(unet, inputs, path, algo, metadata=None, seed=0, **kwargs):
    """A LyCORIS network with random factors saved at `path`; returns the change it makes to the
    UNet's output (LyCORIS's forward pass)."""
    from lycoris import create_lycoris

    base = unet_output(unet, inputs)
    net = create_lycoris(unet, 1.0, algo=algo, **kwargs)
    net.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    try:
        delta = unet_output(unet, inputs) - base
        net.save_weights(str(path), torch.float32, dict(metadata or {}))
    finally:
        net.restore()
    assert float(delta.norm()) > 1e-3 * float(base.norm())  # the network does something
    return delta


def lycoris_delta(unet, inputs, path):
    """The change LyCORIS's own loader makes to the UNet's output with the file at `path`."""
    from lycoris import create_lycoris_from_weights

    base = unet_output(unet, inputs)
    net, weights = create_lycoris_from_weights(1.0, str(path), unet)
    assert len(net.loras) == len({k.split(".")[0] for k in weights})  # every module found its layer
    net.apply_to()
    try:
        return unet_output(unet, inputs) - base
    finally:
        net.restore()


def through_lora_mini(src, tmp_path, to=None, **read_options):
    """src -> LoRA-Mini (svd outers: near-lossless) -> file on disk -> standard adapter -> written."""
    adapter = formats.read(src, **read_options) if read_options else lc.load_adapter(src)
    lc.save(lc.compress(adapter, outer="svd"), tmp_path / "mini")
    back = lc.reconstruct(lc.load(tmp_path / "mini"))
    out = tmp_path / ("out.safetensors" if to in (None, "kohya", "lycoris") else "out")
    lc.save_adapter(back, out, to)
    return out


def rel(a, b):
    return float((a - b).norm() / b.norm())


CASES = {
    "loha": dict(algo="loha", linear_dim=4, linear_alpha=2),
    "loha-tucker": dict(algo="loha", linear_dim=4, linear_alpha=2, use_tucker=True),
    # factor 4 on 4 input channels: conv_in's lokr_w1 is (4, 1), a size-1 factor
    "lokr-factor4": dict(algo="lokr", linear_dim=4, linear_alpha=2, factor=4),
    # rank 2 < half of w2: w2 is decomposed, and conv kernels are flattened into lokr_w2_b
    "lokr-decomposed": dict(algo="lokr", linear_dim=2, linear_alpha=1, factor=2),
    "lokr-decomposed-tucker": dict(algo="lokr", linear_dim=2, linear_alpha=1, factor=2, use_tucker=True),
    "locon": dict(algo="locon", linear_dim=4, linear_alpha=2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lycoris_network_round_trip_loads_in_lycoris_with_the_same_effect(case, unet, inputs, tmp_path):
    """Conv modules come back with 4-D kernels (LyCORIS's LoCon loader copies them into conv
    weights), in LyCORIS's own lycoris_ naming, for every algorithm."""
    src = tmp_path / "src.safetensors"
    want = make_network(unet, inputs, src, metadata=SD1, **CASES[case])
    out = through_lora_mini(src, tmp_path)
    assert formats.detect(out) == "lycoris"  # LoCon pairs under the lycoris_ prefix
    assert rel(lycoris_delta(unet, inputs, out), want) < 1e-4


def test_conv_kinds_are_kept_in_the_lora_mini_file(unet, inputs, tmp_path):
    src = tmp_path / "src.safetensors"
    make_network(unet, inputs, src, metadata=SD1, **CASES["loha"])
    lc.save(lc.compress(lc.load_adapter(src), outer="svd"), tmp_path / "mini")
    mini = lc.load(tmp_path / "mini")
    kinds = {n: (m.kind, m.kernel.get("down_shape", [None])[1:]) for n in mini.module_names
             for m in [mini.module(n)]}
    assert kinds["conv_in"] == ("conv", [4, 3, 3])
    assert kinds["down_blocks.1.resnets.0.conv_shortcut"] == ("conv", [16, 1, 1])
    assert kinds["down_blocks.0.attentions.0.proj_in"] == ("conv", [16, 1, 1])  # SD1.x: a 1x1 conv
    assert kinds["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == ("linear", [])


def test_a_flattened_kernel_nothing_can_tell_is_refused_with_the_remedy(unet, inputs, tmp_path):
    """No SD1.x/SD2.x hint: proj_in may be a 1x1 conv or a linear layer; writing it either way
    could be wrong, so reconstruct exits 2 naming the module and the remedy, writing nothing."""
    src = tmp_path / "src.safetensors"
    want = make_network(unet, inputs, src, **CASES["loha"])
    assert run("compress", src, "-o", tmp_path / "mini", "--outer", "svd").exit_code == 0
    result = run("reconstruct", tmp_path / "mini", "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "proj_in" in result.output and "conv_kernels" in result.output
    assert not (tmp_path / "out.safetensors").exists()
    # the remedy: say what the layers are when reading the source
    kernels = {n: (1, 1) for n in lc.load_adapter(src).config["kernel_unknown"]}
    out = through_lora_mini(src, tmp_path, conv_kernels=kernels)
    assert rel(lycoris_delta(unet, inputs, out), want) < 1e-4


def test_lycoris_to_diffusers_loads_in_diffusers(unet, inputs, tmp_path):
    """A LoHa of a UNet (lycoris_ names infer the component) written as diffusers: conv factors
    are 4-D, which PEFT's conv layers need."""
    src = tmp_path / "src.safetensors"
    want = make_network(unet, inputs, src, metadata=SD1, **CASES["loha"])
    out = through_lora_mini(src, tmp_path, to="diffusers")
    unet2 = tiny_unet()
    base = unet_output(unet2, inputs)
    unet2.load_lora_adapter(str(out / "pytorch_lora_weights.safetensors"), prefix="unet", adapter_name="x")
    assert rel(unet_output(unet2, inputs) - base, want) < 1e-4


def kohya_delta(unet, inputs, path):
    """The change LyCORIS makes with the lora_unet_ file at `path`, each module built by LyCORIS's
    own state-dict loader (get_module / make_module, what lycoris.kohya.create_network_from_weights
    runs per module; that function itself also scans a whole SD pipeline, which a bare UNet is not)."""
    from lycoris.modules import get_module, make_module
    from safetensors.torch import load_file

    weights = load_file(path)
    layers = {f"lora_unet_{n}".replace(".", "_"): m for n, m in unet.named_modules()}
    stems = {k.split(".")[0] for k in weights}
    assert stems <= set(layers)  # every module names a layer of the UNet
    base = unet_output(unet, inputs)
    modules = [make_module(*get_module(weights, stem), stem, layers[stem]) for stem in sorted(stems)]
    for m in modules:
        m.multiplier = 1.0
        m.apply_to()
    try:
        return unet_output(unet, inputs) - base
    finally:
        for m in modules:
            m.restore()


@pytest.mark.parametrize("case", ["loha", "loha-tucker", "lokr-decomposed"])
def test_kohya_named_lycoris_file_comes_back_with_4d_conv_kernels(case, unet, inputs, tmp_path):
    """The same networks under kohya's lora_unet_ prefix (what sd-scripts + LyCORIS write for SD1.x):
    `reconstruct` writes plain LoCon pairs that LyCORIS's kohya loader puts on the conv layers."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "lycoris.safetensors"
    want = make_network(unet, inputs, src, metadata=SD1, **CASES[case])
    kohya_src = tmp_path / "src.safetensors"
    save_file({k.replace("lycoris_", "lora_unet_", 1): v for k, v in load_file(src).items()}, kohya_src, SD1)
    out = through_lora_mini(kohya_src, tmp_path, to="kohya")
    assert formats.detect(out) == "kohya"
    written = load_file(out)
    assert written["lora_unet_conv_in.lora_down.weight"].dim() == 4
    assert written["lora_unet_down_blocks_1_resnets_0_conv_shortcut.lora_down.weight"].dim() == 4  # 1x1 conv
    assert rel(kohya_delta(unet, inputs, out), want) < 1e-4


class Small(torch.nn.Module):
    """Any torch model: create_lycoris names its modules lycoris_<path>."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 8, 1))
        self.classifier_head = torch.nn.Linear(8 * 16, 10)

    def forward(self, x):
        return self.classifier_head(self.features(x).flatten(1))


@pytest.mark.parametrize("algo", ["locon", "loha"])
def test_generic_lycoris_file_is_written_back_in_its_own_naming(algo, tmp_path):
    model = Small().eval()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    src = tmp_path / "src.safetensors"
    from lycoris import create_lycoris, create_lycoris_from_weights

    with torch.no_grad():
        base = model(x)
        net = create_lycoris(model, 1.0, linear_dim=2, linear_alpha=1, algo=algo)
        net.apply_to()
        g = torch.Generator().manual_seed(1)
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        want = model(x) - base
        net.save_weights(str(src), torch.float32, {})
        net.restore()
    options = {}
    if algo == "loha":  # flattened kernels of a model no table knows: refused until the user says
        assert run("compress", src, "-o", tmp_path / "m", "--outer", "svd").exit_code == 0
        result = run("reconstruct", tmp_path / "m", "-o", tmp_path / "refused.safetensors")
        assert result.exit_code == 2 and "classifier.head" in result.output and "conv_kernels" in result.output
        options["conv_kernels"] = {"features.0": (3, 3), "features.2": (1, 1), "classifier.head": ()}
    out = through_lora_mini(src, tmp_path, **options)
    assert {k.split(".")[0] for k in lc.load_adapter(out).module_names} >= {"features", "classifier"}
    with torch.no_grad():
        net, _ = create_lycoris_from_weights(1.0, str(out), model)
        assert len(net.loras) == 3
        net.apply_to()
        got = model(x) - base
        net.restore()
    assert rel(got, want) < 1e-4
