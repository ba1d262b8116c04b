"""`inspect` describes adapters from headers and stored bytes (formats.scan) and LoRA-Mini files
from their header and stored bytes (containerspec), without torch, and finds exactly what reading
them finds: the same modules, and the same refusals."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_convert as lc
from lora_convert import container, formats, inspect
from lora_convert.formats import kohya as kohya_format
from lora_convert.formats import naming
from lora_convert.st import DTYPE_NAMES, LazyTensors, dtype_name, require_finite

ROOT = Path(__file__).resolve().parents[1]
FX = ROOT / "fixtures"
BAD = FX / "bad"
MANIFEST = json.loads((BAD / "manifest.json").read_text())
# one file of every layout scan describes (kohya-locon has Tucker cores, peft-conv-emb conv and
# embedding modules, kohya-flux BFL names)
SCANNED = [FX / "peft-tiny-llama", FX / "peft-tiny-llama-fp16", FX / "peft-tiny-llama-patterns",
           FX / "formats" / "peft-conv-emb", FX / "formats" / "kohya-sd15.safetensors",
           FX / "formats" / "kohya-sdxl.safetensors", FX / "formats" / "kohya-locon.safetensors",
           FX / "formats" / "kohya-flux.safetensors", FX / "formats" / "diffusers-sd15",
           FX / "formats" / "diffusers-sdxl.safetensors", FX / "formats" / "mlx-tiny-llama",
           FX / "formats" / "lycoris-loha.safetensors", FX / "formats" / "lycoris-lokr.safetensors"]
FIELDS = ("name", "kind", "kernel", "rank", "out_features", "in_features", "alpha", "use_rslora", "scale")


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory) -> Path:
    """A ComfyUI-named SDXL LoRA (diffusion_model. / text_encoders.clip_*.transformer. keys)."""
    prefixes = {"unet": "diffusion_model.", "text_encoder": "text_encoders.clip_l.transformer.",
                "text_encoder_2": "text_encoders.clip_g.transformer."}
    tensors = {}
    for m in lc.load_adapter(FX / "formats" / "kohya-sdxl.safetensors").modules():
        comp, path = naming.split_component(m.name)
        stem = prefixes[comp] + (naming.diffusers_to_sgm(path) if comp == "unet" else path)
        down, up = kohya_format.kernel_factors(m)
        tensors |= {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up, f"{stem}.alpha": torch.tensor(m.alpha)}
    out = tmp_path_factory.mktemp("comfy") / "comfy.safetensors"
    save_file(tensors, out)
    return out


@pytest.fixture(scope="module")
def minis(tmp_path_factory) -> list[Path]:
    """LoRA-Mini files of each kind: plain (version 1, a directory; svd outers in bf16), quantized
    (version 3: random outers, svd outers, a --target-size budget) and quantized version 2."""
    d = tmp_path_factory.mktemp("minis")
    src = lc.load_adapter(FX / "peft-tiny-llama")
    made = {"plain-random": (lc.compress(src, outer_dim=16, rank=4), {}),
            "plain-svd-bf16.safetensors": (lc.compress(src, outer="svd", dtype="bf16", rank=3), {}),
            "q4-random.safetensors": (lc.compress(src, bits=4, outer_stream="module"), {}),
            "q3-svd.safetensors": (lc.compress(src, outer="svd", bits=3, rank=2), {}),
            "budget.safetensors": (lc.compress(src, target_size="4x"), {}),
            "v2-q8.safetensors": (lc.compress(src, bits=8), {"format_version": 2})}
    for name, (mini, opts) in made.items():
        container.save(mini, d / name, **opts)
    return [d / name for name in made]


@pytest.fixture(scope="module")
def bf16_peft(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bf16") / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text((FX / "peft-tiny-llama" / "adapter_config.json").read_text())
    tensors = load_file(FX / "peft-tiny-llama" / "adapter_model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, d / "adapter_model.safetensors")
    return d


def _read_rows(path) -> list[dict]:
    return [{**{f: getattr(m, f) for f in FIELDS}, "dtype": dtype_name(m.dtype)}
            for m in formats.read(path).modules()]


@pytest.mark.parametrize("path", SCANNED, ids=lambda p: p.name)
def test_scan_describes_every_module_as_read_does(path):
    header = formats.scan(path)
    assert header is not None and header.module_names == formats.read(path).module_names
    assert [{**{f: getattr(m, f) for f in FIELDS}, "dtype": m.dtype} for m in header.modules] == _read_rows(path)
    assert formats.label(header) == formats.label(formats.read(path))
    errors = [getattr(m, "conversion_error", None) for m in formats.read(path).modules()]
    assert [m.conversion_error for m in header.modules] == errors  # LyCORIS: the same conversion
    assert (path.name.startswith("lycoris")) == all(e is not None and 0 <= e < 1e-6 for e in errors)


def test_scan_of_comfyui_and_bf16_files(comfyui, bf16_peft):
    for path in (comfyui, bf16_peft):
        assert [{**{f: getattr(m, f) for f in FIELDS}, "dtype": m.dtype}
                for m in formats.scan(path).modules] == _read_rows(path)
    assert {m.dtype for m in formats.scan(bf16_peft).modules} == {"bfloat16"}


def test_layouts_that_need_tensors_are_read():
    """A PEFT pickle needs torch.load: no scan. LyCORIS modules are converted (numpy) and scanned."""
    assert formats.scan(BAD / "_valid" / "peft-pickle", allow_pickle=True) is None
    doc = inspect.describe(str(FX / "formats" / "lycoris-loha.safetensors"))
    assert doc["modules"] and all("conversion_error" in r for r in doc["modules"])


def test_lycoris_tolerance_reaches_the_scan():
    """--lycoris-tol's option truncates in scan as in read (rank and the error it reports)."""
    path = FX / "formats" / "lycoris-loha.safetensors"
    scanned = formats.scan(path, "lycoris", lycoris_tol=0.3).modules
    read = list(formats.read(path, "lycoris", lycoris_tol=0.3).modules())
    assert [(m.rank, m.conversion_error) for m in scanned] == [(m.rank, m.conversion_error) for m in read]
    assert any(m.conversion_error > 1e-3 for m in scanned)


