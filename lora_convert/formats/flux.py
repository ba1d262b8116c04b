"""Flux LoRA modules between the original (BFL) layout and diffusers'.

kohya and ComfyUI name Flux's layers as Black Forest Labs' reference code does, with fused
projections: a double block's ``img_attn.qkv`` is diffusers' ``attn.to_q``, ``to_k``, ``to_v``
stacked by rows, and a single block's ``linear1`` is ``attn.to_q``, ``to_k``, ``to_v`` and
``proj_mlp``. The rules follow diffusers' own kohya → diffusers converter:

- split: every part keeps the fused module's down factor, and its rows of the up factor
  (exact); columns of a part's up factor that are all zero are dropped with their down rows, so
  a block-diagonal fusion splits back to the original ranks;
- fuse: down factors stacked (each scale folded in), up factors block-diagonal, alpha = rank
  (scale 1): exact; a part the adapter lacks is zero rows;
- ``final_layer.adaLN_modulation.1`` is ``norm_out.linear`` with the two halves of its output
  (shift, scale) in the other order.

Part widths: each of q, k, v is the block's width (the fused layer's input width); the rest of
``linear1`` is the MLP. Fusing a single block without ``proj_mlp`` takes Flux's MLP ratio, 4.
"""
from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

from ..adapter import Adapter, LoraModule
from ..errors import UnsupportedError
from . import naming

if TYPE_CHECKING:
    import torch

_DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
           "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
           "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
           "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
           "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",),
           "img_mod.lin": ("norm1.linear",), "txt_mod.lin": ("norm1_context.linear",)}
_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
           "modulation.lin": ("norm.linear",)}
