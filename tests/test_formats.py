"""Every on-disk layout: detection, reading, writing, conversion with scale kept, failures.

Fixtures come from scripts/make_format_fixtures.py (the diffusers ones from diffusers' own
converters, the PEFT one from PEFT). Updates are compared from the factors, scale included.
"""
import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora_convert as lc
from helpers.cli import run_cli as run
from lora_convert import formats
from lora_convert.adapter import LoraModule, from_modules
from lora_convert.errors import BadInputError, FormatDetectionError, UnsupportedError
from lora_convert.formats import kohya as kohya_format
from lora_convert.formats import naming
from lora_convert.factored import relative_error

ROOT = Path(__file__).resolve().parents[1]
FX = ROOT / "fixtures" / "formats"

FIXTURES = {  # path -> (format it is, format its default write reads back as)
    "kohya-sd15.safetensors": ("kohya", "kohya"),
    "kohya-sdxl.safetensors": ("kohya", "kohya"),
    "kohya-locon.safetensors": ("kohya", "kohya"),
    "kohya-flux.safetensors": ("kohya", "kohya"),
    "lycoris-loha.safetensors": ("lycoris", "kohya"),
    "lycoris-lokr.safetensors": ("lycoris", "kohya"),
    "diffusers-sd15": ("diffusers", "diffusers"),
    "diffusers-sdxl.safetensors": ("diffusers", "diffusers"),
    "mlx-tiny-llama": ("mlx", "mlx"),
    "peft-conv-emb": ("peft", "peft"),
}
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}



def delta_error(a: LoraModule, b: LoraModule) -> float:
    """Relative error between the two modules' updates scale·B·A, from the factors."""
    return relative_error(*(t.numpy() for t in (a.up.double() * a.scale, a.down.double(), b.up.double() * b.scale,
                                                b.down.double())))


def assert_same_updates(expected: lc.Adapter, got: lc.Adapter, tol=None):
    assert sorted(got.module_names) == sorted(expected.module_names)
    for m in expected.modules():
        g = got.module(m.name)
        assert g.kind == m.kind, m.name
        if m.kind == "conv":
            assert g.kernel["down_shape"][1:] == m.kernel["down_shape"][1:], m.name
        assert delta_error(m, g) < (tol or TOL[m.dtype]), m.name


def out_path(tmp_path, fmt, stem="out"):
    return tmp_path / (f"{stem}.safetensors" if fmt in ("kohya", "lycoris") else stem)


# ------------------------------------------------------------------ detection and reading

@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_each_fixture_matches_exactly_one_layout(name):
    hits = [fmt for fmt, mod in formats.REGISTRY.items() if mod.detect(FX / name)]
    assert hits == [FIXTURES[name][0]]


def test_existing_peft_fixture_is_still_only_peft(fixtures):
    assert [f for f, m in formats.REGISTRY.items() if m.detect(fixtures / "peft-tiny-llama")] == ["peft"]


@pytest.mark.parametrize("name,label", [("kohya-sd15.safetensors", "kohya (SD1.x/2.x)"),
                                        ("kohya-sdxl.safetensors", "kohya (SDXL)"),
                                        ("kohya-flux.safetensors", "kohya (Flux)"),
                                        ("lycoris-loha.safetensors", "LyCORIS (LoHa; SD1.x/2.x)"),
                                        ("diffusers-sdxl.safetensors", "diffusers LoRA (text_encoder, "
                                                                       "text_encoder_2, unet)")])
def test_label_names_the_variant(name, label):
    assert formats.label(lc.load_adapter(FX / name)) == label


