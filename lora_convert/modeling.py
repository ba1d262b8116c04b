"""Use a LoRA-Mini adapter in a model directly, without writing a standard adapter first.

    >>> import lora_convert as lc                                               # doctest: +SKIP
    >>> adapters = lc.apply(model, "hf://user/my-lora-mini")          # wraps the targeted modules
    >>> adapters = lc.apply(model, "other-mini", adapter_name="style")  # a second one, now active
    >>> adapters.set_adapter("default"); adapters.merge(); adapters.unmerge()
    >>> with adapters.disabled(): base_out = model(x)

The targeted Linear / Conv2d / Embedding modules of a transformers model, a diffusers model,
or a diffusers pipeline (by component) are wrapped in an :class:`AdapterLayer` holding one
:class:`~lora_convert.recovery.MiniLayer` per adapter: outers regenerated from the seed (or
loaded, for SVD outers) and the small inner matrices, applied as thin products. The out×in ΔW
is never held; `merge` adds it into the base weight a block of rows at a time.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
from torch import nn

from .container import MiniAdapter
from .errors import BadInputError
from .formats.naming import split_component
from .recovery import MiniLayer, resolve_names

MERGE_ROWS = 1024  # rows of ΔW formed at once while merging (bounded memory for wide layers)


class AdapterLayer(nn.Module):
    """A base module plus LoRA-Mini adapters by name; the active ones add their update."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []

    def add(self, name: str, layer: MiniLayer) -> None:
        self.adapters[name] = layer

    def forward(self, x, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        for name in self.active:
            if name not in self.merged:
                out = out + self.adapters[name].delta(x).to(out.dtype)
        return out

    @torch.no_grad()
    def merge(self, name: str, sign: float = 1.0) -> None:
        """Add (sign=-1: subtract) adapter `name`'s update into the base weight."""
        layer = self.adapters[name]
        W = self.base.weight
        up, down = layer.update_factors()  # out×k, k×in (float32)
        if layer.kind == "embedding" or type(self.base).__name__ == "Conv1D":
            W = W.T  # the weight is stored transposed to the update (vocabulary×dim, in×out)
        flat = W.reshape(W.shape[0], -1) if layer.kind == "conv" else W
        if layer.kind == "conv" and flat.data_ptr() != W.data_ptr():
            raise BadInputError(f"module {layer.name!r}: cannot merge into a non-contiguous conv weight")
        for start in range(0, flat.shape[0], MERGE_ROWS):
            rows = slice(start, start + MERGE_ROWS)
            block = torch.mm(up[rows].to(torch.float32), down.to(torch.float32)) * (sign * layer.scale)
            flat[rows] += block.to(flat.dtype)

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}"


class Adapters:
    """Control of the LoRA-Mini adapters applied to a model (or a pipeline's models)."""

    def __init__(self, roots: list[nn.Module]):
        self.roots = roots

    def layers(self) -> Iterator[AdapterLayer]:
        for root in self.roots:
            for m in root.modules():
                if isinstance(m, AdapterLayer):
                    yield m

    @property
    def names(self) -> list[str]:
        seen: dict[str, None] = {}
        for layer in self.layers():
            seen.update(dict.fromkeys(layer.adapters))
        return list(seen)

    @property
    def active(self) -> list[str]:
        found: dict[str, None] = {}
        for layer in self.layers():
            found.update(dict.fromkeys(layer.active))
        return list(found)

    @property
    def merged(self) -> list[str]:
        found: dict[str, None] = {}
        for layer in self.layers():
            found.update(dict.fromkeys(layer.merged))
        return list(found)

    def set_adapter(self, names: str | list[str]) -> None:
        """Make exactly these adapters active (merged ones are unmerged first, as PEFT does)."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise BadInputError(f"no adapter named {unknown[0]!r} (loaded: {', '.join(self.names) or 'none'})")
        self.unmerge()
        for layer in self.layers():
            layer.active = [n for n in names if n in layer.adapters]

    def disable(self) -> None:
        """No adapter active: the model computes its base outputs (merged weights are restored)."""
        self.unmerge()
        for layer in self.layers():
            layer.active = []

    @contextlib.contextmanager
    def disabled(self):
        """Run the base model inside the block; the previous adapters are active again after it."""
        active, merged = self.active, self.merged
        self.disable()
        try:
            yield
        finally:
            self.set_adapter(active)
            if merged:
                self.merge()

    def merge(self) -> None:
        """Add the active adapters' updates into the base weights (they then cost nothing per token)."""
        for layer in self.layers():
            for name in layer.active:
                if name not in layer.merged:
                    layer.merge(name)
                    layer.merged.append(name)

    def unmerge(self) -> None:
        """Subtract merged updates from the base weights again."""
        for layer in self.layers():
            for name in reversed(layer.merged):
                layer.merge(name, sign=-1.0)
            layer.merged = []

    def delete(self, name: str) -> None:
        """Remove adapter `name`; modules left with no adapter get their base module back."""
        if name not in self.names:
            raise BadInputError(f"no adapter named {name!r} (loaded: {', '.join(self.names) or 'none'})")
        for layer in list(self.layers()):
            if name in layer.merged:
                layer.merge(name, sign=-1.0)
                layer.merged.remove(name)
            if name in layer.adapters:
                del layer.adapters[name]
                layer.active = [n for n in layer.active if n != name]
        self._unwrap_empty()

    def unload(self) -> None:
        """Remove every adapter (merged ones are subtracted first): the models are as before apply."""
        for name in self.names:
            self.delete(name)

    def _unwrap_empty(self) -> None:
        for root in self.roots:
            for path, m in list(root.named_modules()):
                if isinstance(m, AdapterLayer) and not len(m.adapters):
                    _replace(root, path, m.base)


