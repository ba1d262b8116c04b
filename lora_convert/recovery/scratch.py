"""A fresh LoRA-Mini adapter for training from scratch: random outers from a seed, LoRA-style inner init."""
from __future__ import annotations

import hashlib
from types import SimpleNamespace

import torch
from torch import nn

from ..container import MiniAdapter, MiniModule
from ..errors import BadInputError, UnsupportedError
from ..outer import random as random_outer
from ..st import dtype_name
from .layers import base_shape, layer_kind, rms_norm


def default_targets(model: nn.Module) -> list[str]:
    """PEFT's default target modules for the model type (e.g. q_proj, v_proj for Llama)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    targets = DEFAULTS.get(getattr(model.config, "model_type", None))
    if not targets:
        raise BadInputError(f"no default target modules for model type {model.config.model_type!r}; "
                            "pass --target-modules")
    return list(targets)


def find_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Module paths whose name matches a target as PEFT matches strings (exact, or ends with '.target').

    "all-linear" means every Linear except the output head, as in PEFT.
    """
    out = []
    head = _output_head(model)
    for path, module in model.named_modules():
        if not path:
            continue
        if targets == ["all-linear"]:
            hit = isinstance(module, nn.Linear) and path != head
        else:
            hit = any(path == t or path.endswith("." + t) for t in targets)
        if hit:
            layer_kind(module)  # refuse what LoRA-Mini layers cannot wrap, naming the module
            out.append(path)
    if not out:
        raise BadInputError(f"target modules {targets} match nothing in the {type(model).__name__}")
    return out


def _output_head(model: nn.Module) -> str | None:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((p for p, m in model.named_modules() if m is emb), None) if emb is not None else None


def init_inner(name: str, seed: int, a: int, k: int, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """X = 0 and Y uniform(±1/√b) in the layer's normalised coordinates (V rows of unit RMS norm),
    as PEFT initialises B = 0 and A: the adapter starts as a no-op."""
    key = int.from_bytes(hashlib.sha256(f"lora-mini-init\0{seed}\0{name}".encode()).digest()[:8], "little")
    g = torch.Generator().manual_seed(key)
    b = V.shape[0]
    Y = (torch.rand(k, b, generator=g, dtype=torch.float64) * 2 - 1) / b**0.5
    return torch.zeros(a, k, dtype=torch.float64), Y / rms_norm(V.double(), dim=1)


def scratch_module(name: str, base: nn.Module, rank: int, alpha: float, outer_dim, seed: int,
                   store: torch.dtype) -> MiniModule:
    kind = layer_kind(base)
    if kind == "embedding":
        raise UnsupportedError(f"module {name!r}: training embeddings from scratch is not supported")
    out_f, in_f = base_shape(base, kind)
    U, V, spec = random_outer.make(SimpleNamespace(name=name, out_features=out_f, in_features=in_f),
                                   {"seed": seed, "outer_dim": outer_dim})
    a, b = U.shape[1], V.shape[0]
    k = min(rank, a, b)
    X, Y = init_inner(name, seed, a, k, V)
    kernel = {}
    if kind == "conv":
        kernel = {"down_shape": [rank, *base.weight.shape[1:]], "up_shape": [out_f, rank, 1, 1]}
    return MiniModule(name=name, kind=kind, kernel=kernel, rank=rank, alpha=float(alpha), use_rslora=False,
                      dtype=dtype_name(store), outer=spec, U=U, V=V, X=X.to(store), Y=Y.to(store))


def peft_config(base: str, targets: list[str], rank: int, alpha: float) -> dict:
    """adapter_config.json for what `reconstruct` writes: a plain PEFT LoRA of rank r."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "target_modules": sorted(targets), "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
            "bias": "none", "use_rslora": False, "fan_in_fan_out": False, "inference_mode": True,
            "modules_to_save": None, "init_lora_weights": True, "use_dora": False}


def scratch_adapter(model: nn.Module, base: str, targets: list[str] | None, rank: int, alpha: float | None,
                    outer_dim, seed: int, dtype: str = "fp32") -> MiniAdapter:
    """A MiniAdapter over the model's target modules that starts as a no-op (X = 0)."""
    from ..container import DTYPES

    if rank <= 0:
        raise BadInputError(f"--rank must be positive, got {rank}")
    alpha = float(alpha if alpha is not None else 8)  # PEFT's default lora_alpha
    targets = targets or default_targets(model)
    paths = find_targets(model, targets)
    store = DTYPES[dtype]
    modules = {p: scratch_module(p, model.get_submodule(p), rank, alpha, outer_dim, seed, store) for p in paths}
    cfg_targets = targets if targets != ["all-linear"] else sorted({p.rsplit(".", 1)[-1] for p in paths})
    return MiniAdapter(source_format="peft", module_names=list(modules), load_module=modules.__getitem__,
                       source_config=peft_config(base, cfg_targets, rank, _int_if_whole(alpha)))


def _int_if_whole(x: float):
    return int(x) if float(x).is_integer() else x
