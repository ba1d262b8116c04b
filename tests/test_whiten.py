"""Whitened (calibration-aware) truncation, inner fit and rounding against dense float64 references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_convert.mathcore import fit_inner
from lora_convert.quant import GroupQuantizer, encode
from lora_convert.whiten import (error_feedback_round, fit_inner_whitened, round_to_nearest,
                                 unwhiten_rows, whiten_rows, whitened_error, whitened_relative_error,
                                 whitened_truncation, whitening_factor)

F64 = torch.float64


def correlated_inputs(n_tokens: int, dim: int, seed: int, decay: float = 0.7) -> torch.Tensor:
    """Tokens whose features are strongly correlated (a few directions carry most of the energy),
    as the inputs of a transformer's projections are."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64))
    scales = decay ** torch.arange(dim, dtype=F64)
    return torch.randn(n_tokens, dim, generator=g, dtype=F64) * scales @ basis.T


def factors(out: int, r: int, inp: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, r, generator=g, dtype=F64), torch.randn(r, inp, generator=g, dtype=F64)


def output_error(W2: torch.Tensor, W: torch.Tensor, X: torch.Tensor) -> float:
    """Frobenius norm of the output difference on the tokens X (n×in): dense reference."""
    return float(torch.linalg.matrix_norm((W2 - W) @ X.T))


def test_whitening_factor_is_cholesky_of_damped_moment():
    X = correlated_inputs(200, 12, seed=0)
    C = X.T @ X / 200
    L = whitening_factor(C, damping=0.05)
    lam = 0.05 * float(torch.diagonal(C).mean())
    assert torch.allclose(L @ L.T, C + lam * torch.eye(12, dtype=F64), atol=1e-12)
    assert torch.equal(L, torch.tril(L))


def test_whitening_factor_of_singular_moment():
    X = correlated_inputs(3, 10, seed=1)  # rank 3 of 10: Cholesky of C alone would fail without damping
    L = whitening_factor(X.T @ X, damping=0.0)
    assert torch.isfinite(L).all() and (torch.diagonal(L) > 0).all()
    with pytest.raises(ValueError):
        whitening_factor(torch.full((3, 3), float("nan")))


def test_whiten_unwhiten_round_trip():
    X = correlated_inputs(100, 9, seed=2)
    L = whitening_factor(X.T @ X / 100)
    M = torch.randn(4, 9, dtype=F64)
    assert torch.allclose(unwhiten_rows(whiten_rows(M, L), L), M, atol=1e-10)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_whitened_truncation_matches_dense_optimum(k):
    B, A = factors(20, 6, 15, seed=3)
    X = correlated_inputs(400, 15, seed=4)
    L = whitening_factor(X.T @ X / 400, damping=1e-3)
    t = whitened_truncation(B, A, L, k)
    # dense reference: truncated SVD of (B A) L, mapped back through L⁻¹
    u, s, vh = torch.linalg.svd(B @ A @ L)
    ref = (u[:, :k] * s[:k]) @ vh[:k] @ torch.linalg.inv(L)
    assert t.B.shape == (20, k) and t.A.shape == (k, 15)
    assert torch.allclose(t.B @ t.A, ref, atol=1e-9 * float(s[0]))
    assert np.allclose(t.spectrum, s[:6].numpy(), rtol=1e-10)
    # its output-space error is the tail of the whitened spectrum
    assert whitened_error(B, A, t.B, t.A, L) == pytest.approx(float(s[k:].square().sum().sqrt()), rel=1e-8)
    assert t.retained() == pytest.approx(float(s[:k].square().sum() / s.square().sum()), rel=1e-10)


def test_whitened_truncation_beats_plain_truncation_on_correlated_inputs():
    B, A = factors(32, 8, 24, seed=5)
    X = correlated_inputs(2000, 24, seed=6)
    L = whitening_factor(X.T @ X / 2000, damping=1e-4)
    W = B @ A
    u, s, vh = torch.linalg.svd(W)
    for k in (1, 2, 4):
        plain = (u[:, :k] * s[:k]) @ vh[:k]
        t = whitened_truncation(B, A, L, k)
        e_plain, e_white = output_error(plain, W, X), output_error(t.B @ t.A, W, X)
        assert e_white < 0.8 * e_plain, (k, e_white, e_plain)
        # whitened_error measures exactly this (data second moment = L Lᵀ up to the damping)
        assert whitened_error(B, A, t.B, t.A, L) * 2000 ** 0.5 == pytest.approx(e_white, rel=1e-2)


def test_whitened_truncation_caps_rank_and_handles_zero():
    B, A = factors(10, 2, 7, seed=7)
    L = torch.eye(7, dtype=F64)
    assert whitened_truncation(B, A, L, 5).rank == 2
    z = whitened_truncation(torch.zeros(10, 3, dtype=F64), torch.zeros(3, 7, dtype=F64), L, 2)
    assert z.rank == 0 and z.retained() == 1.0


def test_identity_whitening_is_plain_truncation():
    B, A = factors(12, 5, 9, seed=8)
    t = whitened_truncation(B, A, torch.eye(9, dtype=F64), 3)
    u, s, vh = torch.linalg.svd(B @ A)
    assert torch.allclose(t.B @ t.A, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-10)


