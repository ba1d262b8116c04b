"""A fresh LoRA-Mini adapter for training from scratch: outers regenerated from a seed (coordinate
subsets by default, or random), LoRA-style inner init.

For sequence classification the new head (PEFT's modules_to_save: "classifier" or "score")
trains in full beside the inners and is stored as passthrough tensors under PEFT's key names,
so `reconstruct` writes an adapter that PeftModel loads onto AutoModelForSequenceClassification.
"""
from __future__ import annotations

import hashlib
from types import SimpleNamespace

import torch
from torch import nn

from ..container import MiniAdapter, MiniModule
from ..errors import BadInputError, UnsupportedError
from .. import outer
from ..st import dtype_name
from .layers import base_shape, layer_kind, rms_norm


def default_lr(outer_dim) -> float:
    """Default peak learning rate of `train` for outers of size a (the first of --outer-dim; default 64).

    In the layers' normalised coordinates an optimizer step on X moves U·X by about √a times the step
    (a sum of a unit-norm columns), so the best rate falls as a grows: benchmarks/bench_scratch.py
    found 1e-2 best at a = 192-256 (3e-2 diverged at 256) and 3e-2 best at a = 48-96.
    """
    a = (outer_dim[0] if isinstance(outer_dim, (tuple, list)) else outer_dim) or 64
    return min(3e-2, max(1e-2, 1e-2 * (256 / a) ** 0.5))


def default_targets(model: nn.Module) -> list[str]:
    """PEFT's default target modules for the model type (e.g. q_proj, v_proj for Llama)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    targets = DEFAULTS.get(getattr(model.config, "model_type", None))
    if not targets:
        raise BadInputError(f"no default target modules for model type {model.config.model_type!r}; "
                            "pass --target-modules")
    return list(targets)


def find_targets(model: nn.Module, targets: list[str], exclude: tuple[str, ...] = ()) -> list[str]:
    """Module paths whose name matches a target as PEFT matches strings (exact, or ends with '.target').

    "all-linear" means every Linear except the output head (and the modules under `exclude`, e.g. a
    classification head that trains in full), as in PEFT.
    """
    out = []
    head = _output_head(model)
    for path, module in model.named_modules():
        if not path or any(path == e or path.startswith(e + ".") for e in exclude):
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
                   store: torch.dtype, source: str = "select") -> MiniModule:
    kind = layer_kind(base)
    if kind == "embedding":
        raise UnsupportedError(f"module {name!r}: training embeddings from scratch is not supported")
    out_f, in_f = base_shape(base, kind)
    U, V, spec = outer.get(source).make(SimpleNamespace(name=name, out_features=out_f, in_features=in_f),
                                        {"seed": seed, "outer_dim": outer_dim})
    a, b = U.shape[1], V.shape[0]
    k = min(rank, a, b)
    X, Y = init_inner(name, seed, a, k, V)
    kernel = {}
    if kind == "conv":
        kernel = {"down_shape": [rank, *base.weight.shape[1:]], "up_shape": [out_f, rank, 1, 1]}
    return MiniModule(name=name, kind=kind, kernel=kernel, rank=rank, alpha=float(alpha), use_rslora=False,
                      dtype=dtype_name(store), outer=spec, U=U, V=V, X=X.to(store), Y=Y.to(store))


def peft_config(base: str, targets: list[str], rank: int, alpha: float, task_type: str = "CAUSAL_LM",
                modules_to_save: list[str] | None = None) -> dict:
    """adapter_config.json for what `reconstruct` writes: a plain PEFT LoRA of rank r."""
    return {"peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base,
            "target_modules": sorted(targets), "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
            "bias": "none", "use_rslora": False, "fan_in_fan_out": False, "inference_mode": True,
            "modules_to_save": modules_to_save, "init_lora_weights": True, "use_dora": False}


PEFT_PREFIX = "base_model.model."  # how PEFT names modules_to_save tensors in adapter_model.safetensors
HEAD_NAMES = ("classifier", "score")  # PEFT's modules_to_save for SEQ_CLS


def classification_head(model: nn.Module) -> tuple[str, dict[str, nn.Parameter]]:
    """(module name, {PEFT key: parameter}) of a sequence-classification model's head."""
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return name, {f"{PEFT_PREFIX}{name}.{p}": param for p, param in head.named_parameters()}
    raise UnsupportedError(f"{type(model).__name__} has no classification head named {' or '.join(HEAD_NAMES)}")


def load_classifier(src, labels: list, dtype: torch.dtype, seed: int):
    """(AutoModelForSequenceClassification with a new head for `labels`, initialised from `seed`; tokenizer)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    names = [str(x) for x in labels]
    try:
        with torch.random.fork_rng(devices=[]):  # the new head's initialisation, without touching the caller's RNG
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                src.path, num_labels=len(names), id2label=dict(enumerate(names)),
                label2id={n: i for i, n in enumerate(names)}, dtype=dtype, **src.kwargs())
        tokenizer = AutoTokenizer.from_pretrained(src.path, **src.kwargs())
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(f"cannot load the base model as a classifier ({first[:300]})", src.path) from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise BadInputError("the tokenizer has neither a pad nor an eos token", src.path)
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out of every loss
    if model.config.pad_token_id is None:  # classifiers over decoders find the last token by the pad id
        model.config.pad_token_id = tokenizer.pad_token_id
    _, head = classification_head(model)
    for p in head.values():
        p.data = p.data.float()  # trained in full: float32 master weights even over a bf16 base
    return model.eval(), tokenizer


def scratch_adapter(model: nn.Module, base: str, targets: list[str] | None, rank: int, alpha: float | None,
                    outer_dim, seed: int, dtype: str = "fp32",
                    head: tuple[str, dict[str, nn.Parameter]] | None = None, source: str = "select") -> MiniAdapter:
    """A MiniAdapter over the model's target modules that starts as a no-op (X = 0).

    With `head` (classification_head's result) the adapter is a SEQ_CLS one whose passthrough
    tensors are the head's current values (read when the adapter is saved).
    """
    from ..container import DTYPES

    if rank <= 0:
        raise BadInputError(f"--rank must be positive, got {rank}")
    if outer.get(source).stored:  # stored outers are fitted to an update; training draws regenerated ones
        raise BadInputError(f"--outer {source}: training needs outers regenerated from the seed, "
                            f"not {source} outers, which are fitted to an existing adapter")
    alpha = float(alpha if alpha is not None else 8)  # PEFT's default lora_alpha
    targets = targets or default_targets(model)
    paths = find_targets(model, targets, exclude=(head[0],) if head else ())
    store = DTYPES[dtype]
    modules = {p: scratch_module(p, model.get_submodule(p), rank, alpha, outer_dim, seed, store, source)
               for p in paths}
    cfg_targets = targets if targets != ["all-linear"] else sorted({p.rsplit(".", 1)[-1] for p in paths})
    task_type, to_save, tensors = "CAUSAL_LM", None, {}
    if head:
        task_type, to_save, tensors = "SEQ_CLS", [head[0]], head[1]
    return MiniAdapter(source_format="peft", module_names=list(modules), load_module=modules.__getitem__,
                       source_config=peft_config(base, cfg_targets, rank, _int_if_whole(alpha), task_type, to_save),
                       passthrough_names=list(tensors),
                       load_passthrough=lambda key: tensors[key].detach().to("cpu", torch.float32).contiguous())


def _int_if_whole(x: float):
    return int(x) if float(x).is_integer() else x