_GLOBAL = {"img_in": "x_embedder", "txt_in": "context_embedder",
           "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
           "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
           "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
           "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
           "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
           "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
           "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
SWAPPED = "final_layer.adaLN_modulation.1"
MLP_RATIO = 4


def bfl_parts(path: str) -> tuple[str, ...] | None:
    """diffusers paths (under the transformer) of a BFL path, in row order; None if unknown."""
    if path in _GLOBAL:
        return (_GLOBAL[path],)
    m = re.match(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$", path)
    if not m:
        return None
    table, head = (_DOUBLE, "transformer_blocks") if m.group(1) == "double_blocks" else (_SINGLE,
                                                                                        "single_transformer_blocks")
    parts = table.get(m.group(3))
    return None if parts is None else tuple(f"{head}.{m.group(2)}.{p}" for p in parts)


def _diffusers_index() -> dict:
    """Pattern of every diffusers path -> (BFL path template, part index, number of parts)."""
    index = {p: (b, 0, 1) for b, p in _GLOBAL.items()}
    for blocks, head, table in (("double_blocks", "transformer_blocks", _DOUBLE),
                                ("single_blocks", "single_transformer_blocks", _SINGLE)):
        for bfl, parts in table.items():
            for i, p in enumerate(parts):
                index[f"{head}.{{n}}.{p}"] = (f"{blocks}.{{n}}.{bfl}", i, len(parts))
    return index


_TO_BFL = _diffusers_index()


def diffusers_group(path: str) -> tuple[str, int, int] | None:
    """(BFL path, part index, parts) of a diffusers Flux path; None if it has no BFL equivalent."""
    m = re.match(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", path)
    key, n = (f"{m.group(1)}.{{n}}.{m.group(3)}", m.group(2)) if m else (path, "")
    hit = _TO_BFL.get(key)
    return None if hit is None else (hit[0].format(n=n), hit[1], hit[2])


def is_diffusers_flux(names, metadata: dict | None = None) -> bool:
    """Whether diffusers-named transformer modules are Flux's (SD3's MMDiT shares many names)."""
    paths = [p for c, p in map(naming.split_component, names) if c == "transformer"]
    marks = ("single_transformer_blocks.", "x_embedder", "time_text_embed.guidance_embedder.")
    return bool(paths) and (any(p.startswith(marks) for p in paths)
                            or (metadata or {}).get("ss_base_model_version", "").startswith("flux"))


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    import torch

    a, b = up.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _renamed(m: LoraModule, name: str, swap: bool) -> LoraModule:
    return LoraModule(name=name, down=m.down, up=_swap_halves(m.up) if swap else m.up, alpha=m.alpha,
                      use_rslora=m.use_rslora, kind=m.kind, kernel=m.kernel, checked_finite=m.checked_finite)


def _widths(bfl_path: str, in_features: int, out_features: int | None, mlp: int | None) -> list[int]:
    if bfl_path.endswith("linear1"):
        h = in_features
        return [h, h, h, (out_features - 3 * h) if out_features is not None else (mlp or MLP_RATIO * h)]
    return [in_features] * 3


def to_diffusers(adapter: Adapter) -> Adapter:
    """The adapter with BFL-named Flux modules split/renamed into diffusers' modules (lazy)."""
    plan = {}
    for name in adapter.module_names:
        comp, path = naming.split_component(name)
        if comp != "transformer" or not naming.is_bfl_flux(path):
            plan[name] = (name, None, 1, False)
            continue
        parts = bfl_parts(path)
        if parts is None:
            raise UnsupportedError(f"module {name!r}: Flux layer {path!r} has no diffusers equivalent known here")
        for i, p in enumerate(parts):
            if f"transformer.{p}" in plan:
                raise UnsupportedError(f"module {name!r} and another both map to diffusers' transformer.{p}")
            plan[f"transformer.{p}"] = (name, i, len(parts), path == SWAPPED)
    source = functools.lru_cache(maxsize=2)(adapter.load_module)  # the parts of one fused module load it once

    def load(new: str) -> LoraModule:
        orig, i, n, swap = plan[new]
        m = source(orig)
        if n == 1:
            return _renamed(m, new, swap) if new != orig or swap else m
        widths = _widths(naming.split_component(orig)[1], m.in_features, m.out_features, None)
        if sum(widths) != m.out_features or min(widths) <= 0:
            raise UnsupportedError(f"module {orig!r}: {m.out_features} output rows do not split into Flux's "
                                   f"parts of its {m.in_features}-wide block")
        start = sum(widths[:i])
        up = m.up[start:start + widths[i]]
        keep = (up != 0).any(dim=0)  # a block-diagonal fusion: only this part's own columns
        if not bool(keep.any()):
            keep[0] = True
        up, down = up[:, keep], m.down[keep]
        rank = int(keep.sum())
        return LoraModule(name=new, down=down.contiguous(), up=up.contiguous(), alpha=m.scale * rank, kind=m.kind,
                          kernel=m.kernel, checked_finite=m.checked_finite)

    return _like(adapter, list(plan), load)


def to_bfl(adapter: Adapter) -> Adapter:
    """The adapter with diffusers-named Flux modules fused/renamed into BFL modules (lazy)."""
    groups: dict[str, dict] = {}
    for name in adapter.module_names:
        comp, path = naming.split_component(name)
        if comp != "transformer" or naming.is_bfl_flux(path):
            groups[name] = {"parts": {0: name}, "n": 1, "swap": False, "path": path}
            continue
        hit = diffusers_group(path)
        if hit is None:
            raise UnsupportedError(f"module {name!r}: diffusers' Flux layer {path!r} has no counterpart in Flux's "
                                   "original (BFL) layout that kohya and ComfyUI use")
        bfl, i, n = hit
        g = groups.setdefault(f"transformer.{bfl}", {"parts": {}, "n": n, "swap": bfl == SWAPPED, "path": bfl})
        g["parts"][i] = name

    def load(new: str) -> LoraModule:
        g = groups[new]
        if g["n"] == 1:
            m = adapter.load_module(g["parts"][0])
            return _renamed(m, new, g["swap"]) if new != m.name or g["swap"] else m
        ms = {i: adapter.load_module(n) for i, n in sorted(g["parts"].items())}
        first = next(iter(ms.values()))
        mlp = ms[3].out_features if 3 in ms else None
        widths = _widths(g["path"], first.in_features, None, mlp)
        for i, m in ms.items():
            if m.in_features != first.in_features or m.out_features != widths[i] or m.kind != "linear":
                raise UnsupportedError(f"module {m.name!r} ({m.out_features}x{m.in_features}) does not fit Flux's "
                                       f"fused {g['path']} of a {first.in_features}-wide block")
        import torch

        dtype = torch.promote_types(first.dtype, torch.float32)
        rank = sum(m.rank for m in ms.values())
        down = torch.cat([m.down.double() * m.scale for m in ms.values()]).to(dtype)
        up = torch.zeros(sum(widths), rank, dtype=dtype)
        col = 0
        for i, m in ms.items():
            row = sum(widths[:i])
            up[row:row + widths[i], col:col + m.rank] = m.up
            col += m.rank
        return LoraModule(name=new, down=down, up=up, alpha=float(rank), checked_finite=all(
            m.checked_finite for m in ms.values()))

    return _like(adapter, list(groups), load)


def _like(adapter: Adapter, names: list[str], load) -> Adapter:
    return Adapter(format=adapter.format, module_names=names, load_module=load, config=adapter.config,
                   metadata=adapter.metadata, passthrough_names=list(adapter.passthrough_names),
                   load_passthrough=adapter.load_passthrough, source=adapter.source, workers=adapter.workers)


def needs_split(names) -> bool:
    return any(c == "transformer" and naming.is_bfl_flux(p) for c, p in map(naming.split_component, names))


def needs_fusion(names) -> bool:
    return any(c == "transformer" and not naming.is_bfl_flux(p) for c, p in map(naming.split_component, names))

