"""MLX-LM LoRA adapters: a directory with ``adapters.safetensors`` and ``adapter_config.json``.

Keys are the MLX module paths: ``model.layers.0.self_attn.q_proj.lora_a`` (in×r: transposed
relative to PEFT's lora_A) and ``.lora_b`` (r×out). ``adapter_config.json`` holds
``fine_tune_type`` ("lora"), ``num_layers`` (LoRA goes on the last num_layers blocks; -1: all)
and ``lora_parameters: {rank, scale, dropout, keys}``; ``scale`` multiplies the update as is
(it is not alpha/r). MLX module paths equal the Hugging Face ones, so names map directly.

MLX has one global scale and one rank. On write the most common module scale becomes the
global one, other modules get the ratio folded into their factors (√ on each), and lower-rank
modules are zero-padded to the common rank (the update is unchanged); both are recorded under
``lora_convert`` in adapter_config.json.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..adapter import Adapter, LoraModule
from ..errors import BadInputError, UnsupportedError
from ..st import DTYPE_NAMES, LazyTensors, StreamingWriter, require_finite
from . import naming
from ._util import (check_kernel_known, check_no_passthrough, fold_scale, int_if_whole, most_common,
                    read_json_config, unknown_keys_error)
from .base import AdapterHeader, FunctionFormat, ModuleHeader, register

NAME = "mlx"
LABEL = "MLX-LM LoRA"
OUTPUT_IS_DIR = True
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
_KEY = re.compile(r"^(?P<mod>.+)\.(?P<role>lora_a|lora_b)$")
_LAYER = re.compile(r"^(?:.*\.)?layers\.(?P<index>\d+)\.(?P<rel>.+)$")
EMBEDDING_LEAVES = {"embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embedding", "embeddings"}


def _dir(path: Path) -> Path:
    return path.parent if path.is_file() and path.name in (WEIGHTS_FILE, CONFIG_FILE) else path


def detect(path: Path) -> bool:
    d = _dir(Path(path))
    return d.is_dir() and (d / WEIGHTS_FILE).is_file() and (d / CONFIG_FILE).is_file()


def load_config(d: Path) -> dict:
    cfg, cfg_path = read_json_config(d, CONFIG_FILE)
    kind = cfg.get("fine_tune_type", "lora")
    if kind != "lora":
        raise UnsupportedError(f"fine_tune_type {kind!r} is not supported (only 'lora')", cfg_path)
    params = cfg.get("lora_parameters")
    if not isinstance(params, dict):
        raise BadInputError("lora_parameters missing or not an object", cfg_path)
    scale = params.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise BadInputError(f"lora_parameters.scale must be a finite number, got {scale!r}", cfg_path)
    return cfg


def _open(path: Path):
    """(directory, config, tensors, module -> {role: key})."""
    d = _dir(Path(path))
    cfg = load_config(d)
    lazy = LazyTensors(d / WEIGHTS_FILE)
    modules, unknown = {}, []
    for key in lazy.keys():
        m = _KEY.match(key)
        if m:
            modules.setdefault(m.group("mod"), {})[m.group("role")] = key
        else:
            unknown.append(key)
    if unknown:
        raise unknown_keys_error(unknown, "MLX LoRA factors (<module>.lora_a / .lora_b)", lazy.path)
    for mod, entry in modules.items():
        if len(entry) != 2:
            raise BadInputError(f"module {mod!r} is incomplete (needs lora_a and lora_b)", lazy.path)
    if not modules:
        raise BadInputError("no LoRA modules found", lazy.path)
    return d, cfg, lazy, modules


def read(path: Path, **_) -> Adapter:
    d, cfg, lazy, modules = _open(path)
    scale = float(cfg["lora_parameters"]["scale"])

    def load(name: str) -> LoraModule:
        return _load(lazy, name, modules[name], scale)

    return Adapter(format=NAME, module_names=sorted(modules), load_module=load, config=cfg,
                   metadata=dict(lazy.metadata), source=str(d))


def scan(path: Path, **_) -> AdapterHeader:
    """read() and loading every module, without making tensors."""
    d, cfg, lazy, modules = _open(path)
    scale = float(cfg["lora_parameters"]["scale"])

    def scan_module(name: str) -> ModuleHeader:
        entry = modules[name]
        lazy.require_finite(entry["lora_a"], f"module {name!r} lora_a")
        lazy.require_finite(entry["lora_b"], f"module {name!r} lora_b")
        return module_header(name, lazy.shape(entry["lora_a"]), lazy.shape(entry["lora_b"]), scale,
                             DTYPE_NAMES[lazy.dtype(entry["lora_a"])], lazy.path)

    return AdapterHeader(format=NAME, module_names=sorted(modules), modules=map(scan_module, sorted(modules)),
                         config=cfg, metadata=dict(lazy.metadata), source=str(d))


def _load(lazy: LazyTensors, name: str, entry: dict, scale: float) -> LoraModule:
    a = require_finite(lazy.get(entry["lora_a"]), f"module {name!r} lora_a", lazy.path)
    b = require_finite(lazy.get(entry["lora_b"]), f"module {name!r} lora_b", lazy.path)
    h = module_header(name, tuple(a.shape), tuple(b.shape), scale, "", lazy.path)
    return LoraModule(name=name, down=a.T.contiguous(), up=b.T.contiguous(), alpha=h.alpha, kind=h.kind)


def module_header(name: str, a_shape: tuple, b_shape: tuple, scale: float, dtype: str, path) -> ModuleHeader:
    """A module from the shapes of lora_a (in×r) and lora_b (r×out)."""
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != b_shape[0] or a_shape[1] == 0:
        what = "mixture-of-experts (SwitchLinear) LoRA is not supported" if len(a_shape) == 3 else "not a low-rank pair"
        raise BadInputError(f"module {name!r}: lora_a {a_shape}, lora_b {b_shape}: {what}", path)
    r = a_shape[1]
    # MLX embeddings: ΔE = lora_a @ lora_b (num_embeddings × dims), the transpose of PEFT's B @ A.
    kind = "embedding" if name.rsplit(".", 1)[-1] in EMBEDDING_LEAVES else "linear"
    return ModuleHeader(name=name, kind=kind, kernel={}, rank=r, out_features=b_shape[1], in_features=a_shape[0],
                        alpha=scale * r, use_rslora=False, dtype=dtype)


# ---------------------------------------------------------------- writing

def _layer_key(name: str) -> tuple[int | None, str]:
    m = _LAYER.match(name)
    return (int(m.group("index")), m.group("rel")) if m else (None, name)


def _scan(adapter: Adapter):
    """(ranks, scales) per module, one pass over the factors' shapes only."""
    ranks, scales = {}, {}
    for m in adapter.modules():
        check_kernel_known(adapter, m)
        if m.kind == "conv":
            raise UnsupportedError(f"module {m.name!r} is a conv layer; MLX-LM LoRA has no conv layers")
        if naming.split_component(m.name)[0] is not None:
            raise UnsupportedError(f"module {m.name!r} belongs to a diffusion pipeline; MLX-LM adapters are "
                                   "for language models")
        ranks[m.name], scales[m.name] = m.rank, m.scale
    return ranks, scales


