"""Calibration-aware low-rank math: fit a module's *output* on data instead of its weights.

For inputs x with second moment C = E[x xᵀ], replacing the update ΔW by ΔW' changes the module's
output by a mean square of E||(ΔW' − ΔW) x||² = tr((ΔW' − ΔW) C (ΔW' − ΔW)ᵀ) = ||(ΔW' − ΔW) L||²_F
with C = L Lᵀ (Cholesky). Every fit here is the ordinary one with the input side multiplied by
L ("whitened", as in SVD-LLM / ASVD): the truncation is the factored SVD of B·(A L), the inner fit
for fixed outers U, V is fit_inner with A → A L and V → V L, and results are mapped back through
L⁻¹ by a triangular solve. Only r×in, k×in and b×in products with L are formed: never out×in.

Error-feedback rounding (GPTQ-style) of an input-side factor given C is here too; it takes the
quantizer as an argument (lora_convert.quant.GroupQuantizer: the storage format's own rounding).

Math core: float64, no I/O, no torch.nn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .mathcore import InnerFit, OuterBasis, Update, difference_norm, fit_inner, fit_projected

F64 = torch.float64
DEFAULT_DAMPING = 0.01  # added to C as this share of its mean diagonal (GPTQ's percdamp)


def _f64(t) -> torch.Tensor:
    t = torch.as_tensor(t)
    return t.detach().to(device="cpu", dtype=F64)


def whitening_factor(C: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """Lower-triangular L (float64) with L Lᵀ = C + λ·I, λ = damping · mean(diag C).

    Damping keeps L invertible where some input directions never occur in the calibration text
    (their output error is then weighted like plain weight error, scaled by λ); it grows tenfold
    until the Cholesky factorisation succeeds.
    """
    return damped_cholesky(C, damping)[0]


def damped_cholesky(C: torch.Tensor, damping: float = DEFAULT_DAMPING) -> tuple[torch.Tensor, float]:
    """(L, λ) of whitening_factor, on C's device (float64)."""
    C = C.detach().to(F64)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"second moment must be square, got {tuple(C.shape)}")
    C = 0.5 * (C + C.T)
    mean_diag = float(torch.diagonal(C).mean()) if C.numel() else 0.0
    unit = mean_diag if mean_diag > 0 and math.isfinite(mean_diag) else 1.0
    lam = max(damping, 1e-10) * unit
    idx = torch.arange(C.shape[0], device=C.device)
    for _ in range(12):
        D = C.clone()
        D[idx, idx] += lam
        L, info = torch.linalg.cholesky_ex(D)
        if int(info) == 0:
            return L, lam
        lam *= 10.0
    raise ValueError("second moment is not positive semi-definite (NaN or Inf in the statistics?)")


