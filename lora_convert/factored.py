"""float64 algebra of a matrix given by its factors, P @ Q, in numpy: the Cholesky (or QR) roots
of the factors, the thin SVD, ||P Q||_F and ||P1 Q1 − P2 Q2||_F, without forming the product.

No torch here: `inspect` converts LyCORIS modules with it (formats/lycoris.py), and mathcore
builds its stacked, torch-backed routes on the same roots and SVDs. Inputs are arrays (or
anything numpy reads as float64, e.g. float32/float64 CPU tensors).
"""
from __future__ import annotations

import math

import numpy as np

# A factor M is "well conditioned" when cond₁(R) <= this for its Cholesky factor R (MᵀM = RᵀR):
# the Gram route then loses at most ~cond²·eps ≈ 2e-8 of orthogonality (storage rounding is
# >= 6e-8), else the factor takes Householder QR.
GRAM_MAX_COND = 1e4


def chol_root(G: np.ndarray):
    """(R, R⁻¹) with G = RᵀR, R upper triangular (Cholesky), or None when G is singular or
    too ill-conditioned for R to stand in for the R of a QR factorisation."""
    from scipy.linalg import lapack  # only here and in svd: np.linalg serves the common paths

    if not G.size:
        return None
    R, info = lapack.dpotrf(G, lower=0, clean=1)
    if info != 0:
        return None
    R_inv, info = lapack.dtrtri(R, lower=0)
    if info != 0:
        return None
    cond = float(np.abs(R).sum(0).max() * np.abs(R_inv).sum(0).max())
    return (R, R_inv) if cond <= GRAM_MAX_COND else None  # also refuses NaN


def chol_roots(G: np.ndarray):
    """chol_root over a stack G (n×r×r): (R, R⁻¹, ok) with ok[i] False where G[i] is singular
    or too ill-conditioned (R[i] and R⁻¹[i] are then placeholders)."""
    n, r = G.shape[0], G.shape[-1]
    if not r:
        return G.copy(), G.copy(), np.zeros(n, dtype=bool)
    try:
        with np.errstate(all="ignore"):
            R = np.linalg.cholesky(G).swapaxes(1, 2)
            R_inv = np.linalg.inv(R)
            cond = np.abs(R).sum(1).max(1) * np.abs(R_inv).sum(1).max(1)
        return R, R_inv, cond <= GRAM_MAX_COND  # also refuses NaN
    except np.linalg.LinAlgError:  # one of them is not positive definite: each on its own
        roots = [chol_root(g) for g in G]
        R = np.stack([z[0] if z else np.eye(r) for z in roots])
        R_inv = np.stack([z[1] if z else np.eye(r) for z in roots])
        return R, R_inv, np.array([z is not None for z in roots], dtype=bool)


def svd(M: np.ndarray):
    """Thin SVD through LAPACK's dgesdd directly (np.linalg.svd's wrapper costs as much as
    the work on 16×16 matrices); np.linalg.svd where dgesdd does not converge."""
    from scipy.linalg import lapack

    if not M.size:
        return np.linalg.svd(M, full_matrices=False)
    u, s, vt, info = lapack.dgesdd(M, full_matrices=0)
    return (u, s, vt) if info == 0 else np.linalg.svd(M, full_matrices=False)


def stack_svd(M: np.ndarray):
    """Thin SVDs of a stack of small matrices (one LAPACK call per matrix, no Python loop)."""
    try:
        return np.linalg.svd(M, full_matrices=False)
    except np.linalg.LinAlgError:  # gesdd did not converge for one of them
        parts = [svd(m) for m in M]
        return tuple(np.stack(p) for p in zip(*parts))


def _f64(M) -> np.ndarray:
    return np.asarray(M, dtype=np.float64)


def _core(P: np.ndarray, Q: np.ndarray):
    """The SVD of P @ Q's r×r core and how to reach the singular vectors: (uc, s, vch, left,
    right) with left(uc) the left and right(vch) the right singular vectors (rows). As
    mathcore.Updates does for a stack: the Cholesky roots of PᵀP and QQᵀ where both are well
    conditioned, else Householder QR of P and Qᵀ."""
    rb, rb_inv, ok_b = chol_roots((P.T @ P)[None])
    ra, ra_inv, ok_a = chol_roots((Q @ Q.T)[None])
    if ok_b[0] and ok_a[0]:
        uc, s, vch = (x[0] for x in stack_svd(rb @ ra.swapaxes(1, 2)))
        return (uc, s, vch, lambda u: P @ (rb_inv[0] @ u),  # Q_P = P R_P⁻¹
                lambda vh: (ra_inv[0] @ vh.T).T @ Q)  # Q_Qᵀ = R_Q⁻ᵀ Q
    qb, Rb = np.linalg.qr(P)
    qa, Ra = np.linalg.qr(Q.T)
    uc, s, vch = (x[0] for x in stack_svd((Rb @ Ra.T)[None]))
    return uc, s, vch, lambda u: qb @ u, lambda vh: vh @ qa.T


def factored_svd(P, Q) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of P @ Q (P: m×r, Q: r×n) from the factors, float64.

    Returns (U, S, V) with P @ Q = U @ diag(S) @ V.T, S descending.
    Cost O((m + n) r²): a Cholesky (or, when ill-conditioned, QR) factor of P and Q.T, then
    an SVD of the small core.
    """
    uc, s, vch, left, right = _core(_f64(P), _f64(Q))
    return left(uc), s, right(vch).T


def frobenius(B, A) -> float:
    """||B @ A||_F from the factors (via the r×r core)."""
    return float(np.linalg.norm(_core(_f64(B), _f64(A))[1]))


def difference_norm(B1, A1, B2, A2) -> float:
    """||B1 @ A1 - B2 @ A2||_F, accurate even when the difference is tiny.

    Always through Householder QR: [B1, -B2] is nearly rank-deficient exactly when the
    difference is small, which is where Gram matrices would lose it.
    """
    C = np.concatenate([_f64(B1), -_f64(B2)], axis=1)
    D = np.concatenate([_f64(A1), _f64(A2)], axis=0)
    rc, rd = np.linalg.qr(C, mode="r"), np.linalg.qr(D.T, mode="r")
    return float(np.linalg.norm(rc @ rd.T))


def relative(diff: float, ref: float) -> float:
    """diff / ref as a relative error: 0 for a zero update reproduced exactly, inf for any error
    of a zero update."""
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref


def relative_error(B, A, B2, A2) -> float:
    """||B2 A2 - B A||_F / ||B A||_F (see relative)."""
    return relative(difference_norm(B, A, B2, A2), frobenius(B, A))