def test_kohya_reading_rules():
    a = lc.load_adapter(FX / "kohya-sd15.safetensors")
    to_k = a.module("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
    assert to_k.alpha == to_k.rank == 4 and to_k.scale == 1.0  # no alpha key: alpha = rank
    conv = a.module("unet.down_blocks.0.resnets.0.conv1")
    assert conv.kind == "conv" and conv.kernel == {"down_shape": [4, 32, 3, 3], "up_shape": [32, 4, 1, 1]}
    assert tuple(conv.down.shape) == (4, 32 * 9) and conv.scale == 0.25
    assert a.metadata["ss_network_dim"] == "8"
    assert {m.rank for m in a.modules()} == {4, 8}  # mixed ranks


@pytest.mark.parametrize("sdxl", [False, True])
def test_kohya_names_agree_with_diffusers_own_converter(sdxl):
    """The diffusers fixtures were made from the kohya ones by diffusers' converters."""
    kohya = lc.load_adapter(FX / ("kohya-sdxl.safetensors" if sdxl else "kohya-sd15.safetensors"))
    diff = lc.load_adapter(FX / ("diffusers-sdxl.safetensors" if sdxl else "diffusers-sd15"))
    assert_same_updates(kohya, diff, tol=1e-6)


def test_locon_tucker_core_folds_exactly():
    a = lc.load_adapter(FX / "kohya-locon.safetensors")
    raw = load_file(FX / "kohya-locon.safetensors")
    stem = "lora_unet_down_blocks_0_resnets_0_conv1"
    down, mid, up = (raw[f"{stem}.lora_{r}.weight"].double() for r in ("down", "mid", "up"))
    dense = torch.einsum("oa,abhw,bi->oihw", up[:, :, 0, 0], mid, down[:, :, 0, 0]) * 2.0 / 4
    m = a.module("unet.down_blocks.0.resnets.0.conv1")
    got = (m.scale * m.up.double() @ m.down.double()).reshape(dense.shape)
    assert torch.allclose(got, dense, rtol=0, atol=1e-6 * dense.abs().max())


# ------------------------------------------------------------------ LyCORIS

def _tucker(t, a, b):
    return torch.einsum("ijkl,jr,ip->prkl", t, b, a)


def loha_dense(raw, s):
    def factor(n):
        if f"{s}.hada_t{n}" in raw:
            return _tucker(raw[f"{s}.hada_t{n}"], raw[f"{s}.hada_w{n}_a"], raw[f"{s}.hada_w{n}_b"])
        return raw[f"{s}.hada_w{n}_a"] @ raw[f"{s}.hada_w{n}_b"]
    alpha = raw.get(f"{s}.alpha")
    scale = float(alpha) / raw[f"{s}.hada_w1_b"].shape[0] if alpha is not None else 1.0
    return factor(1) * factor(2) * scale


def lokr_dense(raw, s):
    get = raw.get
    dim = None
    w1 = get(f"{s}.lokr_w1")
    if w1 is None:
        w1, dim = get(f"{s}.lokr_w1_a") @ get(f"{s}.lokr_w1_b"), get(f"{s}.lokr_w1_b").shape[0]
    w2 = get(f"{s}.lokr_w2")
    if w2 is None:
        dim = get(f"{s}.lokr_w2_b").shape[0]
        w2 = _tucker(get(f"{s}.lokr_t2"), get(f"{s}.lokr_w2_a"), get(f"{s}.lokr_w2_b")) if f"{s}.lokr_t2" in raw \
            else get(f"{s}.lokr_w2_a") @ get(f"{s}.lokr_w2_b")
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = float(get(f"{s}.alpha")) / dim if get(f"{s}.alpha") is not None and dim is not None else 1.0
    return torch.kron(w1.contiguous(), w2.contiguous()) * scale


@pytest.mark.parametrize("name,dense", [("lycoris-loha", loha_dense), ("lycoris-lokr", lokr_dense)])
def test_lycoris_converts_to_an_equivalent_lora_and_reports_the_error(name, dense):
    path = FX / f"{name}.safetensors"
    raw = {k: v.double() for k, v in load_file(path).items()}
    a = lc.load_adapter(path)
    stems = {k.split(".")[0] for k in raw}
    assert len(a) == len(stems)
    for stem in stems:
        ref = dense(raw, stem)
        m = a.module(naming.kohya_to_module(stem)[0])
        got = (m.scale * m.up.double() @ m.down.double()).reshape(ref.shape)
        err = float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref))
        assert err < 1e-6, stem
        assert m.conversion_error == pytest.approx(err, rel=0.5, abs=1e-7)
        assert m.rank <= min(m.out_features, m.in_features)
    reported = a.config["conversion"]["rel_error"]
    assert set(reported) == set(a.module_names) and max(reported.values()) < 1e-6


