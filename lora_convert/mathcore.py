"""Pure math of LoRA-Mini: factored SVD, inner least-squares fit, truncation, errors.

No I/O here. Every function takes the low-rank factors of an update
ΔW = B @ A (B: out×r, A: r×in) and works in float64 without forming the
out×in matrix: all heavy operations are QR/SVD of tall-skinny factors and
dense algebra on matrices whose sides are ranks or outer sizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

F64 = torch.float64


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=F64)


def factored_svd(P: torch.Tensor, Q: torch.Tensor):
    """Thin SVD of P @ Q (P: m×r, Q: r×n) from the factors.

    Returns (Uk, S, Vk) with P @ Q = Uk @ diag(S) @ Vk.T, S descending.
    Cost O((m + n) r²): QR of P and Q.T, then an SVD of the small core.
    """
    P, Q = _f64(P), _f64(Q)
    qp, rp = torch.linalg.qr(P)
    qq, rq = torch.linalg.qr(Q.T)
    uc, s, vch = torch.linalg.svd(rp @ rq.T, full_matrices=False)
    return qp @ uc, s, qq @ vch.T


def frobenius(B: torch.Tensor, A: torch.Tensor) -> float:
    """||B @ A||_F from the factors (via the r×r core)."""
    _, s, _ = factored_svd(B, A)
    return float(torch.linalg.vector_norm(s))


def difference_norm(B1, A1, B2, A2) -> float:
    """||B1 @ A1 - B2 @ A2||_F, accurate even when the difference is tiny."""
    C = torch.cat([_f64(B1), -_f64(B2)], dim=1)
    D = torch.cat([_f64(A1), _f64(A2)], dim=0)
    return frobenius(C, D)


GRAM_MIN_EIG_RATIO = 1e-6  # cond(M) < 1e3: the Gram route loses < cond²·eps ≈ 1e-10


def _range_basis(M: torch.Tensor):
    """Thin SVD M = Q diag(S) W.T restricted to numerically non-zero S (handles rank loss).

    Outers are tall (out×a) and, when random or orthonormal, well conditioned: then the a×a
    Gram matrix's eigendecomposition gives the same factors about 10x faster than an SVD of
    the tall matrix, with orthogonality error below 1e-10. Anything else takes the SVD.
    """
    if M.shape[0] >= M.shape[1] > 0:
        evals, w = torch.linalg.eigh(M.T @ M)
        if evals[0] > GRAM_MIN_EIG_RATIO * evals[-1] > 0:
            s = evals.flip(0).sqrt()
            w = w.flip(1)
            return (M @ w) / s, s, w
    q, s, wh = torch.linalg.svd(M, full_matrices=False)
    tol = (s[0] if s.numel() else 0.0) * max(M.shape) * torch.finfo(F64).eps
    keep = s > tol
    return q[:, keep], s[keep], wh[keep].T


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


def project(B, A, U, V):
    """Project ΔW = B@A onto span(U) ⊗ span(V.T); returns the pieces fit_inner needs."""
    B, A, U, V = _f64(B), _f64(A), _f64(U), _f64(V)
    qu, su, wu = _range_basis(U)
    qv, sv, wv = _range_basis(V.T)
    ug, s, vg = factored_svd(qu.T @ B, A @ qv)
    return (qu, su, wu), (qv, sv, wv), (ug, s, vg)


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
    (_, su, wu), (_, sv, wv), (ug, s, vg) = project(B, A, U, V)
    total = frobenius(B, A) ** 2
    k = choose_rank(s, total, rank, keep_energy)
    root = s[:k].sqrt()
    X = wu @ ((ug[:, :k] * root) / su[:, None])
    Y = (wv @ ((vg[:, :k] * root) / sv[:, None])).T
    return InnerFit(X=X, Y=Y, spectrum=s, total_energy=total)


def choose_rank(spectrum: torch.Tensor, total_energy: float, rank: int | None,
                keep_energy: float | None) -> int:
    """Inner rank: `rank` capped by the numerical rank, or the smallest k keeping `keep_energy`."""
    tol = (float(spectrum[0]) if spectrum.numel() else 0.0) * 1e-12
    available = int((spectrum > tol).sum())
    if keep_energy is not None:
        if total_energy == 0.0:
            return available
        captured = torch.cumsum(spectrum**2, 0) / total_energy
        hit = (captured >= keep_energy - 1e-12).nonzero()
        k = int(hit[0]) + 1 if hit.numel() else available
        return min(k, available) if rank is None else min(k, available, rank)
    return available if rank is None else min(rank, available)


def svd_outers(B, A, k: int):
    """Top-k singular vectors of B@A as outers: U (out×k), V (k×in), orthonormal."""
    u, _, v = factored_svd(B, A)
    return u[:, :k].contiguous(), v[:, :k].T.contiguous()


def relative_error(B, A, B2, A2) -> float:
    """||B2 A2 - B A||_F / ||B A||_F (0 for an all-zero update reproduced exactly)."""
    ref = frobenius(B, A)
    diff = difference_norm(B, A, B2, A2)
    if ref == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / ref