def write(adapter: Adapter, dest: Path) -> None:
    import torch

    check_no_passthrough(adapter, NAME)
    ranks, scales = _scan(adapter)
    if not ranks:
        raise BadInputError("no LoRA modules to write")
    rank, scale = max(ranks.values()), most_common(scales.values())
    folded, padded = [], []
    with StreamingWriter(dest / WEIGHTS_FILE) as writer:
        for m in adapter.modules():
            up, down = fold_scale(m.up, m.down, m.scale / scale)
            if m.scale != scale:
                folded.append(m.name)
            if m.rank < rank:  # zero directions leave the update unchanged; MLX wants one rank
                padded.append(m.name)
                up = torch.cat([up, up.new_zeros(up.shape[0], rank - m.rank)], dim=1)
                down = torch.cat([down, down.new_zeros(rank - m.rank, down.shape[1])], dim=0)
            writer.add(f"{m.name}.lora_a", down.T.contiguous())
            writer.add(f"{m.name}.lora_b", up.T.contiguous())
        writer.finish({"format": "mlx"})
    cfg = _config(adapter, ranks, rank, scale, folded, padded)
    (dest / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _config(adapter: Adapter, ranks: dict, rank: int, scale: float, folded: list, padded: list) -> dict:
    cfg = dict(adapter.config) if adapter.format == NAME else {}
    if adapter.format == "peft" and adapter.config.get("base_model_name_or_path"):
        cfg.setdefault("model", adapter.config["base_model_name_or_path"])
    layers = [_layer_key(n) for n in ranks]
    indices = [i for i, _ in layers if i is not None]
    params = dict(cfg.get("lora_parameters") or {})
    params.update(rank=rank, scale=int_if_whole(scale), keys=sorted({rel for _, rel in layers}))
    params.setdefault("dropout", 0.0)
    cfg.update(fine_tune_type="lora", lora_parameters=params)
    if adapter.format != NAME or "num_layers" not in cfg:
        # MLX puts LoRA on the last num_layers blocks; counting from block 0 covers every block we hold
        cfg["num_layers"] = max(indices) + 1 if indices else -1
    cfg.pop("lora_convert", None)
    if folded or padded:
        cfg["lora_convert"] = {"global_scale": scale, "scale_folded_into_factors": folded,
                               "rank_zero_padded": padded,
                               "note": "MLX has one scale and one rank: per-module scale ratios are multiplied "
                                       "into lora_a/lora_b (sqrt on each), smaller ranks padded with zeros"}
    return cfg


register(FunctionFormat(NAME, LABEL, detect, read, write, scan=scan, output_is_dir=OUTPUT_IS_DIR,
                           dir_files=(CONFIG_FILE, WEIGHTS_FILE)))
