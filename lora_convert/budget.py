"""Size–fidelity budgets: per-module error curves over (inner rank, bits) and their global
allocation under a byte budget or a fidelity floor.

Every module offers options (k, bits) with their stored bytes and squared weight-space error
‖s·B·A − s·B̃_k·Ã_k‖²_F, where B̃, Ã are the factors as a reader decodes them. allocate()
picks one option per module to minimise the summed error under the budget: greedy by
marginal error saved per byte along each module's lower convex hull, which is the Lagrangian
solution at every budget it stops on (deterministic: ties go to the earlier module).

Calibration plugs in through `whitening`: a lower-triangular L (in×in, float64) with
C = L Lᵀ the second moment of the module's input; errors are then ‖(ΔW' − ΔW) L‖_F, the error
of the module's output on that data, and the factors are fitted in that metric.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np
import torch

from . import quant
from .mathcore import OuterBasis, Update, fit_projected_stack


@dataclass(frozen=True)
class Option:
    k: int
    bits: int | str  # a quant width: integer bits or a codebook name
    nbytes: int  # data bytes of the module's stored factors at (k, bits)
    err2: float  # squared weight-space error, scale included


@dataclass
class Curve:
    """One module's options and its update's energy s²‖BA‖²_F (in the whitened metric if any)."""

    name: str
    energy: float
    options: list[Option]
    overhead: int = 0  # header bytes the module costs whatever its option
    hull: list[Option] = field(init=False)

    def __post_init__(self):
        self.hull = lower_hull(self.options)


def lower_hull(options: list[Option]) -> list[Option]:
    """The options on the lower convex hull of (bytes, error), by increasing bytes and strictly
    decreasing error: every other option is beaten by a mix of two hull options."""
    pts = sorted(options, key=lambda o: (o.nbytes, o.err2, quant.width_key(o.bits), o.k))
    front = []
    for o in pts:  # Pareto front first: each step must lower the error
        if not front or o.err2 < front[-1].err2:
            front.append(o)
    hull: list[Option] = []
    for o in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a–o (or on it): drop it
            if (b.err2 - a.err2) * (o.nbytes - a.nbytes) >= (o.err2 - a.err2) * (b.nbytes - a.nbytes):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def _prefix_errors(energy: float, B: np.ndarray, A: np.ndarray, F1: np.ndarray, F2: np.ndarray) -> np.ndarray:
    """‖BA − F1[:, :k] F2[:k]‖²_F for k = 1..K from small products only (no out×in matrix).
    (One candidate at a time: products of several at once cross OpenBLAS's threading threshold,
    and its threads wait on a busy machine.)"""
    cross = np.cumsum(np.einsum("ij,ji->i", F1.T @ B, A @ F2.T))
    H = (F1.T @ F1) * (F2 @ F2.T)
    self_ = np.diagonal(np.cumsum(np.cumsum(H, 0), 1))
    return np.maximum(energy - 2.0 * cross + self_, 0.0)


def svd_factors(B: torch.Tensor, A: torch.Tensor, whitening: np.ndarray | None = None,
                max_rank: int | None = None, update: Update | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(F1 out×K, F2 K×in, σ): the truncated SVD of B·A (of B·A·L with `whitening`, mapped back:
    F2 = √σ Vᵀ L⁻¹) with the singular values split evenly, columns/rows by decreasing σ; the
    rank-k optimum is the first k of them. K is the numerical rank (at least 1). `update`: the
    caller's Update(B, A·L) when it has one (its Gram products are then not formed again)."""
    if update is None:
        A64 = A.double()
        if whitening is not None:
            A64 = A64 @ torch.from_numpy(np.asarray(whitening, dtype=np.float64))
        update = Update(B, A64)
    upd = update
    s = upd.spectrum
    K = max(int((s > (s[0] if s.size else 0.0) * 1e-12).sum()), 1)
    if max_rank is not None:
        K = min(K, max_rank)
    U, V = upd.singular_vectors(K)
    root = np.sqrt(s[:K])
    F1, F2 = U.numpy() * root, root[:, None] * V.numpy()
    if whitening is not None:
        import scipy.linalg
        F2 = scipy.linalg.solve_triangular(np.asarray(whitening, dtype=np.float64).T, F2.T, lower=False).T
    return F1, F2, s[:K]


