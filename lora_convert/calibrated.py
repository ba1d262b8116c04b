"""compress with calibration: fit each module's output on calibration data, not its weights.

For a module with input statistics (recovery.calibration), the whitening factor L (C + λI = L Lᵀ)
turns the output error on the data into a Frobenius norm, ||(ΔW' − ΔW) L||_F (see whiten):
* svd outers: the whitened truncation. U holds the top-k left singular vectors of B·A·L,
  V = Vw·L⁻¹ (its rows are no longer orthonormal), X = Y = diag(√S_k) of the whitened spectrum.
* random outers: the same regenerated U, V; X, Y minimise the whitened error (A → A L, V → V L).
The file format is unchanged: readers need no calibration to use the result.

Quantized (--bits, budgets): the same whitened factors, then the input-side factor (svd: the k×in
right factor; random: Y, which multiplies V x) is rounded with error feedback against the second
moment of what it reads (whiten.error_feedback_round with the format's own quantizer) and the
output-side factor is rounded to nearest. Budget curves (`input_rounding`) use the same rounding.

One module at a time (each has its own L, so stacks would share nothing). Fidelity records the
weight-space `rel_error` as always (so verify --against agrees) plus `calibrated_rel_error`, the
relative output error on the calibration data (not in a byte budget planned by weight-space
error, where every header byte counts). The whole-adapter calibrated share weighs modules
by their weight-space `energy`, as a calibrated budget with a floor does (ALLOCATE_BY).
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch

from .adapter import LoraModule
from . import quant
from .container import MiniModule, quantized_parts, short_figure
from .errors import BadInputError
from .lru import BytesLRU
from .mathcore import OuterBasis, choose_rank, difference_norm, frobenius
from .st import dtype_name
from .whiten import (error_feedback_round, feedback_factor, fit_inner_whitened, whitened_basis,
                     whitened_relative_error, whitened_truncation)


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
                      use_rslora=m.use_rslora, dtype=dtype_name(m.dtype), outer=spec,
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


# ------------------------------------------------------------------ quantized storage

# error-feedback factors of inputs (in×in, one per distinct input: q/k/v share theirs), by identity of L
_FEEDBACK = BytesLRU(256 << 20, size=lambda v: v[1].nbytes + v[0].numel() * 8)
# Error feedback on (EF_ROUNDING) or plain rounding of the input-side factor: a switch for the
# benchmark that decides it (benchmarks/bench_calibration.py --quantized)
EF_ROUNDING = True
# How a calibrated budget chooses rank and bits: "weight" allocates by weight-space error, as without
# calibration, and fits each module's choice to its output; "relative" sums each module's squared
# relative output error times its weight-space energy. Allocating in an output metric tunes the
# choice to the calibration text: on held-out text of another distribution "relative" kept up to
# 12 points less than "weight" (benchmarks/bench_calibration.py --quantized; summing raw output
# errors did no better). A floor on the calibrated share (--min-fidelity) needs curves in that
# share: "relative" then (allocation_metric).
ALLOCATE_BY = "weight"


def allocation_metric(floor: bool) -> str:
    """The metric a calibrated budget allocates in: ALLOCATE_BY, or "relative" in place of "weight"
    when the allocation must meet a floor on the calibrated share (`floor`)."""
    if ALLOCATE_BY not in ("weight", "relative"):
        raise ValueError(f"calibrated.ALLOCATE_BY must be 'weight' or 'relative', got {ALLOCATE_BY!r}")
    return "relative" if floor else ALLOCATE_BY


def _feedback(L: torch.Tensor) -> np.ndarray:
    hit = _FEEDBACK.get(("R", id(L)), lambda: (L, feedback_factor(L)))
    return hit[1] if hit[0] is L else feedback_factor(L)


def input_metric(L: torch.Tensor, V: torch.Tensor | None) -> torch.Tensor:
    """Lower-triangular factor of the second moment the input-side factor reads: L itself (svd:
    the factor multiplies x) or a Cholesky factor of (V L)(V L)ᵀ (random: Y multiplies V x)."""
    if V is None:
        return L
    VL = V.double() @ L.double()
    G = VL @ VL.T
    G.diagonal().add_(1e-12 * float(G.diagonal().mean() or 1.0))  # V L has full row rank; guard round-off
    return torch.linalg.cholesky(G)


def input_rounding(L: torch.Tensor, V: torch.Tensor | None = None):
    """(F, bits, group) -> the decoded values the file stores for the input-side factor F (k×n):
    error-feedback rounding against the metric of input_metric(L, V), then encoded as the writer
    encodes it. Rows are rounded independently, so rank-k prefixes stay prefixes."""
    metric = input_metric(L, V)
    state = {}

    def rounding(F: np.ndarray, bits: int, group: int) -> np.ndarray:
        if bits == 16 or F.shape[0] >= F.shape[1] or not EF_ROUNDING:  # tall: groups run along the rows
            return quant.encode(F, bits, group)[1]
        if "R" not in state:
            state["R"] = _feedback(metric) if V is None else feedback_factor(metric)
        return feedback_rounded(F, bits, group, state["R"])

    return rounding


def feedback_rounded(F: np.ndarray, bits: int | str, group: int, feedback: np.ndarray) -> np.ndarray:
    """F (k×n, wide, float64) rounded with error feedback (`feedback`: feedback_factor of the metric
    of what F reads), then encoded as the writer encodes it: the float32 values a reader decodes
    (a group whose largest value moved can get another scale)."""
    ef = error_feedback_round(F, quantizer=quant.GroupQuantizer(bits, group), feedback=feedback)
    return quant.encode(ef.values.numpy(), bits, group)[1]


def whitened_factors(m: LoraModule, src, options: dict, L: torch.Tensor):
    """(F1, F2, σ, outers): the full-rank factors a quantized module stores prefixes of, fitted to the
    output (svd: F1 = U_K S^½, F2 = S^½ Vw L⁻¹ of the whitened SVD; random: X, Y for the regenerated
    U, V with A → A L, V → V L), float64 numpy, columns/rows by decreasing whitened singular value."""
    from .budget import random_inner

    check_width(m, L)
    B, A = m.up.detach().double(), m.down.detach().double()
    if src.stored:
        t = whitened_truncation(B, A, L, B.shape[1])
        if t.rank == 0:  # an all-zero update keeps one zero direction
            return np.zeros((B.shape[0], 1)), np.zeros((1, A.shape[1])), np.zeros(1), None
        return t.B.numpy(), t.A.numpy(), t.spectrum[:t.rank], None
    U, V, spec = src.make(m, options)
    L64 = L.double()
    X, Y, s = random_inner(B, A @ L64, U, V.double() @ L64)  # Y multiplies V: the same Y for V and V L
    return X, Y, s, (U, V, spec)


def check_width(m: LoraModule, L: torch.Tensor) -> None:
    """The statistics must describe this module's input (same width)."""
    if L.shape != (m.in_features, m.in_features):
        raise BadInputError(f"module {m.name!r}: calibration statistics are {L.shape[0]} wide, the module reads "
                            f"{m.in_features} inputs (statistics of another base model?)")