@pytest.mark.parametrize("rank", [None, 2])
def test_fit_inner_whitened_matches_dense_least_squares(rank):
    B, A = factors(30, 6, 20, seed=9)
    g = torch.Generator().manual_seed(10)
    U = torch.rand(30, 8, generator=g, dtype=F64) * 2 - 1
    V = torch.rand(7, 20, generator=g, dtype=F64) * 2 - 1
    X = correlated_inputs(500, 20, seed=11)
    L = whitening_factor(X.T @ X / 500, damping=1e-3)
    fit = fit_inner_whitened(B, A, U, V, L, rank=rank)
    # dense reference: project B A L onto range(U) and row space of V L, then truncate
    Qu, _ = torch.linalg.qr(U)
    Qv, _ = torch.linalg.qr((V @ L).T)
    P = Qu @ Qu.T @ B @ A @ L @ Qv @ Qv.T
    k = rank or 7
    u, s, vh = torch.linalg.svd(P)
    best = (u[:, :k] * s[:k]) @ vh[:k]
    got = U @ fit.X @ fit.Y @ V @ L
    assert torch.allclose(got, best, atol=1e-8 * float(s[0]))
    # and it beats the unwhitened fit in output error
    plain = fit_inner(B, A, U, V, rank=rank)
    W = B @ A
    assert output_error(U @ fit.X @ fit.Y @ V, W, X) < output_error(U @ plain.X @ plain.Y @ V, W, X)


def test_whitened_error_matches_dense():
    B, A = factors(15, 4, 11, seed=12)
    B2, A2 = factors(15, 3, 11, seed=13)
    X = correlated_inputs(300, 11, seed=14)
    L = whitening_factor(X.T @ X / 300)
    dense = float(torch.linalg.matrix_norm((B2 @ A2 - B @ A) @ L))
    assert whitened_error(B, A, B2, A2, L, scale=2.5) == pytest.approx(2.5 * dense, rel=1e-10)
    rel = whitened_relative_error(B, A, B2, A2, L)
    assert rel == pytest.approx(dense / float(torch.linalg.matrix_norm(B @ A @ L)), rel=1e-10)
    assert whitened_relative_error(B, A, B, A, L) < 1e-12


def on_grid(r, quant: GroupQuantizer) -> bool:
    """Every value is an integer multiple of its row and group's fp16 scale, within ±qmax."""
    scales = r.scales.repeat_interleave(quant.group, dim=1)[:, :r.values.shape[1]]
    codes = r.values / scales
    fp16 = torch.equal(r.scales, r.scales.half().double())
    return fp16 and torch.allclose(codes, codes.round(), atol=1e-9) and float(codes.abs().max()) <= quant.qmax


@pytest.mark.parametrize("bits", [3, 4])
def test_error_feedback_rounding_beats_round_to_nearest_in_output_error(bits):
    g = torch.Generator().manual_seed(15)
    W = torch.randn(6, 48, generator=g, dtype=F64)
    X = correlated_inputs(3000, 48, seed=16, decay=0.85)
    C = X.T @ X / 3000
    quant = GroupQuantizer(bits, 16)
    rtn = round_to_nearest(W, quant)
    ef = error_feedback_round(W, C, quant, damping=1e-4)
    assert on_grid(rtn, quant) and on_grid(ef, quant)
    e_rtn, e_ef = output_error(rtn.values, W, X), output_error(ef.values, W, X)
    assert e_ef < 0.9 * e_rtn, (e_ef, e_rtn)
    # and not by moving far from W: each value stays within a few steps of the original
    assert float((ef.values - W).abs().max()) < 8 * float(W.abs().max()) / quant.qmax


def test_round_to_nearest_is_within_half_a_step():
    W = torch.randn(5, 40, generator=torch.Generator().manual_seed(23), dtype=F64)
    quant = GroupQuantizer(8, 8)  # 8 bits: every group's scale is max|x| / qmax
    Q = round_to_nearest(W, quant).values
    step = W.reshape(5, 5, 8).abs().amax(-1, keepdim=True) / quant.qmax
    assert ((Q - W).reshape(5, 5, 8).abs() <= step * 0.5 * (1 + 1e-2) + 1e-12).all()


def test_round_to_nearest_with_clipped_scales_is_within_half_its_step_or_clamped():
    """At 2-4 bits a group's scale may be below max|x| / qmax (quant.CLIP_RATIOS): each value is
    then within half of that group's own step, or clamped to ±qmax steps beyond it."""
    W = torch.randn(5, 40, generator=torch.Generator().manual_seed(23), dtype=F64)
    quant = GroupQuantizer(4, 8)
    r = round_to_nearest(W, quant)
    step = r.scales.repeat_interleave(8, dim=1)
    err = (r.values - W).abs()
    clamped = (r.values.abs() >= quant.qmax * step * (1 - 1e-12)) & (W.abs() > quant.qmax * step)
    assert (clamped | (err <= step * 0.5 * (1 + 1e-2) + 1e-12)).all()
    assert bool(clamped.any())  # this seed's groups do clip


def test_round_to_nearest_is_the_stored_encoding_and_error_feedback_encodes_to_itself():
    """One quantizer: plain rounding of a wide factor gives exactly the values quant.encode stores,
    and error-feedback values re-encode (as the writer does) to values at least as good."""
    g = torch.Generator().manual_seed(21)
    W = torch.randn(4, 70, generator=g, dtype=F64)
    quant = GroupQuantizer(4, 16)
    _, stored = encode(W.numpy(), 4, 16)
    assert np.array_equal(round_to_nearest(W, quant).values.numpy(), stored.astype(np.float64))
    X = correlated_inputs(2000, 70, seed=22, decay=0.85)
    C = X.T @ X / 2000
    ef = error_feedback_round(W, C, quant, damping=1e-4)
    _, again = encode(ef.values.numpy(), 4, 16)
    assert output_error(torch.from_numpy(again.astype(np.float64)), W, X) < \
        output_error(round_to_nearest(W, quant).values, W, X)
    # rows are independent: the first rows' rounding is that of the first rows alone
    assert torch.equal(error_feedback_round(W[:2], C, quant, damping=1e-4).values, ef.values[:2])
