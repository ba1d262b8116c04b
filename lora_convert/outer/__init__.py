"""Sources of the fixed outer matrices U (out×a) and V (b×in), one module each (see
base.OuterSource), behind a registry.

A source module is found by its file name and imported on first use of the registry, so the
CLI lists the sources without importing them (or torch, numpy): adding a source is adding a module.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil

from ..errors import BadInputError
from .base import OuterSource, register, registered

__all__ = ["OuterSource", "register", "names", "get", "sources"]

_HELPERS = {"base", "rng"}  # modules of this package that are not sources


@functools.cache
def _module_names() -> frozenset[str]:
    """The source modules' names, scanned once: get() runs per module of every adapter."""
    return frozenset(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_") and m.name not in _HELPERS)


def names() -> list[str]:
    """Every source's name, without importing the source modules."""
    return sorted(_module_names() | set(registered()))


def sources() -> dict[str, OuterSource]:
    """name -> OuterSource, every source module imported (each registers itself)."""
    for name in names():
        if name not in registered():
            importlib.import_module(f"{__name__}.{name}")
            if name not in registered():
                raise RuntimeError(f"outer module {__name__}.{name} registered no source named {name!r}")
    return {name: registered()[name] for name in names()}


def get(name: str) -> OuterSource:
    found = sources()
    try:
        return found[name]
    except (KeyError, TypeError):
        raise BadInputError(f"unknown outer source {name!r} (known: {', '.join(found)})") from None
