"""Put LoRA-Mini layers into a torch model by the adapter's module names, and take them out again."""
from __future__ import annotations

from torch import nn

from ..adapter import Adapter
from ..container import MiniAdapter
from ..errors import BadInputError
from .layers import MiniLayer


def resolve_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Adapter module name -> the model's module path.

    PEFT names are the model's named_modules() paths, but an adapter trained on a
    task head (``bert.encoder...``) may be applied to the bare model (``encoder...``)
    or the other way round; a unique match at a dot boundary is accepted.
    """
    paths = [p for p, _ in model.named_modules() if p]
    known = set(paths)
    out = {}
    for name in names:
        if name in known:
            out[name] = name
            continue
        hits = [p for p in paths if p.endswith("." + name) or name.endswith("." + p)]
        if len(hits) != 1:
            why = "no module" if not hits else f"{len(hits)} modules ({', '.join(hits[:3])})"
            raise BadInputError(f"adapter module {name!r} matches {why} in the {type(model).__name__} "
                                "(wrong base model?)")
        out[name] = hits[0]
    return out


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def inject(model: nn.Module, mini: MiniAdapter, teacher: Adapter | None = None,
           freeze: bool = True) -> dict[str, MiniLayer]:
    """Wrap each module the adapter names in a :class:`MiniLayer`; returns {adapter name: layer}.

    With `teacher` (the original LoRA adapter) every layer also carries the teacher
    pair, so one model serves as base, teacher and student (see layers.use_mode).
    With `freeze` (the default, as PEFT does) every model parameter except the inner
    matrices stops requiring gradients.
    """
    _check_same_modules(mini, teacher)
    paths = resolve_names(model, list(mini.module_names))
    layers, shared = {}, {}  # shared: one normalised copy of each outer the modules have in common
    for name in mini.module_names:
        base = model.get_submodule(paths[name])
        if isinstance(base, MiniLayer):
            raise BadInputError(f"module {name!r} already holds a LoRA-Mini layer")
        layer = MiniLayer(base, mini.module(name), teacher.module(name) if teacher else None, shared=shared)
        _replace(model, paths[name], layer)
        layers[name] = layer
    if freeze:
        freeze_all_but_inner(model)
    return layers


def freeze_all_but_inner(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in find_layers(model).values():
        layer.X.requires_grad_(True)
        layer.Y.requires_grad_(True)


def _check_same_modules(mini: MiniAdapter, teacher: Adapter | None) -> None:
    if teacher is None:
        return
    diff = sorted(set(mini.module_names) ^ set(teacher.module_names))
    if diff:
        raise BadInputError(f"the teacher adapter and the LoRA-Mini file name different modules: {diff[:3]}",
                            teacher.source or None)


def find_layers(model: nn.Module) -> dict[str, MiniLayer]:
    """The MiniLayers in `model`, keyed by adapter module name."""
    return {m.name: m for m in model.modules() if isinstance(m, MiniLayer)}


def eject(model: nn.Module) -> None:
    """Put the base modules back (the model is as before inject, parameters still frozen)."""
    for path, module in list(model.named_modules()):
        if isinstance(module, MiniLayer):
            _replace(model, path, module.base)
