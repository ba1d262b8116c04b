"""llama.cpp's own converter (convert_lora_to_gguf.py) on our PEFT outputs: the GGUF must hold
scale·B·A of every module as llama.cpp applies it (one lora_alpha, divided by each B's rank)."""
from __future__ import annotations

import logging

import pytest

import lora_convert as lc
from lora_convert.formats.peft import client_warnings
from tests.helpers.clients import (ROOT, ROPE_PERMUTED, convert_to_gguf, gguf_name, gguf_updates, llama_cpp_converter,
                                   tiny_llama_lora, update_error)


@pytest.fixture(scope="module")
def converter():
    return llama_cpp_converter()


def _restore(tmp_path, lora, *, trim=False, one_alpha=False, **compress):
    mini = lc.compress(lc.load_adapter(lora), **{"outer": "svd", "dtype": "fp32", **compress})
    lc.save(mini, tmp_path / "mini")
    mini = lc.load(tmp_path / "mini")
    out = tmp_path / f"restored-{trim}-{one_alpha}"
    lc.save_adapter(lc.reconstruct(mini, trim_rank=trim, one_alpha=one_alpha), out)
    # what the LoRA-Mini file stands for, from its own factors: scale · (U X)(Y V)
    want = {}
    for m in mini.modules():
        B, A = m.factors()
        want[m.name] = m.scale * B @ A
    return out, want


def _errors(gguf_path, want):
    got = gguf_updates(gguf_path)
    assert len(got) == len(want)
    return {name: update_error(got[gguf_name(name)], dw, gguf_name(name).split(".")[2] in ROPE_PERMUTED)
            for name, dw in want.items()}


@pytest.mark.parametrize("trim", [False, True])
def test_llama_cpp_converter_reads_reconstructed_adapter(converter, tmp_path, trim):
    base, lora = tiny_llama_lora(tmp_path)
    restored, want = _restore(tmp_path, lora, trim=trim, keep_energy=0.9)
    ranks = {m.name: m.rank for m in lc.load_adapter(restored).modules()}
    if trim:  # the case llama.cpp got wrong: trimmed modules of different ranks
        assert len(set(ranks.values())) > 1 and max(ranks.values()) < 8
    errors = _errors(convert_to_gguf(converter, base, restored, tmp_path / "a.gguf"), want)
    assert max(errors.values()) < 1e-5, errors


def test_per_module_alpha_warns_and_one_alpha_loads_right_in_llama_cpp(converter, tmp_path, caplog):
    base, lora = tiny_llama_lora(tmp_path, use_rslora=True, alpha_pattern={"v_proj": 5})
    with caplog.at_level(logging.WARNING, logger="lora_convert.formats.peft"):
        kept, want = _restore(tmp_path, lora)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("warning: llama.cpp") and "--one-alpha" in line for line in lines), lines
    # the warning is true: llama.cpp's converter reads this adapter wrong
    wrong = _errors(convert_to_gguf(converter, base, kept, tmp_path / "kept.gguf"), want)
    assert max(wrong.values()) > 0.1

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lora_convert.formats.peft"):
        fixed, want = _restore(tmp_path, lora, one_alpha=True)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    errors = _errors(convert_to_gguf(converter, base, fixed, tmp_path / "fixed.gguf"), want)
    assert max(errors.values()) < 1e-5, errors


# vLLM by its documented rules (PEFTHelper): one r and lora_alpha for every module (scale alpha/r,
# or alpha/sqrt(r) with use_rslora), rank_pattern / alpha_pattern ignored, modules_to_save refused.
RANKS = {"model.layers.0.self_attn.q_proj": 8, "model.layers.0.self_attn.v_proj": 8}


@pytest.mark.parametrize("cfg, llama, vllm", [
    ({"r": 8, "lora_alpha": 16}, None, None),
    ({"r": 8, "lora_alpha": 16, "use_rslora": True}, "use_rslora", None),
    ({"r": 8, "lora_alpha": 16, "rank_pattern": {"v_proj": 4}}, None, "'model.layers.0.self_attn.v_proj' has rank 4"),
    ({"r": 8, "lora_alpha": 16, "alpha_pattern": {"v_proj": 4}}, "has its own lora_alpha", "has its own lora_alpha"),
    ({"r": 8, "lora_alpha": 16, "modules_to_save": ["lm_head"]}, None, "modules_to_save"),
])
def test_client_warnings_follow_llama_cpp_and_vllm_rules(cfg, llama, vllm):
    ranks = dict(RANKS)
    for pattern, r in (cfg.get("rank_pattern") or {}).items():
        ranks = {n: (r if n.endswith(pattern) else k) for n, k in ranks.items()}
    lines = client_warnings(cfg, ranks)
    got_llama = [line for line in lines if line.startswith("llama.cpp")]
    got_vllm = [line for line in lines if line.startswith("vLLM")]
    assert len(lines) == len(got_llama) + len(got_vllm) and all("\n" not in line for line in lines)
    assert (llama in got_llama[0]) if llama else not got_llama, lines
    assert (vllm in got_vllm[0]) if vllm else not got_vllm, lines


def test_trimmed_reconstruct_warns_for_vllm_once(tmp_path):
    import os
    import subprocess
    import sys

    _, lora = tiny_llama_lora(tmp_path)
    lc.save(lc.compress(lc.load_adapter(lora), outer="svd", keep_energy=0.9), tmp_path / "mini")
    res = subprocess.run([sys.executable, "-m", "lora_convert.cli", "reconstruct", str(tmp_path / "mini"), "-o",
                          str(tmp_path / "out"), "--trim-rank"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("warning: vLLM"), res.stderr
    assert "--trim-rank" in res.stderr and "rank_pattern" in res.stderr