def apply(model, source, adapter_name: str = "default") -> Adapters:
    """Wrap the modules a LoRA-Mini adapter targets in `model` and make it the active adapter.

    `model` is a torch model (transformers, diffusers) or a diffusers pipeline (modules go to
    the component their names start with: ``unet.``, ``text_encoder.``, ...). `source` is a
    LoRA-Mini file or directory, an ``hf://`` URI, or a loaded :class:`MiniAdapter`. Applying
    again with another `adapter_name` adds that adapter; the returned :class:`Adapters`
    switches, merges and removes them. Outputs equal PEFT's with the reconstructed adapter.
    """
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise BadInputError(f"adapter_name must be a non-empty name without dots, got {adapter_name!r}")
    mini = source if isinstance(source, MiniAdapter) else _load(source)
    if mini.passthrough_names:
        raise BadInputError(f"the adapter carries full tensors ({mini.passthrough_names[0]!r}, modules_to_save) "
                            "that LoRA-Mini layers do not apply; reconstruct it and load it with PEFT",
                            mini.source or None)
    targets = _targets(model, list(mini.module_names), mini.source)
    for root, _, _ in targets:
        for layer in Adapters([root]).layers():
            if adapter_name in layer.adapters:
                raise BadInputError(f"an adapter named {adapter_name!r} is already applied; pass another "
                                    "adapter_name or delete it first")
    built, shared = [], {}  # every layer is built (and checked against the model) before the model changes
    for root, name, path in targets:
        current = root.get_submodule(path)
        base = current.base if isinstance(current, AdapterLayer) else current
        built.append((root, path, current, MiniLayer(base, mini.module(name), register_base=False, shared=shared)))
    for root, path, current, layer in built:
        if not isinstance(current, AdapterLayer):
            current = AdapterLayer(current)
            _replace(root, path, current)
        layer.requires_grad_(False)
        current.add(adapter_name, layer)
    roots = list(dict.fromkeys(root for root, _, _ in targets))
    adapters = Adapters(roots)
    adapters.set_adapter(adapter_name)
    return adapters


def _load(source) -> MiniAdapter:
    from .api import load

    if not isinstance(source, (str, os.PathLike)):
        raise BadInputError(f"source must be a path, an hf:// URI or a MiniAdapter, got {type(source).__name__}")
    return load(source)


def _targets(model, names: list[str], source: str) -> list[tuple[nn.Module, str, str]]:
    """(root module, adapter module name, path in that root) for every adapter module."""
    if isinstance(model, nn.Module):
        return [(model, n, p) for n, p in resolve_names(model, names).items()]
    groups: dict[str, list[str]] = {}
    for n in names:  # a pipeline: each module goes to the component its name starts with
        comp = split_component(n)[0]
        if comp is None or not isinstance(getattr(model, comp, None), nn.Module):
            raise BadInputError(f"adapter module {n!r} names no component of the {type(model).__name__} "
                                "(pass the model itself, or a pipeline that has that component)", source or None)
        groups.setdefault(comp, []).append(n)
    out = []
    for comp, group in groups.items():
        root = getattr(model, comp)
        out += [(root, n, p) for n, p in resolve_names(root, group).items()]
    return out


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
