"""CLI contract: help, JSON reports, exit codes, one-line errors, no partial output."""
import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.cli import run_cli as run
from lora_convert.errors import BadInputError

SRC = "peft-tiny-llama"


def test_help_lists_the_verbs():
    out = run("--help").output
    for verb in ("inspect", "compress", "verify", "reconstruct", "convert"):
        assert verb in out


def test_compress_json_verify_reconstruct(fixtures, tmp_path):
    res = run("compress", fixtures / SRC, "-o", tmp_path / "mini", "--outer", "random", "--seed", "7",
              "--outer-dim", "32,16", "--rank", "4", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["summary"]["modules"] == 14 and doc["summary"]["low_energy"] is True
    assert {m["a"] for m in doc["modules"]} == {32} and {m["inner_rank"] for m in doc["modules"]} == {4}
    assert "WARNING" in res.stderr and "recover" in res.stderr
    res = run("verify", tmp_path / "mini", "--against", fixtures / SRC, "--json")
    assert res.exit_code == 0
    assert json.loads(res.stdout)["summary"]["rel_error"] == pytest.approx(doc["summary"]["rel_error"], rel=1e-9)
    res = run("reconstruct", tmp_path / "mini", "-o", tmp_path / "restored")
    assert res.exit_code == 0 and (tmp_path / "restored" / "adapter_config.json").is_file()


def test_keep_energy_svd_reports_table(fixtures, tmp_path):
    res = run("compress", fixtures / SRC, "-o", tmp_path / "svd", "--outer", "svd", "--keep-energy", "0.9")
    assert res.exit_code == 0
    assert "whole adapter: 14 modules" in res.stdout and "WARNING" not in res.output
    assert json.loads((tmp_path / "svd" / "lora_mini_config.json").read_text())["fidelity"]["retained_energy"] >= 0.9


def test_inspect_text_and_json(fixtures, tmp_path):
    res = run("inspect", fixtures / "peft-tiny-llama-patterns", "--json")
    doc = json.loads(res.stdout)
    ranks = {m["name"]: m["rank"] for m in doc["modules"]}
    assert ranks["model.layers.0.self_attn.q_proj"] == 4 and ranks["model.layers.0.mlp.down_proj"] == 12
    run("compress", fixtures / SRC, "-o", tmp_path / "m.safetensors", "--seed", "3")
    res = run("inspect", tmp_path / "m.safetensors")
    assert res.exit_code == 0 and "LoRA-Mini" in res.stdout and "seed=3" in res.stdout


def copy_fixture(fixtures, tmp_path):
    dst = tmp_path / "adapter"
    shutil.copytree(fixtures / SRC, dst)
    return dst


def corrupt_missing_config(d):
    (d / "adapter_config.json").unlink()


def corrupt_rank_mismatch(d):
    f = d / "adapter_model.safetensors"
    t = load_file(f)
    key = next(k for k in t if k.endswith("q_proj.lora_B.weight"))
    t[key] = t[key][:, :5].contiguous()
    save_file(t, f)


def corrupt_nan(d):
    f = d / "adapter_model.safetensors"
    t = load_file(f)
    key = next(k for k in t if k.endswith("lora_A.weight"))
    t[key][0, 0] = float("nan")
    save_file(t, f)


def corrupt_truncated(d):
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def corrupt_unknown_key(d):
    f = d / "adapter_model.safetensors"
    t = load_file(f)
    t["base_model.model.model.something_else"] = torch.zeros(3)
    save_file(t, f)


def corrupt_header_length(d):
    f = d / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])


@pytest.mark.parametrize("corrupt,words", [
    (corrupt_missing_config, "missing adapter_config.json"),
    (corrupt_rank_mismatch, "rank"),
    (corrupt_nan, "NaN"),
    (corrupt_truncated, "past the end"),
    (corrupt_unknown_key, "unknown keys"),
    (corrupt_header_length, "header length"),
])
@pytest.mark.parametrize("verb", ["compress", "inspect"])
def test_bad_input_exits_2_with_one_line_and_no_output(verb, corrupt, words, fixtures, tmp_path):
    src = copy_fixture(fixtures, tmp_path)
    corrupt(src)
    out = tmp_path / "out"
    args = [verb, src] + (["-o", out] if verb == "compress" else [])
    res = run(*args)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and str(src) in lines[0]
    assert "Traceback" not in res.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_pickle_refused_without_flag(fixtures, tmp_path):
    src = copy_fixture(fixtures, tmp_path)
    torch.save(load_file(src / "adapter_model.safetensors"), src / "adapter_model.bin")
    (src / "adapter_model.safetensors").unlink()
    res = run("compress", src, "-o", tmp_path / "o")
    assert res.exit_code == 2 and "--allow-pickle" in res.stderr
    res = run("compress", src, "-o", tmp_path / "o", "--allow-pickle")
    assert res.exit_code == 0 and (tmp_path / "o" / "lora_mini.safetensors").is_file()