def _mini_rows(path) -> list[dict]:
    """inspect's rows of a LoRA-Mini file as loading its modules (torch) gives them."""
    return [{"name": m.name, "shape": [m.out_features, m.in_features], "rank": m.rank, "inner_rank": m.inner_rank,
             "outer": m.outer, "fidelity": m.fidelity, "bits": m.bits, "quant": m.quant or None}
            for m in container.load(path).modules()]


def test_mini_files_are_described_as_loading_describes_them(minis):
    for path in minis:
        doc = inspect.describe(path)
        assert doc["modules"] == _mini_rows(path), path.name
        assert doc["source_format"] == container.load(path).source_format == "peft"
    bits = {p.name: {r["bits"] for r in inspect.describe(p)["modules"]} for p in minis}
    assert bits["plain-random"] == {32.0} and bits["plain-svd-bf16.safetensors"] == {16.0}
    assert all(4 < b < 5 for b in bits["q4-random.safetensors"]) and len(bits["budget.safetensors"]) > 1


MINI_CASES = sorted(n for n in MANIFEST["cases"] if n.startswith("mini_"))


@pytest.mark.parametrize("name", MINI_CASES)
def test_inspect_refuses_a_mini_file_as_loading_does(name):
    """Every hostile LoRA-Mini file: the same one-line error from inspect (no torch) as from
    loading each of its modules (container.load), checksums and fingerprints included."""
    path = BAD / MANIFEST["cases"][name]["path"]
    if not inspect.is_mini(path):  # no LoRA-Mini header to read: inspected (and refused) as an adapter
        assert name in ("mini_not_lora_mini", "mini_truncated")
        return
    with pytest.raises(lc.BadInputError) as loading:
        for _ in container.load(path).modules():
            pass
    with pytest.raises(lc.BadInputError) as inspecting:
        inspect.describe(path)
    assert type(inspecting.value) is type(loading.value) and str(inspecting.value) == str(loading.value)


FLOATS = ["float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"]


