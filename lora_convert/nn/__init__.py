"""The torch side of LoRA-Mini: layers with frozen outers and trainable inners, injection into a
model by the adapter's module names, and export of trained inners back into a LoRA-Mini file.

    >>> import lora_convert as lc, lora_convert.nn as lcnn                # doctest: +SKIP
    >>> mini = lc.load("mini")
    >>> layers = lcnn.inject(model, mini)              # {module name: MiniLayer}; base frozen
    >>> ...                                            # train lcnn.inner_parameters(layers.values())
    >>> lcnn.export_inner(layers, mini, "mini-trained")

Requires torch only; recovery and training (lora_convert.recover) also need transformers
and accelerate.
"""
from .export import export_inner
from .inject import eject, find_layers, inject, resolve_names
from .layers import MODES, MiniLayer, inner_parameters, set_mode, use_mode

__all__ = ["MiniLayer", "MODES", "inject", "eject", "find_layers", "resolve_names", "export_inner",
           "inner_parameters", "set_mode", "use_mode"]