def test_bad_option_values_exit_2(fixtures, tmp_path):
    assert run("compress", fixtures / SRC, "-o", tmp_path / "o", "--keep-energy", "1.5").exit_code == 2
    assert run("compress", fixtures / SRC, "-o", tmp_path / "o", "--outer-dim", "x").exit_code == 2
    assert not (tmp_path / "o").exists()


def test_tampered_seed_fails_verification(fixtures, tmp_path):
    run("compress", fixtures / SRC, "-o", tmp_path / "m.safetensors", "--seed", "3")
    f = tmp_path / "m.safetensors"
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8:8 + n].replace(b'\\"seed\\": 3', b'\\"seed\\": 4')
    assert header != raw[8:8 + n]
    f.write_bytes(raw[:8] + header + raw[8 + n:])
    res = run("verify", f)
    assert res.exit_code == 2 and "fingerprint" in res.stderr


def test_verify_checks_passthrough_tensors(fixtures, tmp_path):
    """modules_to_save tensors travel through the file: verify must vouch for them too."""
    f = tmp_path / "m.safetensors"
    assert run("compress", fixtures / "peft-tiny-llama-patterns", "-o", f).exit_code == 0
    assert run("verify", f).exit_code == 0
    raw = bytearray(f.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    key = next(k for k in header if k.startswith("__passthrough__."))
    raw[8 + n + header[key]["data_offsets"][0]] ^= 0x40
    f.write_bytes(bytes(raw))
    for args in ([], ["--against", fixtures / "peft-tiny-llama-patterns"]):
        res = run("verify", f, *args)
        assert res.exit_code == 2 and "checksum" in res.stderr and res.stderr.count("\n") == 1, res.output


def test_verify_against_an_adapter_of_other_shapes_exits_2(fixtures, tmp_path):
    run("compress", fixtures / SRC, "-o", tmp_path / "m.safetensors")
    other = tmp_path / "other"
    shutil.copytree(fixtures / SRC, other)
    tensors = load_file(other / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
    tensors[key] = torch.cat([tensors[key], tensors[key]], dim=1)  # in_features doubled
    save_file(tensors, other / "adapter_model.safetensors")
    res = run("verify", tmp_path / "m.safetensors", "--against", other)
    assert res.exit_code == 2 and "not its original" in res.stderr and str(other) in res.stderr, res.output
    assert res.stderr.count("\n") == 1


def test_pattern_entries_matching_no_module_are_allowed_as_in_peft(fixtures, tmp_path):
    """PEFT ignores rank_pattern / alpha_pattern entries for modules the adapter lacks."""
    d = tmp_path / "adapter"
    shutil.copytree(fixtures / "peft-tiny-llama-patterns", d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    before = json.loads(run("inspect", d, "--json").stdout)["modules"]
    cfg["rank_pattern"]["k_proj_not_targeted"] = 2
    cfg["alpha_pattern"]["embed_tokens"] = 3
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    res = run("inspect", d, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["modules"] == before


def test_per_module_outer_stream_end_to_end(fixtures, tmp_path):
    res = run("compress", fixtures / SRC, "-o", tmp_path / "m", "--outer-stream", "module", "--outer-dim", "16",
              "--rank", "4", "--json")
    assert res.exit_code == 0, res.output
    error = json.loads(res.stdout)["summary"]["rel_error"]
    mini = lora_mini_doc(tmp_path / "m" / "lora_mini.safetensors")
    assert {name: spec["outer"]["stream"] for name, spec in mini["modules"].items()} == {n: n for n in mini["modules"]}
    res = run("verify", tmp_path / "m", "--against", fixtures / SRC, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["summary"]["rel_error"] == pytest.approx(error, rel=1e-9)
    assert run("reconstruct", tmp_path / "m", "-o", tmp_path / "r").exit_code == 0
    res = run("compress", fixtures / SRC, "-o", tmp_path / "s", "--outer", "svd", "--outer-stream", "module")
    assert res.exit_code == 2 and "outer-stream" in res.stderr and not (tmp_path / "s").exists()


def lora_mini_doc(path) -> dict:
    """The lora_mini metadata document of a LoRA-Mini file, read straight from its header."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(json.loads(raw[8:8 + n])["__metadata__"]["lora_mini"])


# ---------------------------------------------------------------- start-up and registries

HEAVY = ("torch", "transformers", "numpy")
_START = """
import runpy, sys
sys.argv = ["lora-convert", *sys.argv[1:]]
try:
    runpy.run_module("lora_convert.cli", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
print("HEAVY", ",".join(m for m in {heavy!r} if m in sys.modules), "EXIT", code)
"""


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["inspect", "--help"], ["convert", "--help"],
                                  ["push", "--help"], ["recover", "--help"]])
def test_cli_starts_without_torch(args):
    """`python -m lora_convert.cli` for help and version loads neither torch, transformers nor numpy
    (each would cost the start-up seconds)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", _START.format(heavy=HEAVY), *args], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last == "HEAVY  EXIT 0", last
    assert "Usage:" in proc.stdout or "version" in proc.stdout


def test_format_registry_matches_the_layout_modules():
    """The CLI's --from/--to choices (module names, read without importing them) are exactly the
    registered layouts, each an AdapterFormat named after its module."""
    from lora_convert import formats
    from lora_convert.cli.options import FORMAT_CHOICES
    from lora_convert.formats.base import AdapterFormat

    assert FORMAT_CHOICES == formats.names() == list(formats.REGISTRY) != []
    for name, layout in formats.REGISTRY.items():
        assert isinstance(layout, AdapterFormat) and layout.name == name
        assert layout.module == f"lora_convert.formats.{name}"
    assert set(formats.REGISTRY["peft"].dir_files) >= {"adapter_config.json", "adapter_model.safetensors"}
    assert formats.REGISTRY["diffusers"].writes_dir("out") and not formats.REGISTRY["diffusers"].writes_dir("o.safetensors")


def test_outer_registry_matches_the_source_modules():
    from lora_convert import outer
    from lora_convert.outer.base import OuterSource

    assert outer.names() == sorted(outer.sources()) == ["random", "select", "svd"]
    assert all(isinstance(s, OuterSource) for s in outer.sources().values())
    assert outer.get("svd").stored and not outer.get("random").stored and not outer.get("select").stored
    with pytest.raises(BadInputError, match="unknown outer source"):
        outer.get("nope")


def test_a_registered_layout_is_detected_read_and_offered(tmp_path, monkeypatch):
    """Adding a layout is one AdapterFormat and register(): detect, read and the refuse-to-replace
    check see it with no other edit."""
    from lora_convert import formats
    from lora_convert.adapter import LoraModule, from_modules
    from lora_convert.cli.options import refuse_to_replace_input
    from lora_convert.formats import base

    monkeypatch.setattr(base, "_REGISTERED", dict(formats.REGISTRY))

    class Toy(base.AdapterFormat):
        name, label, output_is_dir, dir_files = "toy", "toy layout", True, ("toy.json",)

        def detect(self, path):
            return (path / "toy.json").is_file() if path.is_dir() else path.name == "toy.json"

        def read(self, path, **options):
            m = LoraModule("layer", down=torch.ones(1, 3), up=torch.ones(2, 1), alpha=1.0)
            return from_modules(self.name, [m])

        def write(self, adapter, dest):
            (dest / "toy.json").write_text("{}")

    with pytest.raises(TypeError):
        type("Half", (base.AdapterFormat,), {"name": "half"})()  # abstract methods missing
    base.register(Toy())
    d = tmp_path / "toy"
    d.mkdir()
    (d / "toy.json").write_text("{}")
    assert "toy" in formats.REGISTRY and formats.detect(d) == "toy"
    assert formats.read(d).module("layer").rank == 1
    assert formats.label(formats.read(d)) == "toy layout"
    with pytest.raises(BadInputError, match="among the files"):
        refuse_to_replace_input(str(d / "toy.json"), str(d / "out.safetensors"))


def test_cli_group_size_default_is_the_librarys():
    """compress --group-size (a literal: the CLI starts without numpy) defaults to quant.DEFAULT_GROUP."""
    from lora_convert import quant
    from lora_convert.cli.convert import compress

    option = next(p for p in compress.params if p.name == "group_size")
    assert option.default == quant.DEFAULT_GROUP
