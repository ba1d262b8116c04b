"""Write trained inner matrices back into a LoRA-Mini file (same outers and seeds, new checksums)."""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import torch
from torch import nn

from .. import container
from ..adapter import Adapter
from ..container import DTYPES, MiniAdapter, MiniModule
from ..errors import BadInputError
from ..mathcore import frobenius, scaled_relative_error
from ..report import FidelityReport
from .inject import find_layers
from .layers import MiniLayer


def export_inner(layers: nn.Module | Mapping[str, MiniLayer], mini: MiniAdapter, path: str | os.PathLike,
                 teacher: Adapter | None = None, dtype: str | None = None, extra_fidelity: dict | None = None
                 ) -> FidelityReport:
    """Save `mini` with each module's X, Y replaced by the trained ones from `layers`.

    `layers` is a model holding MiniLayers or the dict `inject` returned. Outer specs
    (seeds, fingerprints, stored U/V) are kept as they are; tensor checksums are
    recomputed by container.save. Fidelity is measured against `teacher`'s factors
    when given; otherwise the adapter is its own reference (trained from scratch).
    `dtype` (fp32/fp16/bf16) overrides the storage dtype; by default each module
    keeps the dtype its inners had in `mini`. `extra_fidelity` is merged into every
    module's fidelity record (e.g. that it was recovered in function space).
    """
    layers = find_layers(layers) if isinstance(layers, nn.Module) else dict(layers)
    missing = [n for n in mini.module_names if n not in layers]
    if missing:
        raise BadInputError(f"no trained layer for modules {missing[:3]}")

    def load(name: str) -> MiniModule:
        m = trained_module(mini.module(name), layers[name], dtype)
        m.fidelity = fidelity(m, teacher.module(name) if teacher else None) | (extra_fidelity or {})
        return m

    trained = dataclasses.replace(mini, load_module=load, load_window=None)
    return container.save(trained, path)


def trained_module(m: MiniModule, layer: MiniLayer, dtype: str | None = None) -> MiniModule:
    store = DTYPES[dtype] if dtype else m.X.dtype
    X, Y = (t.to(store).contiguous() for t in layer.inner_matrices())
    if tuple(X.shape) != tuple(m.X.shape) or tuple(Y.shape) != tuple(m.Y.shape):
        raise BadInputError(f"module {m.name!r}: trained inner shapes {tuple(X.shape)}, {tuple(Y.shape)} "
                            f"differ from the file's {tuple(m.X.shape)}, {tuple(m.Y.shape)}")
    if not (torch.isfinite(X).all() and torch.isfinite(Y).all()):
        raise BadInputError(f"module {m.name!r}: training produced non-finite inner values (lower the lr)")
    return dataclasses.replace(m, X=X, Y=Y)


def fidelity(m: MiniModule, teacher=None) -> dict:
    """Weight-space error of scale·U X Y V against the teacher's scale·B A (float64, from factors)."""
    B2, A2 = m.factors()
    if teacher is None:
        return {"rel_error": 0.0, "energy": (m.scale * frobenius(B2, A2)) ** 2}
    rel, ref = scaled_relative_error(teacher.up, teacher.down, teacher.scale, B2, A2, m.scale)
    # A zero teacher with a non-zero student has no finite relative error; the metadata is strict JSON.
    return {"rel_error": min(rel, 1e300), "energy": ref**2}
