"""Write trained inner matrices back into a LoRA-Mini file (same outers and seeds, new checksums)."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping

import torch
from torch import nn

from .. import container
from ..adapter import Adapter
from ..container import DTYPES, FIDELITY_DIGITS, MiniAdapter, MiniModule, short_figure
from ..errors import BadInputError, OverBudgetError
from ..mathcore import frobenius, scaled_relative_error
from ..report import FidelityReport
from .inject import find_layers
from .layers import MiniLayer


def export_inner(layers: nn.Module | Mapping[str, MiniLayer], mini: MiniAdapter, path: str | os.PathLike,
                 teacher: Adapter | None = None, dtype: str | None = None, extra_fidelity: dict | None = None,
                 max_bytes: int | None = None) -> FidelityReport:
    """Save `mini` with each module's X, Y replaced by the trained ones from `layers`.

    `layers` is a model holding MiniLayers or the dict `inject` returned. Outer specs
    (seeds, fingerprints) are kept as they are; stored outers get the trained factors (see
    MiniLayer); tensor checksums are recomputed by container.save. Each module is stored as
    its layer's `storage` says (the file's quant spec, or a new one, or its float dtype), so
    the data bytes of a module whose storage did not change keep their size. Fidelity is
    measured against `teacher`'s factors when given; otherwise the adapter is its own
    reference (trained from scratch). `dtype` (fp32/fp16/bf16) overrides the storage dtype of
    float modules. `extra_fidelity` is merged into every module's fidelity record (e.g. that
    it was recovered in function space).

    With `max_bytes` (recover passes the start file's size) the header is kept within it: the
    fidelity figures are written to FIDELITY_DIGITS significant digits and never longer than
    the start file's, then rel_error to fewer digits while the file does not fit. An output
    that cannot fit even so (a file of a few modules cannot absorb the recovery note) is
    written anyway; the caller measures it.
    """
    layers = find_layers(layers) if isinstance(layers, nn.Module) else dict(layers)
    missing = [n for n in mini.module_names if n not in layers]
    if missing:
        raise BadInputError(f"no trained layer for modules {missing[:3]}")

    def saver(digits: int | None, budget: int | None):
        def load(name: str) -> MiniModule:
            start = mini.module(name)
            m = trained_module(start, layers[name], dtype)
            fid = fidelity(m, teacher.module(name) if teacher else None)
            if digits is not None:  # the energy is the teacher's, unchanged: only rel_error gets shorter
                fid = {k: fitted_figure(v, start.fidelity.get(k), digits if k == "rel_error" else FIDELITY_DIGITS)
                       for k, v in fid.items()}
            m.fidelity = fid | (extra_fidelity or {})
            return m

        trained = dataclasses.replace(mini, load_module=load, load_window=None)
        return container.save(trained, path, max_bytes=budget)

    if max_bytes is None:
        return saver(None, None)
    for digits in range(FIDELITY_DIGITS, 0, -1):
        try:
            return saver(digits, max_bytes)
        except OverBudgetError:
            continue
    return saver(1, None)


def fitted_figure(x: float, old, digits: int) -> float:
    """`x` to at most `digits` significant digits, fewer where needed (down to one) so that its
    JSON is no longer than that of `old`, the start file's figure."""
    limit = len(json.dumps(old)) if isinstance(old, (int, float)) and not isinstance(old, bool) else None
    for d in range(digits, 0, -1):
        v = short_figure(x, d)
        if limit is None or len(json.dumps(v)) <= limit:
            return v
    return short_figure(x, 1)


def trained_module(m: MiniModule, layer: MiniLayer, dtype: str | None = None) -> MiniModule:
    """`m` with the layer's trained values, stored as the layer's `storage` says: quantized modules
    hold float32 factors until container.save encodes them (what the layer's rounding assumes);
    stored outers hold the trained factors as U, V with X = Y = I (the same shapes)."""
    spec = {k: layer.storage[k] for k in ("bits", "group")} if "bits" in layer.storage else {}

    def store(t: torch.Tensor) -> torch.dtype:
        return torch.float32 if spec else DTYPES[dtype] if dtype else t.dtype

    X, Y = layer.inner_matrices()
    U, V = m.U, m.V
    if layer.factored:
        k = m.inner_rank
        U, V = X.to(store(m.U)), Y.to(store(m.V))
        X, Y = torch.eye(k), torch.eye(k)
        if tuple(U.shape) != tuple(m.U.shape) or tuple(V.shape) != tuple(m.V.shape):
            raise BadInputError(f"module {m.name!r}: trained factor shapes {tuple(U.shape)}, {tuple(V.shape)} "
                                f"differ from the file's {tuple(m.U.shape)}, {tuple(m.V.shape)}")
    X, Y = X.to(store(m.X)).contiguous(), Y.to(store(m.Y)).contiguous()
    if tuple(X.shape) != tuple(m.X.shape) or tuple(Y.shape) != tuple(m.Y.shape):
        raise BadInputError(f"module {m.name!r}: trained inner shapes {tuple(X.shape)}, {tuple(Y.shape)} "
                            f"differ from the file's {tuple(m.X.shape)}, {tuple(m.Y.shape)}")
    if not all(bool(torch.isfinite(t).all()) for t in (X, Y, U, V)):
        raise BadInputError(f"module {m.name!r}: training produced non-finite values (lower the lr)")
    return dataclasses.replace(m, U=U, V=V, X=X, Y=Y, quant=spec)


def fidelity(m: MiniModule, teacher=None) -> dict:
    """Weight-space error of scale·U X Y V against the teacher's scale·B A (float64, from factors)."""
    B2, A2 = m.factors()
    if teacher is None:
        return {"rel_error": 0.0, "energy": (m.scale * frobenius(B2, A2)) ** 2}
    rel, ref = scaled_relative_error(teacher.up, teacher.down, teacher.scale, B2, A2, m.scale)
    # A zero teacher with a non-zero student has no finite relative error; the metadata is strict JSON.
    return {"rel_error": min(rel, 1e300), "energy": ref**2}