def test_lycoris_tolerance_truncates_and_reports_the_real_error():
    path = FX / "lycoris-loha.safetensors"
    exact, loose = lc.load_adapter(path), formats.read(path, "lycoris", lycoris_tol=0.3)
    for m in exact.modules():
        t = loose.module(m.name)
        assert t.rank <= m.rank
        assert 0.0 < t.conversion_error <= 0.3 + 1e-6
        assert delta_error(m, t) == pytest.approx(t.conversion_error, rel=1e-3, abs=1e-6)
    assert any(loose.module(n).rank < exact.module(n).rank for n in exact.module_names)


# ------------------------------------------------------------------ round trips

@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_round_trip_through_lora_mini_keeps_every_update(name, tmp_path):
    """format -> LoRA-Mini (svd outers, full rank) -> default layout -> the same update per module."""
    src = lc.load_adapter(FX / name)
    lc.save(lc.compress(src, outer="svd", dtype="fp32"), tmp_path / "mini")
    mini = lc.load(tmp_path / "mini")
    assert mini.source_format == FIXTURES[name][0]
    restored = lc.reconstruct(mini)
    dest = out_path(tmp_path, FIXTURES[name][1], "restored")
    lc.save_adapter(restored, dest)
    back = lc.load_adapter(dest)
    assert back.format == FIXTURES[name][1]
    assert_same_updates(src, back)
    if FIXTURES[name][0] == "lycoris":  # the conversion error travels with the LoRA-Mini file
        assert set(mini.source_config["conversion"]["rel_error"]) == set(src.module_names)


CHAINS = [
    ("kohya-sdxl.safetensors", ["diffusers", "kohya"]),
    ("kohya-sd15.safetensors", ["peft", "kohya"]),
    ("kohya-flux.safetensors", ["peft", "kohya"]),
    ("diffusers-sdxl.safetensors", ["kohya", "peft", "diffusers"]),
    ("lycoris-lokr.safetensors", ["diffusers", "kohya"]),
    ("mlx-tiny-llama", ["peft", "mlx"]),
    ("kohya-locon.safetensors", ["diffusers"]),
]


@pytest.mark.parametrize("name,chain", CHAINS, ids=[f"{n}->{'->'.join(c)}" for n, c in CHAINS])
def test_conversion_chains_keep_every_update(name, chain, tmp_path):
    src = current = lc.load_adapter(FX / name)
    for i, fmt in enumerate(chain):
        dest = out_path(tmp_path, fmt, f"step{i}")
        lc.save_adapter(current, dest, fmt)
        current = lc.load_adapter(dest)
        assert current.format == fmt
    assert_same_updates(src, current)


def test_kohya_sdxl_keys_survive_a_trip_through_diffusers(tmp_path):
    lc.save_adapter(lc.load_adapter(FX / "kohya-sdxl.safetensors"), tmp_path / "d.safetensors", "diffusers")
    lc.save_adapter(lc.load_adapter(tmp_path / "d.safetensors"), tmp_path / "k.safetensors", "kohya")
    original = set(load_file(FX / "kohya-sdxl.safetensors"))
    assert set(load_file(tmp_path / "k.safetensors")) == original  # SGM names, lora_te1_/lora_te2_


def test_peft_llm_to_mlx_and_back(fixtures, tmp_path):
    src = lc.load_adapter(fixtures / "peft-tiny-llama")
    lc.save_adapter(src, tmp_path / "mlx", "mlx")
    cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == 2
    assert cfg["lora_parameters"]["scale"] == 2 and cfg["lora_parameters"]["rank"] == 8
    assert "self_attn.q_proj" in cfg["lora_parameters"]["keys"]
    with safe_open(tmp_path / "mlx" / "adapters.safetensors", "pt") as fh:
        assert fh.get_slice("model.layers.0.self_attn.q_proj.lora_a").get_shape() == [64, 8]  # in × r
    lc.save_adapter(lc.load_adapter(tmp_path / "mlx"), tmp_path / "peft", "peft")
    assert_same_updates(src, lc.load_adapter(tmp_path / "peft"))