@pytest.mark.parametrize("dtype", FLOATS)
def test_raw_finite_check_and_values_agree_with_torch(dtype, tmp_path):
    """LazyTensors.require_finite (bit patterns) refuses exactly what st.require_finite (torch)
    refuses, and LazyTensors.array decodes every value as torch does, for each float dtype."""
    dt = getattr(torch, dtype)
    info = torch.finfo(dt)
    base = torch.tensor([0.0, -0.0, 1.5, -2.0, info.max, -info.max, info.tiny, info.smallest_normal / 4])
    codes = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
    tensors = {"finite": base.to(dt).reshape(2, 4)}
    for name, value in codes.items():
        tensors[name] = torch.cat([base, torch.tensor([value])]).to(dt)
    if dtype.startswith("float8") or dtype in ("float16", "bfloat16"):  # every bit pattern of a 1- or 2-byte float
        n = 256 if dtype.startswith("float8") else 65536
        tensors["all"] = torch.arange(n, dtype=torch.int32).to(torch.uint8 if n == 256 else torch.int16).view(dt)
    save_file(tensors, tmp_path / "x.safetensors")
    lazy = LazyTensors(tmp_path / "x.safetensors")
    for key in tensors:
        t = lazy.get(key)
        try:
            require_finite(t, "t", "x")
            by_torch = None
        except lc.BadInputError as exc:
            by_torch = str(exc)
        try:
            lazy.require_finite(key, "t")
            raw = None
        except lc.BadInputError as exc:
            raw = str(exc)
        assert (raw is None) == (by_torch is None), (dtype, key)
        assert raw is None or "t contains NaN or Inf values" in raw
        want = t.to(torch.float64).numpy()
        assert np.array_equal(lazy.array(key), want, equal_nan=True), (dtype, key)
    assert DTYPE_NAMES[lazy.dtype("finite")] == dtype


def test_inspect_refuses_what_reading_refuses():
    """A Tucker fold that overflows float32 is found as reading finds it (numpy, float64)."""
    from helpers.cli import run_cli

    res = run_cli("inspect", BAD / "kohya_locon_tucker_overflow" / "kohya-locon.safetensors")
    assert res.exit_code == 2 and "(as converted) contains NaN or Inf" in res.stderr, res.output


def test_inspect_knows_the_names_it_does_not_import():
    from lora_convert.hub import HF_SCHEME

    assert inspect.HF_SCHEME == HF_SCHEME
    assert inspect.is_mini(BAD / "_valid" / "mini_svd.safetensors") and not inspect.is_mini(FX / "peft-tiny-llama")


# ---------------------------------------------------------------- no torch

_RUN = """
import sys
from lora_convert.cli import main
heavy = ("torch", "transformers")
for arg in sys.argv[1:]:
    path, *flags = arg.split("::")
    try:
        main.main(["inspect", path, "--json", *flags], standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise
    loaded = [m for m in heavy if m in sys.modules]
    print("INSPECTED", path, "HEAVY", ",".join(loaded))
    if loaded:
        break
"""


def test_inspect_imports_neither_torch_nor_transformers(comfyui, minis):
    """One interpreter inspects a file of every layout (LyCORIS LoHa and LoKr included) and
    LoRA-Mini files (plain and quantized, random and svd outers); after each, neither torch nor
    transformers is loaded."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    paths = [str(p) for p in [*SCANNED, comfyui, *minis, BAD / "_valid" / "mini_random.safetensors"]]
    proc = subprocess.run([sys.executable, "-c", _RUN, *paths], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    done = [line.split() for line in proc.stdout.splitlines() if line.startswith("INSPECTED")]
    assert [d[1] for d in done] == paths and all(len(d) == 3 for d in done), done
    json.loads(proc.stdout.split("INSPECTED")[0] or "{}")  # the first report is JSON


def test_pickle_inspect_still_loads_torch():
    """Sanity for the test above: the same probe sees torch when inspect does need it (a PEFT
    pickle is read with torch.load)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    arg = f"{BAD / '_valid' / 'peft-pickle'}::--allow-pickle"
    proc = subprocess.run([sys.executable, "-c", _RUN, arg], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].endswith("HEAVY torch")
