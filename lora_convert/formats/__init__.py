"""On-disk adapter layouts, one module each, behind a small registry.

Each format module provides:
    NAME: str                   registry key, also recorded in LoRA-Mini metadata
    LABEL: str                  human-readable name for `inspect`
    OUTPUT_IS_DIR: bool         whether `write` produces a directory or a single file
    detect(path) -> bool        cheap check (file names, key patterns); no tensors loaded
    read(path, **options) -> Adapter
    write(adapter, dest) -> None   dest is a temporary path the caller publishes atomically
Optional:
    label(adapter) -> str       LABEL with the detected variant, e.g. "kohya (SDXL)"
    output_is_dir(dest) -> bool when the destination decides (diffusers: file or directory)
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..adapter import Adapter
from ..atomic import atomic_output
from ..errors import BadInputError, FormatDetectionError
from ..st import require_finite
from . import diffusers, kohya, lycoris, mlx, peft

REGISTRY: dict[str, object] = {m.NAME: m for m in (peft, kohya, lycoris, diffusers, mlx)}


def register(module) -> None:
    """Add a format module (see this package's docstring for the interface)."""
    REGISTRY[module.NAME] = module


def _sample_keys(path: Path, n: int = 5) -> list[str]:
    from ..st import read_header

    target = path
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        if not found:
            return []
        target = found[0]
    try:
        return list(read_header(target).tensors)[:n]
    except BadInputError:
        return []


def detect(path: str | os.PathLike) -> str:
    """The name of the one format that recognises `path`; never guesses."""
    path = Path(path)
    if not path.exists():
        raise BadInputError("no such file or directory", path)
    hits = [name for name, mod in REGISTRY.items() if mod.detect(path)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        keys = _sample_keys(path)
        hint = f"; first keys: {', '.join(keys)}" if keys else ""
        raise FormatDetectionError(f"not a recognised LoRA layout (known: {', '.join(REGISTRY)}){hint}", path)
    raise FormatDetectionError(f"ambiguous layout: matches {', '.join(hits)}; pass --from to choose", path)


def read(path: str | os.PathLike, fmt: str | None = None, **options) -> Adapter:
    """Read an adapter in `fmt` (detected when None)."""
    fmt = fmt or detect(path)
    adapter = _module(fmt).read(Path(path), **options)
    adapter.load_module = _checked(adapter.load_module, adapter.source or str(path))
    return adapter


def _checked(load, path: str):
    """Every format's modules, checked after the reader's own arithmetic (Tucker folds,
    LoHa/LoKr conversion) too: finite factors and scale, or one BadInputError."""
    def load_module(name: str):
        try:
            m = load(name)
        except torch.linalg.LinAlgError as exc:
            raise BadInputError(f"module {name!r}: factors cannot be decomposed "
                                f"({str(exc).splitlines()[0][:120]})", path) from None
        if not m.checked_finite:
            require_finite(m.down, f"module {name!r} down factor (as converted)", path)
            require_finite(m.up, f"module {name!r} up factor (as converted)", path)
        if not math.isfinite(m.alpha) or not math.isfinite(m.scale):
            raise BadInputError(f"module {name!r}: alpha/scale is not a finite number", path)
        return m
    return load_module


def write(adapter: Adapter, dest: str | os.PathLike, fmt: str) -> None:
    """Write `adapter` in `fmt` to `dest` atomically."""
    mod = _module(fmt)
    is_dir = mod.output_is_dir(dest) if hasattr(mod, "output_is_dir") else mod.OUTPUT_IS_DIR
    try:
        with atomic_output(dest, is_dir) as tmp:
            mod.write(adapter, tmp)
    except BadInputError as exc:
        if exc.path is None:  # a writer's refusal: name the output it refused to write
            raise type(exc)(f"cannot write {fmt}: {exc.problem}", dest) from None
        raise


def label(adapter: Adapter) -> str:
    """Human-readable layout name with the detected variant, e.g. "kohya (SDXL)"."""
    mod = REGISTRY.get(adapter.format)
    if mod is None:
        return adapter.format
    return mod.label(adapter) if hasattr(mod, "label") else getattr(mod, "LABEL", adapter.format)


def _module(fmt: str):
    try:
        return REGISTRY[fmt]
    except KeyError:
        raise BadInputError(f"unknown format {fmt!r} (known: {', '.join(REGISTRY)})") from None