def test_mlx_embedding_becomes_a_peft_embedding(tmp_path):
    lc.save_adapter(lc.load_adapter(FX / "mlx-tiny-llama"), tmp_path / "peft", "peft")
    keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys


def _mixed_adapter():
    g = torch.Generator().manual_seed(5)
    mods = []
    for i, (r, alpha, rs) in enumerate([(4, 8.0, False), (8, 16.0, False), (2, 3.0, True), (8, 16.0, False)]):
        mods.append(LoraModule(f"model.layers.{i}.mlp.up_proj", torch.randn(r, 24, generator=g),
                               torch.randn(32, r, generator=g), alpha, use_rslora=rs))
    return from_modules("peft", mods)


def test_mlx_folds_per_module_scales_and_pads_ranks(tmp_path):
    src = _mixed_adapter()
    lc.save_adapter(src, tmp_path / "mlx", "mlx")
    cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["scale"] == 2 and cfg["lora_parameters"]["rank"] == 8
    note = cfg["lora_convert"]
    assert sorted(note["scale_folded_into_factors"]) == ["model.layers.2.mlp.up_proj"]
    assert sorted(note["rank_zero_padded"]) == ["model.layers.0.mlp.up_proj", "model.layers.2.mlp.up_proj"]
    assert_same_updates(src, lc.load_adapter(tmp_path / "mlx"))


def test_peft_mixed_scales_and_rslora_survive_kohya_style_alpha(tmp_path):
    """rsLoRA scale alpha/sqrt(r) written where the layout divides by r: alpha is rescaled exactly."""
    src = from_modules("peft", [LoraModule("unet.down_blocks.0.attentions.0.proj_in", torch.randn(4, 16),
                                           torch.randn(16, 4), 6.0, use_rslora=True)])
    lc.save_adapter(src, tmp_path / "k.safetensors", "kohya")
    assert_same_updates(src, lc.load_adapter(tmp_path / "k.safetensors"), tol=1e-7)


