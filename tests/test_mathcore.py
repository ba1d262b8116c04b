"""Math core: exactness, least-squares optimality, truncation, energy selection, and the
Gram/Cholesky fast paths with their QR fallbacks, each against a dense reference."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_convert import factored, mathcore
from helpers.fits import fit_inner, svd_outers
from lora_convert.factored import factored_svd, relative_error
from lora_convert.mathcore import choose_rank, difference_norm, frobenius

D = torch.float64
# Updates of order one (top singular value 30, spectrum falling 30x): the perturbation test's
# absolute steps are then small next to the optimal inner matrices.
SPECTRUM = dict(cond=30.0, scale=30.0)


def dense_error(B, A, U, fit, V):
    return float(torch.linalg.matrix_norm(U.to(D) @ fit.X @ fit.Y @ V.to(D) - B @ A))


def test_factored_svd_matches_dense_svd(lowrank):
    B, A = lowrank(50, 40, 6, **SPECTRUM)
    u, s, v = factored_svd(B.numpy(), A.numpy())
    dense = torch.linalg.svdvals(B @ A)[:6].numpy()
    assert np.allclose(s, dense, rtol=1e-10)
    assert np.allclose(u @ np.diag(s) @ v.T, (B @ A).numpy(), atol=1e-12)


def test_frobenius_and_difference_norm_from_factors(lowrank):
    B, A = lowrank(30, 20, 4, **SPECTRUM)
    B2, A2 = lowrank(30, 20, 3, seed=1, **SPECTRUM)
    assert frobenius(B, A) == pytest.approx(float(torch.linalg.matrix_norm(B @ A)), rel=1e-12)
    assert difference_norm(B, A, B2, A2) == pytest.approx(float(torch.linalg.matrix_norm(B @ A - B2 @ A2)),
                                                          rel=1e-10)
    assert difference_norm(B, A, B, A) < 1e-12 * frobenius(B, A)


def test_svd_outers_exact_when_inner_rank_covers_rank(lowrank):
    B, A = lowrank(64, 48, 8, **SPECTRUM)
    U, V = svd_outers(B, A, 8)
    fit = fit_inner(B, A, U, V)
    assert fit.rank == 8
    assert relative_error(B, A, U @ fit.X, fit.Y @ V) < 1e-12


def test_non_orthonormal_outers_reproduce_an_update_inside_their_span():
    g = torch.Generator().manual_seed(3)
    U, V = torch.randn(40, 10, generator=g, dtype=D) * 5, torch.randn(12, 30, generator=g, dtype=D) + 2
    B = U @ torch.randn(10, 4, generator=g, dtype=D)
    A = torch.randn(4, 12, generator=g, dtype=D) @ V
    fit = fit_inner(B, A, U, V)
    assert relative_error(B, A, U @ fit.X, fit.Y @ V) < 1e-10
    assert fit.retained_energy() == pytest.approx(1.0, abs=1e-10)


def test_fit_equals_dense_least_squares_reference(lowrank):
    B, A = lowrank(40, 36, 6, seed=4, **SPECTRUM)
    g = torch.Generator().manual_seed(5)
    U, V = torch.randn(40, 12, generator=g, dtype=D), torch.randn(9, 36, generator=g, dtype=D)
    fit = fit_inner(B, A, U, V, rank=3)
    qu, _ = torch.linalg.qr(U)
    qv, _ = torch.linalg.qr(V.T)
    u, s, vh = torch.linalg.svd(qu.T @ (B @ A) @ qv)
    best = qu @ (u[:, :3] * s[:3]) @ vh[:3] @ qv.T
    assert dense_error(B, A, U, fit, V) == pytest.approx(float(torch.linalg.matrix_norm(best - B @ A)), rel=1e-9)


@pytest.mark.parametrize("rank", [2, 5])
def test_no_perturbation_of_inner_matrices_lowers_the_error(rank, lowrank):
    B, A = lowrank(30, 25, 6, seed=7, **SPECTRUM)
    g = torch.Generator().manual_seed(8)
    U, V = torch.randn(30, 8, generator=g, dtype=D), torch.randn(8, 25, generator=g, dtype=D)
    fit = fit_inner(B, A, U, V, rank=rank)
    best = dense_error(B, A, U, fit, V)
    X0, Y0 = fit.X.clone(), fit.Y.clone()
    for scale in (1e-2, 1e-4):
        for _ in range(30):
            fit.X = X0 + scale * torch.randn(X0.shape, generator=g, dtype=D)
            fit.Y = Y0 + scale * torch.randn(Y0.shape, generator=g, dtype=D)
            assert dense_error(B, A, U, fit, V) >= best * (1 - 1e-12)


def test_truncation_error_equals_discarded_energy(lowrank):
    B, A = lowrank(50, 50, 8, seed=9, **SPECTRUM)
    U, V = svd_outers(B, A, 8)
    fit = fit_inner(B, A, U, V, rank=3)
    s = torch.linalg.svdvals(B @ A)
    expected = float((s[3:] ** 2).sum() / (s**2).sum()) ** 0.5
    assert relative_error(B, A, U @ fit.X, fit.Y @ V) == pytest.approx(expected, rel=1e-9)
    assert fit.retained_energy() == pytest.approx(1 - expected**2, rel=1e-9)


def test_keep_energy_picks_the_smallest_sufficient_rank():
    s = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=D)
    total = float((s**2).sum())
    for target in (0.5, 0.8, 0.95, 0.99, 1.0):
        k = choose_rank(s, total, None, target)
        assert float((s[:k] ** 2).sum()) / total >= target - 1e-12
        assert k == 1 or float((s[: k - 1] ** 2).sum()) / total < target


def test_keep_energy_capped_by_what_outers_can_hold(lowrank):
    B, A = lowrank(200, 200, 8, seed=10, **SPECTRUM)
    g = torch.Generator().manual_seed(1)
    U, V = torch.randn(200, 8, generator=g, dtype=D), torch.randn(8, 200, generator=g, dtype=D)
    fit = fit_inner(B, A, U, V, keep_energy=0.99)
    assert fit.rank == 8 and fit.retained_energy() < 0.2  # random outers hold a small share


@settings(max_examples=40, deadline=None)
@given(out=st.integers(2, 40), inp=st.integers(2, 40), r=st.integers(1, 8), a=st.integers(1, 16),
       b=st.integers(1, 16), k=st.integers(1, 8), dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]),
       seed=st.integers(0, 1000))
def test_fit_properties(out, inp, r, a, b, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(out, r, generator=g).to(dtype)
    A = torch.randn(r, inp, generator=g).to(dtype)
    a, b = min(a, out), min(b, inp)
    U, V = torch.randn(out, a, generator=g), torch.randn(b, inp, generator=g)
    fit = fit_inner(B, A, U, V, rank=k)
    assert fit.X.shape == (a, fit.rank) and fit.Y.shape == (fit.rank, b) and fit.rank <= min(k, r, a, b)
    assert fit.X.dtype == D and torch.isfinite(fit.X).all() and torch.isfinite(fit.Y).all()
    err = relative_error(B, A, U.to(D) @ fit.X, fit.Y @ V.to(D))
    assert 0.0 <= err <= 1.0 + 1e-9  # a least-squares fit never does worse than zero
    assert err ** 2 == pytest.approx(1 - fit.retained_energy(), abs=1e-8)
    U2, V2 = svd_outers(B, A, min(r, out, inp))
    exact = fit_inner(B, A, U2, V2)
    assert relative_error(B, A, U2 @ exact.X, exact.Y @ V2) < 1e-9


def test_low_energy_message_says_whether_the_adapter_was_recovered():
    from lora_convert.hub.modelcard import _low_energy_note
    from lora_convert.report import FidelityReport, ModuleFidelity

    def report(recovered: bool) -> FidelityReport:
        rows = [ModuleFidelity("m", (8, 8), 4, 4, "random", 2, 2, 0.9, 1.0, recovered=recovered)]
        return FidelityReport(rows)

    closed_form, refitted = report(False), report(True)
    assert closed_form.low_energy and refitted.low_energy  # 19% kept in weight space either way
    assert closed_form.warning().startswith("WARNING") and "run `lora-convert recover`" in closed_form.warning()
    assert refitted.warning().startswith("NOTE") and "lora-convert eval" in refitted.warning()
    assert "recover`)" in _low_energy_note(refitted)[0] and "recover`)" not in _low_energy_note(closed_form)[0]
    assert "19.0%" in refitted.table() and refitted.as_dict()["modules"][0]["recovered"] is True


def test_modules_low_on_energy_get_a_note_when_the_whole_adapter_is_fine():
    from lora_convert.report import FidelityReport, ModuleFidelity

    big = ModuleFidelity("big", (8, 8), 4, 4, "svd", 4, 4, 0.1, 100.0)
    weak = ModuleFidelity("weak", (8, 8), 4, 1, "svd", 1, 1, 0.9, 1.0)  # keeps 19% of a small update
    fine = FidelityReport([big])
    assert fine.warning() is None
    mixed = FidelityReport([big, weak])
    assert not mixed.low_energy and mixed.low_modules == [weak]
    assert mixed.warning().startswith("NOTE: 1 of 2 modules") and "weak, 19.0%" in mixed.warning()
    assert mixed.warning() in mixed.table() and "as a whole keeps more" in mixed.warning()
    unknown = ModuleFidelity("unrecorded", (8, 8), 4, 4, "svd", 4, 4, None, 1.0)
    assert "figure is unknown" in FidelityReport([big, weak, unknown]).warning()
    weak_recovered = ModuleFidelity("weak", (8, 8), 4, 1, "svd", 1, 1, 0.9, 1.0, recovered=True)
    assert FidelityReport([big, weak_recovered]).warning() is None  # weight space says little after recover


# ---------------------------------------------------------------- Gram/Cholesky fast paths

@pytest.mark.parametrize("cond", [1.0, 1e6, float("inf")])
def test_cholesky_and_qr_routes_give_the_dense_svd(cond, lowrank):
    B, A = lowrank(60, 50, 6, cond=1e3 if cond == float("inf") else cond)
    if cond == float("inf"):
        B[:, -1] = B[:, 0]  # rank-deficient: Cholesky fails, QR takes over
    upd = mathcore.Update(B, A)
    expect_gram = cond == 1.0
    assert (factored.chol_root(upd.gram_b) is not None) == expect_gram
    dense = torch.linalg.svdvals(B @ A).numpy()
    assert upd.spectrum[:5] == pytest.approx(dense[:5], rel=1e-9)
    assert upd.energy == pytest.approx(float((dense**2).sum()), rel=1e-12)
    u, v = upd.singular_vectors(3)
    torch.testing.assert_close(u @ torch.diag(torch.from_numpy(upd.spectrum[:3])) @ v,
                               torch.linalg.svd(B @ A)[0][:, :3] @ torch.diag(torch.from_numpy(dense[:3]))
                               @ torch.linalg.svd(B @ A)[2][:3], atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("cond", [1.0, 1e6, float("inf")])
def test_one_module_numpy_route_is_the_stacked_route(cond, lowrank):
    """factored.factored_svd (numpy, no torch: LyCORIS conversion) takes the route a stack of one
    takes in mathcore.Updates and lands on the same singular values and vectors."""
    B, A = lowrank(60, 50, 6, cond=1e3 if cond == float("inf") else cond)
    if cond == float("inf"):
        B[:, -1] = B[:, 0]
    upd = mathcore.Update(B, A)
    u, s, v = factored_svd(B.numpy(), A.numpy())
    uu, vv = upd.singular_vectors(len(upd.spectrum))
    assert np.allclose(s, upd.spectrum, rtol=1e-12, atol=1e-12 * s[0])
    k = 5  # the rank-deficient case's last direction is noise in either route
    assert np.allclose(u[:, :k], uu[:, :k].numpy(), atol=1e-10) and np.allclose(v[:, :k], vv[:k].T.numpy(), atol=1e-10)
    assert factored.frobenius(B.numpy(), A.numpy()) == pytest.approx(float(np.linalg.norm(upd.spectrum)), rel=1e-12)


def mini_difference_norm(upd, UtB, AVt, GU, GV, X, Y) -> float | None:
    """mathcore.mini_difference_norms for one module; None when the result is too small to trust."""
    stacked = (np.asarray(m)[None] for m in (UtB, AVt, GU, GV, X, Y))
    d = float(mathcore.mini_difference_norms(upd.stack, *stacked)[0])
    return None if d != d else d


def test_gram_error_formula_refuses_what_it_cannot_resolve(lowrank):
    B, A = lowrank(40, 30, 4)
    upd = mathcore.Update(B, A)
    U, V = upd.singular_vectors(4)
    ub, vb = mathcore.OuterBasis(U), mathcore.OuterBasis(V.T)
    X = Y = torch.diag(torch.from_numpy(upd.spectrum[:4]).sqrt())
    args = (upd, ub.m.T @ upd.B, upd.A @ vb.m, ub.gram, vb.gram)
    assert mini_difference_norm(*args, X, Y) is None  # exact: rounding noise only
    Xp = X * (1 + 1e-3)
    expect = float(torch.linalg.matrix_norm(B @ A - U @ Xp @ Y @ V))
    assert mini_difference_norm(*args, Xp, Y) == pytest.approx(expect, rel=1e-6)


def test_low_energy_advice_of_budgeted_files_names_the_budget():
    """Rank and bits of quantized modules were chosen by the budget: the lever is --target-size,
    not --rank / --outer-dim (which a budget overrides)."""
    from lora_convert.report import FidelityReport, ModuleFidelity

    def rows(quantized: bool):
        return [ModuleFidelity("big", (8, 8), 4, 4, "svd", 4, 4, 0.1, 100.0, bits=4.25, quantized=quantized),
                ModuleFidelity("weak", (8, 8), 4, 1, "svd", 1, 1, 0.9, 1.0, bits=4.25, quantized=quantized)]

    assert "--target-size" in FidelityReport(rows(True)).warning()
    assert "--outer-dim" in FidelityReport(rows(False)).warning()
    low = [ModuleFidelity("m", (8, 8), 4, 1, "svd", 1, 1, 0.9, 1.0, bits=3.25, quantized=True)]
    assert FidelityReport(low).warning().startswith("WARNING") and "--target-size" in FidelityReport(low).warning()