def compress_quantized(m: LoraModule, src, options: dict, bits: int, group: int, L: torch.Tensor,
                       choice=None, figure: bool = True) -> MiniModule:
    """One module stored quantized and fitted to its output: rank and bits from the budget's
    `choice` (convert.Planned: its energy figure is recorded), else options' rank / keep_energy (on
    the whitened spectrum) and `bits`. `figure`: record the calibrated error (the entry's extra figure)."""
    F1, F2, s, outers = whitened_factors(m, src, options, L)
    if choice is not None:
        k, bits = min(choice.k, F1.shape[1]), choice.bits
    else:
        energy = float((s ** 2).sum())
        k = max(min(choose_rank(s, energy, options.get("rank"), options.get("keep_energy")), F1.shape[1]), 1)
    try:
        Q1 = quant.encode(F1[:, :k], bits, group)[1]
        Q2 = input_rounding(L, None if outers is None else outers[1])(F2[:k], bits, group)
    except ValueError as exc:
        raise BadInputError(f"module {m.name!r}: cannot store its factors as {quant.width_name(bits)} "
                            f"({exc})") from None
    U, V, X, Y, spec = quantized_parts(torch.from_numpy(np.ascontiguousarray(Q1)),
                                       torch.from_numpy(np.ascontiguousarray(Q2)), outers, src.name)
    B, A = m.up.detach().double(), m.down.detach().double()
    B2, A2 = U.double() @ X.double(), Y.double() @ V.double()
    ref = frobenius(B, A)
    diff = difference_norm(B, A, B2, A2)
    rel = diff / ref if ref else (0.0 if diff == 0.0 else float("inf"))
    cal = whitened_relative_error(B, A, B2, A2, L)
    if choice is None:
        fidelity = {"rel_error": short_figure(rel), "energy": short_figure(m.scale ** 2 * ref ** 2),
                    "calibrated_rel_error": short_figure(cal)}
    else:  # within the lengths the budget counted: the plan's energy figure, bounded error figures
        fidelity = {"rel_error": budgeted_figure(m.name, rel), "energy": choice.energy}
        if figure:
            fidelity["calibrated_rel_error"] = budgeted_figure(m.name, cal)
    return MiniModule(name=m.name, kind=m.kind, kernel=m.kernel, rank=m.rank, alpha=m.alpha, use_rslora=m.use_rslora,
                      dtype=dtype_name(m.dtype), outer=dict(spec), U=U, V=V, X=X, Y=Y, fidelity=fidelity,
                      quant={"bits": bits, "group": group})


# The longest error figure (rel_error, calibrated_rel_error) a calibrated module's entry records, as a
# budget counts it: every non-negative figure of FIDELITY_DIGITS digits that rounds below 1e8 is as
# short (the errors of a fit are near or below 1); a longer one is refused (budgeted_figure)
ERROR_FIGURE_BOUND = short_figure(1.2345e-300)
PLANNED_FIDELITY = {"calibrated_rel_error": ERROR_FIGURE_BOUND}


def budgeted_figure(name: str, value: float) -> float:
    """short_figure(value), refused if longer than the budget counted it (a broken fit)."""
    fig = short_figure(value)
    if not (math.isfinite(fig) and len(repr(fig)) <= len(repr(ERROR_FIGURE_BOUND))):
        raise BadInputError(f"module {name!r}: its calibrated fit is numerically broken (relative error {value:.3g}); "
                            "compress it without --calibration")
    return fig


def summary_overhead() -> int:
    """Bytes the whole-adapter calibrated share adds to the directory layout's summary file."""
    worst = -1.2345678901234567e-300
    size = lambda d: len(json.dumps({"fidelity": d}, indent=2))  # noqa: E731
    return size({"modules": 1, "calibrated_retained": worst}) - size({"modules": 1})


def reweighted(curve, weight_energy: float, metric: str):
    """`curve` (output-space) with every module weighted by its weight-space energy instead of its
    output energy (allocation `metric` "relative")."""
    from .budget import Curve, Option

    if metric != "relative" or curve.energy <= 0.0:
        return curve
    f = weight_energy / curve.energy
    return Curve(curve.name, weight_energy, [Option(o.k, o.bits, o.nbytes, o.err2 * f) for o in curve.options],
                 curve.overhead)
