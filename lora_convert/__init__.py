"""lora_convert: compress LoRA adapters into LoRA-Mini form, store them tiny, restore them.

    >>> import lora_convert as lc                                               # doctest: +SKIP
    >>> adapter = lc.load_adapter("fixtures/peft-tiny-llama")
    >>> mini = lc.compress(adapter, outer="random", seed=7, outer_dim=64, rank=8)
    >>> report = lc.save(mini, "mini")          # fits stream module by module
    >>> restored = lc.reconstruct(lc.load("mini"))
    >>> lc.save_adapter(restored, "restored")   # a standard PEFT directory again

Attributes are imported on first use, so light submodules (the test Hub server, the
RNG spec) do not pay for importing torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "compress": "api", "load": "api", "load_adapter": "api", "reconstruct": "api", "save": "api",
    "save_adapter": "api", "verify": "api",
    "Adapter": "adapter", "LoraModule": "adapter",
    "MiniAdapter": "container", "MiniModule": "container",
    "FidelityReport": "report",
    "LoraConvertError": "errors", "BadInputError": "errors", "UnsupportedError": "errors",
    "FormatDetectionError": "errors", "IntegrityError": "errors", "HubError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lora_convert' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
