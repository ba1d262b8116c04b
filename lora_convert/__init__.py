"""lora_convert: compress LoRA adapters into LoRA-Mini form, store them tiny, restore them.

    >>> import lora_convert as lc                                               # doctest: +SKIP
    >>> adapter = lc.load_adapter("fixtures/peft-tiny-llama")
    >>> mini = lc.compress(adapter, outer="random", seed=7, outer_dim=64, rank=8)
    >>> report = lc.save(mini, "mini")          # fits stream module by module
    >>> restored = lc.reconstruct(lc.load("mini"))
    >>> lc.save_adapter(restored, "restored")   # a standard PEFT directory again
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

from .errors import BadInputError, FormatDetectionError, HubError, IntegrityError, LoraConvertError, UnsupportedError
from .report import FidelityReport

# The verbs and adapter classes import torch: they load on first use, so that `lora-convert
# --help` and every module under lora_convert start without it (CLI start-up).
_LAZY = {"compress": "api", "load": "api", "load_adapter": "api", "reconstruct": "api", "save": "api",
         "save_adapter": "api", "verify": "api", "Adapter": "adapter", "LoraModule": "adapter",
         "MiniAdapter": "container", "MiniModule": "container", "apply": "modeling"}

if TYPE_CHECKING:
    from .adapter import Adapter, LoraModule
    from .api import compress, load, load_adapter, reconstruct, save, save_adapter, verify
    from .container import MiniAdapter, MiniModule
    from .modeling import apply


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["compress", "load", "load_adapter", "reconstruct", "save", "save_adapter", "verify",
           "Adapter", "LoraModule", "MiniAdapter", "MiniModule", "FidelityReport",
           "LoraConvertError", "BadInputError", "UnsupportedError", "FormatDetectionError", "IntegrityError",
           "HubError", "apply"]
