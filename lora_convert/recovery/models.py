"""Loading base models and tokenizers with transformers (local directory, GGUF file, or Hub id)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BadInputError

TASKS = ("auto", "causal-lm", "hidden")


@dataclass
class ModelSource:
    """Where a base model comes from; Hub ids honour HF_HUB_OFFLINE and `local_files_only`."""

    path: str
    gguf_file: str | None = None
    revision: str | None = None
    local_files_only: bool = False

    @classmethod
    def parse(cls, path: str, gguf_file: str | None = None, revision: str | None = None,
              local_files_only: bool = False) -> "ModelSource":
        p = Path(path)
        offline = local_files_only or _offline()
        if p.is_file() and p.suffix == ".gguf":  # a GGUF file: transformers wants (directory, file name)
            return cls(str(p.parent), p.name, revision, offline)
        if gguf_file is None and p.is_dir():
            found = sorted(p.glob("*.gguf"))
            if len(found) == 1 and not (p / "config.json").is_file():
                gguf_file = found[0].name
        return cls(str(path), gguf_file, revision, offline)

    def kwargs(self) -> dict:
        kw = {"local_files_only": self.local_files_only}
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        if self.revision:
            kw["revision"] = self.revision
        return kw


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def detect_task(config) -> str:
    """'causal-lm' when the checkpoint is a decoder LM, else 'hidden' (encoders such as BERT)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    archs = getattr(config, "architectures", None) or []
    if archs:
        return "causal-lm" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else "hidden"
    mt = getattr(config, "model_type", "")
    # BERT-like models also list a causal head; prefer their masked-LM nature.
    is_causal = mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return "causal-lm" if is_causal else "hidden"


def load_model(src: ModelSource, task: str = "auto", dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer with a pad token, task)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(src.path, **src.kwargs())
        task = detect_task(config) if task == "auto" else task
        cls = AutoModelForCausalLM if task == "causal-lm" else AutoModel
        model = cls.from_pretrained(src.path, dtype=dtype, **src.kwargs())
        tokenizer = AutoTokenizer.from_pretrained(src.path, **src.kwargs())
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(f"cannot load the base model ({first[:300]})", src.path) from None
    _ensure_pad(tokenizer, src.path)
    return model.eval(), tokenizer, task


def _ensure_pad(tokenizer, path: str) -> None:
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise BadInputError("the tokenizer has neither a pad nor an eos token", path)
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out of every loss


def pick_device(device: str) -> str:
    """'cuda' when asked for or available ("auto"), else 'cpu'."""
    if device not in ("auto", "cuda", "cpu"):
        raise BadInputError(f"--device must be auto, cuda or cpu, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda: no CUDA device is available")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def model_dtype(device: str, name: str = "auto") -> torch.dtype:
    """Base weights are frozen, so bf16 on GPU costs no accuracy in the trained inners (kept fp32)."""
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
