"""Recovery and training of LoRA-Mini adapters, and the torch layers they train.

The layers (frozen outers, trainable inners) are injected into a model by the adapter's module
names; trained inners are exported back into a LoRA-Mini file with the same seeds and
fingerprints.

    >>> import lora_convert as lc, lora_convert.recovery as rec            # doctest: +SKIP
    >>> mini = lc.load("mini")
    >>> layers = rec.inject(model, mini)               # {module name: MiniLayer}; base frozen
    >>> ...                                            # train rec.inner_parameters(layers.values())
    >>> rec.export_inner(layers, mini, "mini-trained")

The layers need torch only; recover / evaluate / train also need transformers and accelerate
(the ``train`` extra).
"""
from .export import export_inner
from .inject import eject, find_layers, inject, resolve_names
from .layers import MODES, MiniLayer, inner_parameters, set_mode, use_mode

__all__ = ["MiniLayer", "MODES", "inject", "eject", "find_layers", "resolve_names", "export_inner",
           "inner_parameters", "set_mode", "use_mode"]
