"""Real third-party clients for tests/test_clients_*.py: a tiny Llama saved as a user saves it,
with a real PEFT LoRA, and llama.cpp's convert_lora_to_gguf.py from the llama-cpp-python
source distribution (pure Python; no native build).

The sdist is looked for in $LORA_CONVERT_CLIENTS_CACHE (default: the repository's ignored
tmp/clients/, where .ci/run puts it) and fetched there with `pip download` when missing.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from .models import tiny_llama

LLAMA_CPP_PYTHON = "0.3.36"  # .ci/run downloads the same version
ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("LORA_CONVERT_CLIENTS_CACHE") or ROOT / "tmp" / "clients")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama_lora(dest: Path, seed: int = 0, **lora) -> tuple[Path, Path]:
    """(base model directory, PEFT adapter directory), both written by the libraries themselves.
    The LoRA's B is random (init_lora_weights=False), as after training."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(seed)
    model.save_pretrained(dest / "base")
    torch.manual_seed(seed + 1)
    cfg = LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": TARGETS, "init_lora_weights": False, **lora})
    get_peft_model(model, cfg).save_pretrained(dest / "lora")
    return dest / "base", dest / "lora"


def rope_theta(base_dir: Path) -> float:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base_dir)
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


@torch.no_grad()
def peft_logits(base_dir: Path, adapter_dir: Path | None, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    return model(ids).logits.double()


def llama_cpp_converter() -> Path:
    """A directory holding llama.cpp's convert_lora_to_gguf.py with its conversion/ and gguf-py/."""
    out = CACHE / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if (out / "convert_lora_to_gguf.py").is_file():
        return out
    sdist = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                              f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(CACHE)],
                             capture_output=True, text=True, timeout=900)
        if res.returncode != 0 or not sdist.is_file():
            why = (res.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"llama.cpp's converter cannot be installed here: pip download llama-cpp-python=="
                        f"{LLAMA_CPP_PYTHON} failed ({why})")
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    wanted = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    part = out.with_name(out.name + f".part{os.getpid()}")
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
            if rel and rel.startswith(wanted) and (m.isfile() or m.isdir()):
                m.name = rel
                members.append(m)
        tar.extractall(part, members=members, filter="data")
    os.replace(part, out)
    return out


def convert_to_gguf(tools: Path, base_dir: Path, adapter_dir: Path, out: Path) -> Path:
    """Run llama.cpp's converter as a user would; its own gguf-py comes first on the path."""
    env = dict(os.environ, PYTHONPATH=str(tools / "gguf-py"), HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, str(tools / "convert_lora_to_gguf.py"), "--base", str(base_dir),
                          "--outfile", str(out), "--outtype", "f32", str(adapter_dir)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
ROPE_PERMUTED = {"attn_q", "attn_k"}  # the converter reorders these rows for llama.cpp's rope


def gguf_updates(path: Path) -> dict[str, torch.Tensor]:
    """{GGUF tensor name: ΔW as llama.cpp applies it}: alpha / rank-of-B · B · A (float64)."""
    import gguf

    reader = gguf.GGUFReader(path)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        name, _, role = t.name.rpartition(".")
        factors.setdefault(name, {})[role] = torch.from_numpy(t.data.copy()).double()
    out = {}
    for name, f in factors.items():
        B, A = f["lora_b"], f["lora_a"]
        scale = alpha / B.shape[1] if alpha else 1.0  # llama.cpp: alpha / rank of B (llama-adapter.h)
        out[name] = scale * B @ A
    return out


def gguf_name(module: str) -> str:
    parts = module.split(".")
    i = parts.index("layers")
    return f"blk.{parts[i + 1]}.{GGUF_NAMES['.'.join(parts[i + 2:])]}.weight"


def update_error(got: torch.Tensor, want: torch.Tensor, permuted: bool) -> float:
    """Relative error of ΔW; for rope-permuted rows, of ΔWᵀΔW (invariant to the row order)."""
    if permuted:
        got, want = got.T @ got, want.T @ want
    return float((got - want).norm() / want.norm())