def test_diffusers_write_folds_scale_and_says_so(tmp_path):
    src = lc.load_adapter(FX / "kohya-sdxl.safetensors")
    lc.save_adapter(src, tmp_path / "out", "diffusers")
    file = tmp_path / "out" / "pytorch_lora_weights.safetensors"
    with safe_open(file, "pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["lora_convert"])["scale_folded_into_factors"] is True
    cfg = json.loads(meta["lora_adapter_metadata"])
    assert cfg["unet.r"] == cfg["unet.lora_alpha"] and cfg["unet.alpha_pattern"] == cfg["unet.rank_pattern"]
    back = lc.load_adapter(tmp_path / "out")
    assert {m.scale for m in back.modules()} == {1.0}
    assert_same_updates(src, back)


def test_kohya_write_updates_ss_metadata(tmp_path):
    lc.save_adapter(lc.load_adapter(FX / "kohya-locon.safetensors"), tmp_path / "k.safetensors")
    with safe_open(tmp_path / "k.safetensors", "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_training_comment"] == "lora_convert test fixture"  # kept
    assert meta["ss_network_module"] == "networks.lora"  # Tucker cores are folded: plain LoRA now
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "4")
    args = json.loads(meta["ss_network_args"])
    assert "algo" not in args and args["conv_dim"] == "4"
    assert "sshs_legacy_hash" not in meta
    raw = (tmp_path / "k.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert not any("lora_mid" in k for k in load_file(tmp_path / "k.safetensors"))


def test_diffusers_destination_decides_file_or_directory(tmp_path):
    src = lc.load_adapter(FX / "kohya-sd15.safetensors")
    lc.save_adapter(src, tmp_path / "one.safetensors", "diffusers")
    lc.save_adapter(src, tmp_path / "dir", "diffusers")
    assert (tmp_path / "one.safetensors").is_file()
    assert (tmp_path / "dir" / "pytorch_lora_weights.safetensors").is_file()


# ------------------------------------------------------------------ naming

def test_underscored_names_split_on_known_identifiers():
    f = naming.underscored_to_dotted
    assert f("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0") == \
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    assert f("text_model_encoder_layers_11_self_attn_q_proj") == "text_model.encoder.layers.11.self_attn.q_proj"
    assert f("double_blocks_0_img_attn_qkv") == "double_blocks.0.img_attn.qkv"
    assert f("time_in_in_layer") == "time_in.in_layer"


def _sdxl_sgm_names():
    res = ["in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection"]
    att = ["proj_in", "transformer_blocks.3.attn2.to_v", "transformer_blocks.0.ff.net.0.proj", "proj_out"]
    names = ["input_blocks.0.0", "out.2", "time_embed.0", "time_embed.2", "label_emb.0.0", "label_emb.0.2",
             "input_blocks.3.0.op", "input_blocks.6.0.op", "output_blocks.2.2.conv", "output_blocks.5.2.conv"]
    for n in range(1, 9):
        if n in (3, 6):
            continue
        names += [f"input_blocks.{n}.0.{r}" for r in res] + [f"input_blocks.{n}.1.{a}" for a in att if n > 3]
    names += [f"middle_block.{i}.{r}" for i in (0, 2) for r in res] + [f"middle_block.1.{a}" for a in att]
    for n in range(9):
        names += [f"output_blocks.{n}.0.{r}" for r in res] + [f"output_blocks.{n}.1.{a}" for a in att if n < 6]
    return names


def test_sgm_and_diffusers_unet_names_map_both_ways():
    names = _sdxl_sgm_names()
    mapped = [naming.sgm_to_diffusers(n) for n in names]
    assert len(set(mapped)) == len(names)
    assert not any(m.split(".")[0] in naming.SGM_ROOTS for m in mapped)
    assert [naming.diffusers_to_sgm(m) for m in mapped] == names
    assert naming.sgm_to_diffusers("input_blocks.4.1.transformer_blocks.0.attn1.to_q") == \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert naming.sgm_to_diffusers("output_blocks.2.2.conv") == "up_blocks.0.upsamplers.0.conv"
    assert naming.sgm_to_diffusers("middle_block.2.emb_layers.1") == "mid_block.resnets.1.time_emb_proj"


# ------------------------------------------------------------------ failures

def _assert_one_line_error(res, *needles):
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in res.output
    for needle in needles:
        assert needle in err, err


def test_unknown_keys_fail_with_the_keys_listed_and_no_output(tmp_path):
    res = run("convert", FX / "bad-unknown.safetensors", "-o", tmp_path / "out", "--to", "peft")
    _assert_one_line_error(res, "not a recognised LoRA layout", "model.decoder.weight")
    assert list(tmp_path.iterdir()) == []


def test_a_file_matching_two_layouts_is_refused(tmp_path):
    res = run("compress", FX / "bad-ambiguous.safetensors", "-o", tmp_path / "mini")
    _assert_one_line_error(res, "ambiguous", "kohya", "diffusers")
    assert list(tmp_path.iterdir()) == []
    res = run("convert", FX / "bad-ambiguous.safetensors", "--from", "kohya", "-o", tmp_path / "o", "--to", "peft")
    _assert_one_line_error(res, "unknown keys", "unet.down_blocks.0.resnets.0.conv2.lora_A.weight")
    assert list(tmp_path.iterdir()) == []


def test_unknown_keys_inside_a_detected_layout_are_listed(tmp_path):
    tensors = load_file(FX / "kohya-flux.safetensors")
    tensors["lora_unet_double_blocks_0_img_attn_qkv.weird"] = torch.zeros(2)
    save_file(tensors, tmp_path / "x.safetensors")
    with pytest.raises(BadInputError, match=r"unknown keys.*lora_unet_double_blocks_0_img_attn_qkv\.weird"):
        lc.load_adapter(tmp_path / "x.safetensors")


def test_layouts_that_cannot_hold_a_module_refuse_before_publishing(tmp_path):
    res = run("convert", FX / "kohya-sd15.safetensors", "-o", tmp_path / "mlx", "--to", "mlx")
    _assert_one_line_error(res, "diffusion pipeline")
    res = run("convert", FX / "peft-conv-emb", "-o", tmp_path / "k.safetensors", "--to", "kohya")
    _assert_one_line_error(res)
    assert list(tmp_path.iterdir()) == []


def test_detect_raises_for_a_layout_error_not_a_guess():
    with pytest.raises(FormatDetectionError):
        formats.detect(FX / "bad-unknown.safetensors")
    with pytest.raises(UnsupportedError):
        lc.save_adapter(lc.load_adapter(FX / "peft-conv-emb"), FX / "never-written", "diffusers")
    assert not (FX / "never-written").exists()


# ------------------------------------------------------------------ CLI

def test_cli_compress_any_format_and_reconstruct_to_any(tmp_path):
    src = FX / "kohya-sdxl.safetensors"
    assert run("compress", src, "-o", tmp_path / "mini", "--outer", "svd", "--dtype", "fp32").exit_code == 0
    res = run("reconstruct", tmp_path / "mini", "-o", tmp_path / "back.safetensors")
    assert res.exit_code == 0, res.output
    assert formats.detect(tmp_path / "back.safetensors") == "kohya"  # the source layout by default
    res = run("reconstruct", tmp_path / "mini", "-o", tmp_path / "diff", "--to", "diffusers")
    assert res.exit_code == 0, res.output
    assert_same_updates(lc.load_adapter(src), lc.load_adapter(tmp_path / "diff"))
    res = run("convert", src, "-o", tmp_path / "peft", "--to", "peft")
    assert res.exit_code == 0 and formats.detect(tmp_path / "peft") == "peft"


def test_peft_drops_a_single_component_prefix_and_gets_it_back(tmp_path):
    src = lc.load_adapter(FX / "kohya-sdxl.safetensors")
    unet = from_modules("kohya", [m for m in src.modules() if m.name.startswith("unet.")],
                        config=src.config)
    lc.save_adapter(unet, tmp_path / "peft", "peft")
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert "base_model.model.down_blocks.1.attentions.0.proj_in.lora_A.weight" in keys  # loads onto a UNet
    lc.save_adapter(lc.load_adapter(tmp_path / "peft"), tmp_path / "k.safetensors", "kohya")
    assert set(load_file(tmp_path / "k.safetensors")) == {k for k in load_file(FX / "kohya-sdxl.safetensors")
                                                          if k.startswith("lora_unet_")}


def test_peft_writes_mixed_rslora_as_plain_alphas(tmp_path):
    g = torch.Generator().manual_seed(3)
    src = from_modules("diffusers", [
        LoraModule("unet.down_blocks.0.attentions.0.proj_in", torch.randn(4, 8, generator=g),
                   torch.randn(8, 4, generator=g), 4.0, use_rslora=True),
        LoraModule("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", torch.randn(2, 8, generator=g),
                   torch.randn(8, 2, generator=g), 4.0)])
    lc.save_adapter(src, tmp_path / "peft", "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False
    assert_same_updates(src, lc.load_adapter(tmp_path / "peft"), tol=1e-7)


def test_comfyui_prefixed_sdxl_file_reads_like_the_kohya_one(tmp_path):
    """ComfyUI keys: the SGM UNet's dotted paths under diffusion_model., CLIP under text_encoders.*."""
    kohya = lc.load_adapter(FX / "kohya-sdxl.safetensors")
    prefixes = {"unet": "diffusion_model.", "text_encoder": "text_encoders.clip_l.transformer.",
                "text_encoder_2": "text_encoders.clip_g.transformer."}
    tensors = {}
    for m in kohya.modules():
        comp, path = naming.split_component(m.name)
        stem = prefixes[comp] + (naming.diffusers_to_sgm(path) if comp == "unet" else path)
        down, up = kohya_format.kernel_factors(m)
        tensors |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                    f"{stem}.alpha": torch.tensor(m.alpha)}
    assert any(k.startswith("diffusion_model.input_blocks.4.1.") for k in tensors)
    save_file(tensors, tmp_path / "comfy.safetensors")
    assert formats.detect(tmp_path / "comfy.safetensors") == "kohya"
    comfy = lc.load_adapter(tmp_path / "comfy.safetensors")
    assert formats.label(comfy) == "kohya (SDXL)"
    assert_same_updates(kohya, comfy, tol=1e-6)
