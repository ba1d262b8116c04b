"""compress with calibration: fit each module's output on calibration data, not its weights.

For a module with input statistics (recovery.calibration), the whitening factor L (C + λI = L Lᵀ)
turns the output error on the data into a Frobenius norm, ||(ΔW' − ΔW) L||_F (see whiten):
* svd outers: the whitened truncation. U holds the top-k left singular vectors of B·A·L,
  V = Vw·L⁻¹ (its rows are no longer orthonormal), X = Y = diag(√S_k) of the whitened spectrum.
* random outers: the same regenerated U, V; X, Y minimise the whitened error (A → A L, V → V L).
The file format is unchanged: readers need no calibration to use the result.

One module at a time (each has its own L, so stacks would share nothing). Fidelity records the
weight-space `rel_error` as always (so verify --against agrees) plus `calibrated_rel_error`, the
relative output error on the calibration data.
"""
from __future__ import annotations

import numpy as np
import torch

from .adapter import LoraModule
from .container import MiniModule
from .errors import BadInputError
from .lru import BytesLRU
from .mathcore import OuterBasis, choose_rank, difference_norm, frobenius
from .whiten import fit_inner_whitened, whitened_basis, whitened_relative_error, whitened_truncation


def check_modules(adapter, calibration) -> None:
    """Calibration statistics must describe modules of this adapter."""
    if not calibration:
        return
    extra = sorted(set(calibration) - set(adapter.module_names))
    if extra:
        raise BadInputError(f"the calibration statistics name modules the adapter does not have: {extra[:3]}",
                            adapter.source or None)


def compress_module(m: LoraModule, src, options: dict, store: torch.dtype, L: torch.Tensor) -> MiniModule:
    """One module fitted to its output on the calibration data (L: its whitening factor)."""
    if L.shape != (m.in_features, m.in_features):
        raise BadInputError(f"module {m.name!r}: calibration statistics are {L.shape[0]} wide, the module reads "
                            f"{m.in_features} inputs (statistics of another base model?)")
    B, A = m.up.detach().double(), m.down.detach().double()
    if src.stored:
        U, V, X, Y, spec = _svd_outers(B, A, L, options)
    else:
        U, V, spec = src.make(m, options)
        ub, vb = _bases(U, V, L, spec)
        fit = fit_inner_whitened(B, A, U, V, L, rank=options.get("rank"), keep_energy=options.get("keep_energy"),
                                 ub=ub, vb=vb)
        X, Y = fit.X, fit.Y
        if fit.rank == 0:  # an all-zero update keeps one zero direction: shapes stay valid
            X, Y = X.new_zeros(X.shape[0], 1), Y.new_zeros(1, Y.shape[1])
    # what is written, as written (rounded to the storage dtype), is what the errors describe
    Xs, Ys = X.to(store), Y.to(store)
    if src.stored:
        U, V = U.to(store), V.to(store)
    if not (torch.isfinite(Xs).all() and torch.isfinite(Ys).all() and torch.isfinite(U).all()
            and torch.isfinite(V).all()):
        raise BadInputError(f"module {m.name!r}: the calibrated fit overflows {store} (store it as fp32: --dtype fp32)")
    B2, A2 = U.double() @ Xs.double(), Ys.double() @ V.double()
    ref = frobenius(B, A)
    diff = difference_norm(B, A, B2, A2)
    rel = diff / ref if ref else (0.0 if diff == 0.0 else float("inf"))
    cal = whitened_relative_error(B, A, B2, A2, L)
    return MiniModule(name=m.name, kind=m.kind, kernel=m.kernel, rank=m.rank, alpha=m.alpha,
                      use_rslora=m.use_rslora, dtype=str(m.dtype).removeprefix("torch."), outer=spec,
                      U=U.contiguous(), V=V.contiguous(), X=Xs.contiguous(), Y=Ys.contiguous(),
                      fidelity={"rel_error": rel, "energy": m.scale ** 2 * ref ** 2, "calibrated_rel_error": float(f"{cal:.4g}")})


# Bases of shared random outers, and of V·L for modules that share V and their input (q/k/v, gate/up):
# the whitened basis is most of the work of a random-outer module. Values keep U, V and L alive,
# so the identity checks below cannot match a new tensor at a recycled address; they count in its size.
_BASES = BytesLRU(512 << 20, size=lambda v: v[-1].nbytes + sum(t.numel() * t.element_size() for t in v[:-1]))


def _bases(U, V, L, spec: dict):
    def get(key, matrices, make):
        hit = _BASES.get(key, lambda: (*matrices, make()))
        return hit[-1] if all(a is b for a, b in zip(hit[:-1], matrices)) else make()

    ub = get(("U", id(U)), (U,), lambda: OuterBasis(U))
    vb = get(("VL", id(V), id(L)), (V, L), lambda: whitened_basis(V, L))
    return ub, vb


def _svd_outers(B, A, L, options: dict):
    """Whitened truncation as stored svd outers: (U out×k, V k×in, X = Y = diag(√S_k), spec)."""
    t = whitened_truncation(B, A, L, B.shape[1])
    energy = float((t.spectrum ** 2).sum())
    k = max(1, choose_rank(t.spectrum, energy, options.get("rank"), options.get("keep_energy")))
    k = min(k, t.rank) if t.rank else 1
    if t.rank == 0:
        U, V, s = B.new_zeros(B.shape[0], 1), A.new_zeros(1, A.shape[1]), np.zeros(1)
    else:
        U, s = t.U[:, :k], t.spectrum[:k]
        V = torch.linalg.solve_triangular(L.double(), t.Vw[:k], upper=False, left=False)  # Vw L⁻¹
    root = torch.diag(torch.from_numpy(np.sqrt(s).copy()))
    return U, V, root, root.clone(), {"source": "svd", "a": k, "b": k}
