"""Pure math of LoRA-Mini: factored SVD, inner least-squares fit, truncation, errors.

No I/O here. Every function takes the low-rank factors of an update
ΔW = B @ A (B: out×r, A: r×in) and works in float64 without forming the
out×in matrix: the only operations on tall matrices are products with them
(and, for ill-conditioned factors, a Householder QR); everything else is dense
algebra on matrices whose sides are ranks or outer sizes. The core works on stacks of
same-shaped updates (`Updates`, n×out×r and n×r×in) so that a few large calls serve many
modules; `Update` and the single-module functions are stacks of one.

Tall products run in torch, which releases the GIL, so modules can be processed on
several threads. The small r×r / a×b algebra runs in numpy and LAPACK: a torch call
costs ~5 µs of dispatch and releases the GIL for microseconds of work, and two threads
doing that hand the GIL back and forth so often that they run 3x slower than one. That
algebra (Cholesky/QR roots, small SVDs) and the one-module routes are `factored`, which
imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from . import factored
from .factored import chol_roots, relative, stack_svd

F64 = torch.float64
# Outers use the eigendecomposition of their Gram matrix (it also reveals rank loss):
# eigenvalue ratio 1e-8 is the same cond(M) < 1e4.
GRAM_MIN_EIG_RATIO = 1e-8
# A norm computed from Gram matrices carries absolute error ~ r·eps·||B||²||A||² in its square;
# below this share of that scale the result is recomputed through QR (difference_norm).
GRAM_TRUST = 1e-9


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=F64)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


class Updates:
    """n updates ΔW_i = B_i @ A_i of one shape, stacked as float64 tensors B (n×out×r) and
    A (n×r×in), with what every later step reuses computed once for all of them: the Gram
    matrices BᵀB and AAᵀ, ||ΔW||²_F and (on demand) the thin SVDs.

    Stacking same-shaped modules turns hundreds of small products into a few large ones;
    every result is still per module (batch i only ever mixes with batch i).
    """

    def __init__(self, B: torch.Tensor, A: torch.Tensor):
        self.B, self.A = B, A

    def __len__(self) -> int:
        return self.B.shape[0]

    @cached_property
    def gram_b(self) -> np.ndarray:
        return torch.bmm(self.B.transpose(1, 2), self.B).numpy()

    @cached_property
    def gram_a(self) -> np.ndarray:
        return torch.bmm(self.A, self.A.transpose(1, 2)).numpy()

    @cached_property
    def factor_scale(self) -> np.ndarray:
        """||B||²_F · ||A||²_F: the size of the rounding error in Gram-based squared norms."""
        return np.trace(self.gram_b, axis1=1, axis2=2) * np.trace(self.gram_a, axis1=1, axis2=2)

    @cached_property
    def energy(self) -> np.ndarray:
        """||B @ A||²_F = tr(BᵀB · AAᵀ); through the SVD when B and A cancel each other."""
        e = (self.gram_b * self.gram_a).sum((1, 2))
        low = ~(e >= GRAM_TRUST * self.factor_scale)
        if low.any():
            e = np.where(low, (self.spectrum ** 2).sum(1), e)
        return np.maximum(e, 0.0)

    @cached_property
    def _core(self):
        """SVDs of the r×r cores R_B R_Aᵀ (B = Q_B R_B, Aᵀ = Q_A R_A) and how to reach Q_B, Q_A:
        R_B⁻¹, R_A⁻¹ (Q = factor·R⁻¹) where the Gram route holds, else Householder QR, kept
        per module in `qr`. Plain data, no closures over self: a reference cycle would keep
        every module's factors alive until the cyclic garbage collector happened to run."""
        rb, rb_inv, ok_b = chol_roots(self.gram_b)
        ra, ra_inv, ok_a = chol_roots(self.gram_a)
        bad = np.flatnonzero(~(ok_b & ok_a))
        qr = {int(i): self._qr_core(i) for i in bad}
        if len(bad) == len(self):  # shapes can differ from the Cholesky route's (out < r): all by QR
            core = np.stack([c for _, _, c in qr.values()])
        else:
            core = rb @ ra.swapaxes(1, 2)
            for i, (_, _, c) in qr.items():
                core[i] = c
        uc, s, vch = stack_svd(core)
        return uc, s, vch, rb_inv, ra_inv, {i: (qb, qa) for i, (qb, qa, _) in qr.items()}

    def _qr_core(self, i: int):
        qb, Rb = torch.linalg.qr(self.B[i])
        qa, Ra = torch.linalg.qr(self.A[i].T)
        return qb, qa, Rb.numpy() @ Ra.numpy().T

    @property
    def spectrum(self) -> np.ndarray:
        """Singular values of each B @ A (n×r), descending."""
        return self._core[1]

    def _vector_maps(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        uc, _, vch, rb_inv, ra_inv, _ = self._core
        return _t(rb_inv @ uc[:, :, :k]), _t((ra_inv @ vch[:, :k].swapaxes(1, 2)).swapaxes(1, 2))

    def vector_maps(self, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(M1 n×r×k, M2 n×k×r) with singular_vectors(k) = (B M1, M2 A) exactly (the same products),
        so that a caller holding only these small matrices recomputes the vectors from the factors
        bit for bit; None where a module needed Householder QR (the vectors are not such products)."""
        return None if self._core[5] else self._vector_maps(k)

    def singular_vectors(self, k: int, out=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(U n×out×k, V n×k×in), the top-k singular vectors: B_i@A_i ≈ U_i diag(S_i[:k]) V_i.
        `out`: optional (U, V) float64 tensors of those shapes to write into."""
        uc, _, vch, rb_inv, ra_inv, qr = self._core
        if len(qr) == len(self):
            return (torch.stack([qb @ _t(uc[i, :, :k]) for i, (qb, _) in qr.items()]),
                    torch.stack([_t(vch[i, :k]) @ qa.T for i, (_, qa) in qr.items()]))
        M1, M2 = self._vector_maps(k)
        U = torch.bmm(self.B, M1, out=out and out[0])  # Q_B = B R_B⁻¹
        V = torch.bmm(M2, self.A, out=out and out[1])  # Q_Aᵀ = R_A⁻ᵀ A
        for i, (qb, qa) in qr.items():
            U[i], V[i] = qb @ _t(uc[i, :, :k]), _t(vch[i, :k]) @ qa.T
        return U, V


class Update:
    """One update ΔW = B @ A: an Updates stack of one (see there).

    >>> import torch; upd = Update(torch.ones(4, 1), torch.ones(1, 3))
    >>> upd.energy
    12.0
    """

    def __init__(self, B: torch.Tensor, A: torch.Tensor):
        self.B, self.A = _f64(B), _f64(A)
        self.stack = Updates(self.B[None], self.A[None])

    @property
    def gram_b(self) -> np.ndarray:
        return self.stack.gram_b[0]

    @property
    def gram_a(self) -> np.ndarray:
        return self.stack.gram_a[0]

    @property
    def factor_scale(self) -> float:
        return float(self.stack.factor_scale[0])

    @property
    def energy(self) -> float:
        return float(self.stack.energy[0])

    @property
    def spectrum(self) -> np.ndarray:
        """Singular values of B @ A, descending."""
        return self.stack.spectrum[0]

    def singular_vectors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_k out×k, V_k k×in), the top-k singular vectors; B@A ≈ U_k diag(S_k) V_k."""
        U, V = self.stack.singular_vectors(k)
        return U[0], V[0]


def frobenius(B: torch.Tensor, A: torch.Tensor) -> float:
    """||B @ A||_F from the factors (via the r×r core)."""
    return factored.frobenius(_f64(B).numpy(), _f64(A).numpy())


def difference_norm(B1, A1, B2, A2) -> float:
    """||B1 @ A1 - B2 @ A2||_F, accurate even when the difference is tiny (factored.difference_norm)."""
    return factored.difference_norm(*(_f64(t).numpy() for t in (B1, A1, B2, A2)))


def mini_difference_norms(upd: Updates, UtB, AVt, GU, GV, X, Y) -> np.ndarray:
    """||B_i A_i − U_i X_i Y_i V_i||_F for a stack, from small products only; NaN where the
    result is too small to trust (the caller recomputes those with difference_norm).

    UtB = UᵀB (n×a×r), AVt = A Vᵀ (n×r×b), GU = UᵀU, GV = V Vᵀ (a×a, b×b for outers shared by
    the stack, else stacked), X (n×a×k), Y (n×k×b), all float64 arrays. Uses
    ||BA − UXYV||² = ||BA||² − 2 Σ (UtBᵀX)∘(AVt Yᵀ) + Σ (Xᵀ GU X)∘(Y GV Yᵀ), kept only where
    it is well above that formula's rounding error.
    """
    Xt, Yt = X.swapaxes(-1, -2), Y.swapaxes(-1, -2)
    cross = ((UtB.swapaxes(-1, -2) @ X) * (AVt @ Yt)).sum((-2, -1))
    gc, gd = Xt @ GU @ X, Y @ GV @ Yt  # Gram matrices of C = UX and D = YV
    e2 = upd.energy - 2.0 * cross + (gc * gd).sum((-2, -1))
    # Rounding in XᵀGU X grows with ||GU||·||X||², not with ||UX||²: ill-conditioned outers
    # with large inners (cancelling through U) must not pass for a trustworthy result.
    row_norm = lambda G: np.abs(G).sum(-1).max(-1)  # noqa: E731
    inner_scale = row_norm(GU) * (X * X).sum((-2, -1)) * row_norm(GV) * (Y * Y).sum((-2, -1))
    scale = upd.factor_scale + np.trace(gc, axis1=-2, axis2=-1) * np.trace(gd, axis1=-2, axis2=-1) + inner_scale
    with np.errstate(invalid="ignore"):
        return np.where(e2 >= GRAM_TRUST * scale, np.sqrt(np.maximum(e2, 0.0)), np.nan)  # NaN stays NaN


def _range_basis(M: torch.Tensor, gram: np.ndarray):
    """(S, W) of the thin SVD M = Q diag(S) Wᵀ restricted to numerically non-zero S.

    Q itself is never formed: Qᵀ Z = diag(1/S) Wᵀ (Mᵀ Z), so a caller that already has
    Mᵀ Z (cached outers) pays only small products. Outers are tall (out×a) and, when random
    or orthonormal, well conditioned: the a×a Gram eigendecomposition then gives S and W
    about 10x faster than an SVD of the tall matrix. Anything else takes the SVD.
    """
    if M.shape[0] >= M.shape[1] > 0:
        evals, w = np.linalg.eigh(gram)
        if evals[0] > GRAM_MIN_EIG_RATIO * evals[-1] > 0:
            return np.sqrt(evals[::-1]), w[:, ::-1]
    _, s, wh = torch.linalg.svd(M, full_matrices=False)
    s, wh = s.numpy(), wh.numpy()
    tol = (s[0] if s.size else 0.0) * max(M.shape) * np.finfo(np.float64).eps
    keep = s > tol
    return s[keep], wh[keep].T


class OuterBasis:
    """An outer matrix in float64 with its Gram matrix and (on demand) range basis: all that
    fitting and error estimation need of it.

    U (out×a) is described by UᵀU and its thin SVD (S, W); for V (b×in) pass Vᵀ. Depends
    only on the outer, so one basis serves every module that shares that outer.
    """

    def __init__(self, M: torch.Tensor):
        self.m = _f64(M).contiguous()  # Vᵀ arrives transposed; BLAS products with it are faster contiguous
        self.gram = (self.m.T @ self.m).numpy()

    @cached_property
    def _range(self):
        return _range_basis(self.m, self.gram)

    @property
    def s(self) -> np.ndarray:
        """Non-zero singular values, descending."""
        return self._range[0]

    @property
    def w(self) -> np.ndarray:
        """Right singular vectors of the non-zero singular values."""
        return self._range[1]

    @property
    def nbytes(self) -> int:
        return self.m.numel() * 8 + self.gram.nbytes + self.s.nbytes + self.w.nbytes

    def project(self, MtZ: np.ndarray) -> np.ndarray:
        """Qᵀ Z from Mᵀ Z."""
        return (self.w.T @ MtZ) / self.s[:, None]

    def lift(self, Z: np.ndarray) -> np.ndarray:
        """The inner matrix P with M P = Q Z (the pseudo-inverse map back through the outer)."""
        return self.w @ (Z / self.s[:, None])


@dataclass
class InnerFit:
    """Least-squares inner matrices for fixed outers, with energy bookkeeping."""

    X: torch.Tensor  # a×k
    Y: torch.Tensor  # k×b
    spectrum: torch.Tensor  # singular values of the projected update (descending)
    total_energy: float  # ||B @ A||_F²

    @property
    def rank(self) -> int:
        return self.X.shape[1]

    def retained_energy(self, k: int | None = None) -> float:
        """Share of ||ΔW||² that the fit keeps at inner rank k (default: its own rank)."""
        k = self.rank if k is None else k
        if self.total_energy == 0.0:
            return 1.0
        return float((self.spectrum[:k] ** 2).sum()) / self.total_energy


def _small_svds(P: np.ndarray, Q: np.ndarray):
    """Thin SVDs of the stack P_i @ Q_i (P: n×m×r, Q: n×r×p) as (U n×m×r, S n×r, V n×p×r):
    the factored SVD of `Updates`, on small dense factors."""
    stack = Updates(torch.from_numpy(np.ascontiguousarray(P)), torch.from_numpy(np.ascontiguousarray(Q)))
    U, V = stack.singular_vectors(stack.spectrum.shape[1])
    return U.numpy(), stack.spectrum, V.transpose(1, 2).numpy()


def fit_projected_stack(upd: Updates, ub: OuterBasis, vb: OuterBasis, UtB: np.ndarray, AVt: np.ndarray,
                        rank: int | None = None, keep_energy: float | None = None) -> list[InnerFit]:
    """Closed-form X, Y minimising ||U X Y V - B A||_F with rank(X Y) <= rank for a stack of
    updates sharing the outers, from the outers' bases and the products UᵀB (n×a×r) and AVᵀ
    (n×r×b), float64. The optimum is the best rank-k approximation of Qu.T (B A) Qv mapped back
    through the outers' pseudo-inverses, so it is exact for non-orthonormal outers too. With
    `keep_energy`, k is the smallest rank whose fit keeps that share of the update's energy
    (capped by what the outers can hold)."""
    ug, s, vg = _small_svds(ub.project(UtB), vb.project(AVt.swapaxes(1, 2)).swapaxes(1, 2))
    ks = [choose_rank(s[i], upd.energy[i], rank, keep_energy) for i in range(len(s))]
    root = np.sqrt(s[:, None, :max(ks, default=0)])
    X, Y = ub.lift(ug[:, :, :root.shape[-1]] * root), vb.lift(vg[:, :, :root.shape[-1]] * root)
    return [InnerFit(X=_t(X[i, :, :k]), Y=_t(Y[i, :, :k].T), spectrum=_t(s[i]), total_energy=float(upd.energy[i]))
            for i, k in enumerate(ks)]


def fit_projected(upd: Update, ub: OuterBasis, vb: OuterBasis, UtB, AVt, rank: int | None = None,
                  keep_energy: float | None = None) -> InnerFit:
    """fit_projected_stack for one module."""
    return fit_projected_stack(upd.stack, ub, vb, np.asarray(UtB)[None], np.asarray(AVt)[None], rank,
                               keep_energy)[0]


def fit_inner(B, A, U, V, rank: int | None = None, keep_energy: float | None = None) -> InnerFit:
    """Closed-form X, Y minimising ||U X Y V - B A||_F with rank(X Y) <= rank.

    The optimum is the best rank-k approximation of Qu.T (B A) Qv mapped back
    through the outers' pseudo-inverses, so it is exact for non-orthonormal
    outers too. With `keep_energy`, k is the smallest rank whose fit keeps
    that share of the update's energy (capped by what the outers can hold).

    >>> import torch; B, A = torch.randn(8, 2), torch.randn(2, 6)
    >>> fit = fit_inner(B, A, torch.eye(8), torch.eye(6))
    >>> round(fit.retained_energy(), 12)
    1.0
    """
    upd, ub, vb = Update(B, A), OuterBasis(U), OuterBasis(_f64(V).T)
    return fit_projected(upd, ub, vb, ub.m.T @ upd.B, upd.A @ vb.m, rank, keep_energy)


def choose_rank(spectrum, total_energy: float, rank: int | None, keep_energy: float | None) -> int:
    """Inner rank: `rank` capped by the numerical rank, or the smallest k keeping `keep_energy`."""
    spectrum = np.asarray(spectrum)
    tol = (float(spectrum[0]) if spectrum.size else 0.0) * 1e-12
    available = int((spectrum > tol).sum())
    if keep_energy is not None:
        if total_energy == 0.0:
            return available
        captured = np.cumsum(spectrum**2) / total_energy
        hit = np.flatnonzero(captured >= keep_energy - 1e-12)
        k = int(hit[0]) + 1 if hit.size else available
        return min(k, available) if rank is None else min(k, available, rank)
    return available if rank is None else min(rank, available)


def scaled_relative_error(B, A, scale: float, B2, A2, scale2: float) -> tuple[float, float]:
    """(relative error of scale2·B2·A2 against scale·B·A, ||scale·B·A||_F), from the factors."""
    ref = abs(scale) * frobenius(B, A)
    return relative(difference_norm(_f64(B) * scale, A, B2 * scale2, A2), ref), ref