def whiten_rows(M: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """M L: rows of an input-side factor (A: r×in, V: b×in) in whitened coordinates."""
    return _f64(M) @ _f64(L)


def unwhiten_rows(M: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """M L⁻¹ by a triangular solve (the inverse of whiten_rows)."""
    return torch.linalg.solve_triangular(_f64(L), _f64(M), upper=False, left=False)


@dataclass
class WhitenedTruncation:
    """Rank-k factors B' (out×k), A' (k×in) with B'A' the best rank-k approximation of B A in
    the output error ||(B'A' − B A) L||_F; `spectrum` holds the whitened singular values of B A L."""

    B: torch.Tensor
    A: torch.Tensor
    spectrum: np.ndarray
    U: torch.Tensor  # orthonormal left factor (out×k) and whitened right factor (k×in), B'A' L = U diag(S) Vw
    Vw: torch.Tensor

    @property
    def rank(self) -> int:
        return self.B.shape[1]

    def retained(self, k: int | None = None) -> float:
        """Share of the output energy ||B A L||² on the calibration data kept at rank k."""
        k = self.rank if k is None else k
        total = float((self.spectrum ** 2).sum())
        return float((self.spectrum[:k] ** 2).sum()) / total if total else 1.0


def whitened_truncation(B, A, L, k: int) -> WhitenedTruncation:
    """Best rank-k approximation of B A in the output error ||(ΔW' − B A) L||_F, from the factors.

    The factored SVD of B·(A L) (A L is r×in) gives U_k S_k Vw_k; then B' = U_k S_k^½ and
    A' = S_k^½ Vw_k L⁻¹ (triangular solve). k is capped by the numerical rank.

    >>> import torch; B, A = torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    >>> t = whitened_truncation(B, A, torch.eye(5, dtype=torch.float64), 2)
    >>> bool(torch.allclose(t.B @ t.A, B @ A))
    True
    """
    L = _f64(L)
    upd = Update(B, whiten_rows(A, L))
    s = upd.spectrum
    tol = (float(s[0]) if s.size else 0.0) * 1e-12
    k = max(0, min(int(k), int((s > tol).sum())))
    U, Vw = upd.singular_vectors(k)
    root = torch.from_numpy(np.sqrt(s[:k]).copy())
    return WhitenedTruncation(B=U * root, A=unwhiten_rows(root[:, None] * Vw, L), spectrum=s, U=U, Vw=Vw)


def fit_inner_whitened(B, A, U, V, L, rank: int | None = None, keep_energy: float | None = None,
                       ub: OuterBasis | None = None, vb: OuterBasis | None = None) -> InnerFit:
    """Inner X, Y for fixed outers U (out×a), V (b×in) minimising ||(U X Y V − B A) L||_F: the ordinary
    fit (mathcore.fit_inner) with A → A L and V → V L. Energies in the result are output energies.
    `ub` = OuterBasis(U) and `vb` = whitened_basis(V, L) may be passed in when several modules share them."""
    if ub is None and vb is None:
        return fit_inner(B, whiten_rows(A, L), U, whiten_rows(V, L), rank, keep_energy)
    ub = ub or OuterBasis(U)
    vb = vb or whitened_basis(V, L)
    upd = Update(B, whiten_rows(A, L))
    return fit_projected(upd, ub, vb, ub.m.T @ upd.B, upd.A @ vb.m, rank, keep_energy)


def whitened_basis(V, L) -> OuterBasis:
    """The basis of the whitened outer V L (b×in), as fit_inner_whitened uses it."""
    return OuterBasis(whiten_rows(V, L).T)


def whitened_error(B, A, B2, A2, L, scale: float = 1.0) -> float:
    """scale · ||(B2 A2 − B A) L||_F: the RMS output error on the calibration data (times √tokens)."""
    L = _f64(L)
    return abs(scale) * difference_norm(B, whiten_rows(A, L), B2, whiten_rows(A2, L))


def whitened_relative_error(B, A, B2, A2, L) -> float:
    """||(B2 A2 − B A) L||_F / ||B A L||_F (0 when both are zero)."""
    L = _f64(L)
    ref = float(np.linalg.norm(Update(B, whiten_rows(A, L)).spectrum))
    diff = whitened_error(B, A, B2, A2, L)
    if ref == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / ref


# ------------------------------------------------------------------ rounding with error feedback

@dataclass
class Rounded:
    """Dequantized values (rows×cols, float64) and the scale of each row and group (rows×groups)."""

    values: torch.Tensor
    scales: torch.Tensor


def round_to_nearest(W, quantizer) -> Rounded:
    """W (rows×cols) rounded with each row and group's scale from W itself (float64): for a wide W
    (rows < cols) the values quant.encode stores, with quantizer = quant.GroupQuantizer."""
    W = _f64(W).numpy()
    g = quantizer.group
    Q, scales = np.empty_like(W), []
    for start in range(0, W.shape[1], g):
        scales.append(quantizer.scales(W[:, start:start + g]))
        Q[:, start:start + g] = quantizer.round(W[:, start:start + g], scales[-1][:, None])
    return Rounded(torch.from_numpy(Q), torch.from_numpy(np.stack(scales, axis=1)))


def feedback_factor(L) -> np.ndarray:
    """The upper Cholesky factor R of (L Lᵀ)⁻¹ = Rᵀ R that error-feedback rounding runs on (in×in,
    float64): computed once per input and shared by every factor that reads it."""
    L = _f64(L)
    H_inv = torch.cholesky_solve(torch.eye(L.shape[0], dtype=F64), L)
    H_inv = 0.5 * (H_inv + H_inv.T)
    R, info = torch.linalg.cholesky_ex(H_inv, upper=True)
    if int(info):
        raise ValueError("the damped second moment is too ill-conditioned for error-feedback rounding")
    return R.numpy()


def error_feedback_round(W, C=None, quantizer=None, damping: float = DEFAULT_DAMPING, *, factor=None,
                         feedback: np.ndarray | None = None) -> Rounded:
    """W (rows×in) rounded column by column, each column's rounding error pushed onto the columns
    not yet rounded so that the output error tr(E H Eᵀ), E = W_q − W, H = C + λI, stays small
    (GPTQ's update with the upper Cholesky factor of H⁻¹). Scales of a group are set when its first
    column is reached, from the already-corrected values. H comes from C (damped here), or from its
    damped Cholesky factor `factor` (H = L Lᵀ), or `feedback` = feedback_factor(L) itself.
    Rows are independent: the first k rows of the result are the result for W's first k rows."""
    W = _f64(W).numpy().copy()
    n = W.shape[1]
    if feedback is None:
        feedback = feedback_factor(whitening_factor(C, damping) if factor is None else factor)
    R = feedback
    g = quantizer.group
    Q = np.empty_like(W)
    scales = []
    for j in range(n):
        if j % g == 0:
            scales.append(quantizer.scales(W[:, j:j + g]))
        q = quantizer.round(W[:, j], scales[-1])
        Q[:, j] = q
        err = (W[:, j] - q) / R[j, j]
        W[:, j + 1:] -= np.outer(err, R[j, j + 1:])
    return Rounded(torch.from_numpy(Q), torch.from_numpy(np.stack(scales, axis=1)))
