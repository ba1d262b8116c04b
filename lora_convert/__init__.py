"""lora_convert: compress LoRA adapters into LoRA-Mini form, store them tiny, restore them.

    >>> import lora_convert as lc                                               # doctest: +SKIP
    >>> adapter = lc.load_adapter("fixtures/peft-tiny-llama")
    >>> mini = lc.compress(adapter, outer="random", seed=7, outer_dim=64, rank=8)
    >>> report = lc.save(mini, "mini")          # fits stream module by module
    >>> restored = lc.reconstruct(lc.load("mini"))
    >>> lc.save_adapter(restored, "restored")   # a standard PEFT directory again
"""
from __future__ import annotations

__version__ = "0.1.0"

from .adapter import Adapter, LoraModule
from .api import compress, load, load_adapter, reconstruct, save, save_adapter, verify
from .container import MiniAdapter, MiniModule
from .errors import BadInputError, FormatDetectionError, HubError, IntegrityError, LoraConvertError, UnsupportedError
from .report import FidelityReport

__all__ = ["compress", "load", "load_adapter", "reconstruct", "save", "save_adapter", "verify",
           "Adapter", "LoraModule", "MiniAdapter", "MiniModule", "FidelityReport",
           "LoraConvertError", "BadInputError", "UnsupportedError", "FormatDetectionError", "IntegrityError",
           "HubError", "apply"]
from .apply import apply  # noqa: E402  (top layer: LoRA-Mini layers in a model, no reconstruct step)
