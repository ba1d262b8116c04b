"""On-disk adapter layouts, one module each (see base.AdapterFormat), behind a registry.

A layout module is found by its file name and imported on first use of the registry, so the
CLI lists the layouts without importing them (or torch): adding a layout is adding a module.
"""
from __future__ import annotations

import importlib
import math
import os
import pkgutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..atomic import atomic_output
from ..errors import BadInputError, FormatDetectionError
from .base import AdapterFormat, AdapterHeader, ModuleHeader, register, registered

if TYPE_CHECKING:
    from ..adapter import Adapter

__all__ = ["AdapterFormat", "AdapterHeader", "ModuleHeader", "REGISTRY", "register", "names", "detect", "read", "scan",
           "write", "label"]

_HELPERS = {"base", "naming", "flux"}  # modules of this package that are not layouts


def names() -> list[str]:
    """Every layout's name, without importing the layout modules."""
    found = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_") and m.name not in _HELPERS}
    return sorted(found | set(registered()))


class _Registry(Mapping):
    """name -> AdapterFormat; the first lookup imports every layout module (each registers itself)."""

    def _formats(self) -> dict[str, AdapterFormat]:
        for name in names():
            if name not in registered():
                importlib.import_module(f"{__name__}.{name}")
                if name not in registered():
                    raise RuntimeError(f"layout module {__name__}.{name} registered no format named {name!r}")
        return registered()

    def __getitem__(self, name: str) -> AdapterFormat:
        return self._formats()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._formats()))

    def __len__(self) -> int:
        return len(self._formats())


REGISTRY: Mapping[str, AdapterFormat] = _Registry()


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
    hits = [name for name, fmt in REGISTRY.items() if fmt.detect(path)]
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
    adapter = _format(fmt).read(Path(path), **options)
    adapter.load_module = _checked(adapter.load_module, adapter.source or str(path))
    return adapter


def scan(path: str | os.PathLike, fmt: str | None = None, **options) -> AdapterHeader | None:
    """What `read` and loading every module would find, checked the same way, without torch
    (AdapterFormat.scan); None where the layout (or this file: a PEFT pickle) needs read()."""
    fmt = fmt or detect(path)
    header = _format(fmt).scan(Path(path), **options)
    if header is not None:  # each module's scale checked before the next is scanned, as read() does
        header.modules = [m for m in header.modules if _check_scale(m, header.source or str(path)) is None]
    return header


def _check_scale(m, path) -> None:
    if not math.isfinite(m.alpha) or not math.isfinite(m.scale):
        raise BadInputError(f"module {m.name!r}: alpha/scale is not a finite number", path)


def _checked(load, path: str):
    """Every format's modules, checked after the reader's own arithmetic (Tucker folds,
    LoHa/LoKr conversion) too: finite factors and scale, or one BadInputError."""
    import torch

    from ..st import require_finite

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
    layout = _format(fmt)
    try:
        with atomic_output(dest, layout.writes_dir(dest)) as tmp:
            layout.write(adapter, tmp)
    except BadInputError as exc:
        if exc.path is None:  # a writer's refusal: name the output it refused to write
            raise type(exc)(f"cannot write {fmt}: {exc.problem}", dest) from None
        raise


def label(adapter: Adapter) -> str:
    """Human-readable layout name with the detected variant, e.g. "kohya (SDXL)"."""
    layout = REGISTRY.get(adapter.format)
    return adapter.format if layout is None else layout.describe(adapter)


def _format(fmt: str) -> AdapterFormat:
    try:
        return REGISTRY[fmt]
    except KeyError:
        raise BadInputError(f"unknown format {fmt!r} (known: {', '.join(REGISTRY)})") from None