def random_inner(B: torch.Tensor, A: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                 max_rank: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X a×K, Y K×b, σ): the least-squares inner matrices for fixed outers U, V, columns/rows
    by decreasing singular value σ of the projected update, so that the first k of them are the
    rank-k optimum."""
    ub, vb = OuterBasis(U), OuterBasis(V.double().T)
    upd = Update(B, A)
    UtB, AVt = np.asarray(ub.m.T @ upd.B), np.asarray(upd.A @ vb.m)
    fit = fit_projected_stack(upd.stack, ub, vb, UtB[None], AVt[None], max_rank)[0]
    if fit.rank == 0:  # an all-zero update keeps one zero direction
        return np.zeros((U.shape[1], 1)), np.zeros((1, V.shape[0])), np.zeros(1)
    return fit.X.numpy(), fit.Y.numpy(), fit.spectrum.numpy()


def error_curve(name: str, B: torch.Tensor, A: torch.Tensor, scale: float, *, bits: tuple[int | str, ...],
                group: int, outers: tuple[torch.Tensor, torch.Tensor] | None = None,
                whitening: np.ndarray | None = None, overhead: int = 0, input_rounding=None) -> Curve:
    """Options (k, bits) of one module. Without `outers` (svd): the stored factors are the
    truncated SVD factors F1 (out×k), F2 (k×in). With random `outers` (U, V): the stored factors
    are the inner X (a×k), Y (k×b). Each factor is quantized once per width: its groups run along
    its long side, within one column of F1 / X or one row of F2 / Y, so the quantized rank-k
    factors are the first k columns / rows of the quantized full ones. `input_rounding(F, bits,
    group)`: the decoded values stored for the input-side factor (F2 / Y), if not plain rounding;
    it must round rows independently (calibrated.input_rounding)."""
    B64, A64 = B.double(), A.double()
    L = None if whitening is None else torch.from_numpy(np.asarray(whitening, dtype=np.float64))
    Aw = A64 if L is None else A64 @ L
    Bn, Awn = B64.numpy(), Aw.numpy()
    upd = Update(B64, Aw)
    energy = float(upd.energy)
    if outers is None:
        S1, S2, _ = svd_factors(B64, A64, whitening, update=upd)
        maps = (lambda F: F), (lambda F: F if L is None else F @ L.numpy())
    else:
        U, V = outers
        Vw = V.double() if L is None else V.double() @ L  # Y multiplies V: its fit and error see V L
        S1, S2, _ = random_inner(B64, Aw, U, Vw)
        U64, V64 = U.double().numpy(), Vw.numpy()
        maps = (lambda X: U64 @ X), (lambda Y: Y @ V64)
    K = S1.shape[1]
    Q2s = quant.rounded_widths(S2, bits, group) if input_rounding is None else \
        [np.asarray(input_rounding(S2, b, group), dtype=np.float64) for b in bits]
    err2 = [(scale * scale) * _prefix_errors(energy, Bn, Awn, maps[0](Q1), maps[1](Q2))
            for Q1, Q2 in zip(quant.rounded_widths(S1, bits, group), Q2s)]
    opts = []
    for w, b in enumerate(bits):
        for k in range(1, K + 1):
            size = quant.nbytes((S1.shape[0], k), b, group) + quant.nbytes((k, S2.shape[1]), b, group)
            opts.append(Option(k, b, size, float(err2[w][k - 1])))
    return Curve(name, scale * scale * energy, opts, overhead)


@dataclass
class Allocation:
    choice: dict[str, Option]
    nbytes: int  # data + per-module overheads + fixed overhead
    err2: float
    energy: float

    @property
    def fidelity(self) -> float:
        return 1.0 - self.err2 / self.energy if self.energy else 1.0


class BudgetError(ValueError):
    """No allocation meets the budget; `best` is what comes closest."""

    def __init__(self, message: str, best: Allocation | None):
        super().__init__(message)
        self.best = best


class _Greedy:
    """Walks every module's hull from its cheapest option, always taking the step that saves the
    most error per byte next (a heap keyed on that gain, ties to the earlier module)."""

    def __init__(self, curves: list[Curve], fixed: int):
        self.curves, self.pos, self.heap = curves, [0] * len(curves), []
        self.energy = sum(c.energy for c in curves)
        self.nbytes = fixed + sum(c.overhead + c.hull[0].nbytes for c in curves)
        self.err2 = sum(c.hull[0].err2 for c in curves)
        for i in range(len(curves)):
            self._push(i)

    def _push(self, i: int) -> None:
        h, j = self.curves[i].hull, self.pos[i]
        if j + 1 < len(h):
            gain = (h[j].err2 - h[j + 1].err2) / max(h[j + 1].nbytes - h[j].nbytes, 1)
            heapq.heappush(self.heap, (-gain, i))

    def next_step(self) -> tuple[int, int] | None:
        """(module, extra bytes) of the best step left, removed from the queue; None when done."""
        if not self.heap:
            return None
        _, i = heapq.heappop(self.heap)
        h, j = self.curves[i].hull, self.pos[i]
        return i, h[j + 1].nbytes - h[j].nbytes

    def take(self, i: int) -> None:
        h, j = self.curves[i].hull, self.pos[i]
        self.nbytes += h[j + 1].nbytes - h[j].nbytes
        self.err2 += h[j + 1].err2 - h[j].err2
        self.pos[i] = j + 1
        self._push(i)

    def fidelity(self) -> float:
        return 1.0 - self.err2 / self.energy if self.energy else 1.0

    def allocation(self) -> Allocation:
        return Allocation({c.name: c.hull[j] for c, j in zip(self.curves, self.pos)}, self.nbytes,
                          max(self.err2, 0.0), self.energy)


def allocate(curves: list[Curve], budget: int | None = None, min_fidelity: float | None = None,
             fixed: int = 0) -> Allocation:
    """One option per module: the least total error within `budget` bytes (all of the file:
    `fixed` + per-module overheads + data), or the fewest bytes reaching `min_fidelity`, or
    both (the budget's allocation, which must reach the fidelity). Raises BudgetError."""
    g = _Greedy(curves, fixed)
    if budget is not None and g.nbytes > budget:
        raise BudgetError(f"the smallest file this adapter allows is {g.nbytes:,} bytes (fidelity "
                          f"{g.fidelity():.4f}), over the budget of {budget:,} bytes", g.allocation())
    target = None if min_fidelity is None else (1.0 - min_fidelity) * g.energy
    while (step := g.next_step()) is not None:
        if budget is None and g.err2 <= target:
            break
        i, extra = step
        if budget is not None and g.nbytes + extra > budget:
            continue  # this module's later steps cost more still; other modules' may fit
        g.take(i)
    best = g.allocation()
    if target is not None and best.err2 > target * (1 + 1e-9):
        within = f" within {budget:,} bytes" if budget is not None else ""
        raise BudgetError(f"fidelity {min_fidelity:.4g} is out of reach{within}: the best is "
                          f"{best.fidelity:.4f} at {best.nbytes:,} bytes", best)
    return best


def frontier(curves: list[Curve], fixed: int = 0) -> list[tuple[int, float]]:
    """The whole greedy path as (total bytes, fidelity) points, smallest file first."""
    g = _Greedy(curves, fixed)
    points = [(g.nbytes, g.fidelity())]
    while (step := g.next_step()) is not None:
        g.take(step[0])
        points.append((g.nbytes, g.fidelity()))
    return points
