"""Size–fidelity budgets: per-module error curves over (inner rank, bits) and their global
allocation under a byte budget or a fidelity floor.

Every module offers options (k, bits) with their stored bytes and squared weight-space error
‖s·B·A − s·B̃_k·Ã_k‖²_F, where B̃, Ã are the factors as a reader decodes them. allocate()
picks one option per module to minimise the summed error under the budget: greedy by
marginal error saved per byte along each module's lower convex hull, which is the Lagrangian
solution at every budget it stops on (deterministic: ties go to the earlier module).

Under a byte budget the walk weighs each module's error by energy^(BALANCE − 1), so that its
objective is Σ E^BALANCE · (relative error)²: with BALANCE = 1 (the summed weight-space error)
modules with small updates (value projections, early layers) are starved, though their effect on
the model's outputs is larger than their share of the energy; BALANCE = 0.75 kept more effect on
held-out text at 12 of 14 measured points (benchmarks/README.md, "Size–fidelity frontier").
A fidelity floor (`min_fidelity`) asks for a weight-space share, so it walks with 1.

Calibration plugs in through `whitening`: a lower-triangular L (in×in, float64) with
C = L Lᵀ the second moment of the module's input; errors are then ‖(ΔW' − ΔW) L‖_F, the error
of the module's output on that data, and the factors are fitted in that metric.
"""
from __future__ import annotations

import dataclasses
import functools
import heapq
import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch

from . import quant
from .mathcore import OuterBasis, Update, fit_projected_stack


BALANCE = 0.75


def balance_for(min_fidelity: float | None) -> float:
    """The walk's balance: BALANCE, or 1 when a fidelity floor (a weight-space share) is asked for."""
    return 1.0 if min_fidelity is not None else BALANCE


class Option(NamedTuple):
    """One (rank, width) choice of a module. A named tuple: plans build tens of thousands of
    them, twice as fast as frozen dataclasses."""

    k: int
    bits: int | str  # a quant width: integer bits or a codebook name
    nbytes: int  # data bytes of the module's stored factors at (k, bits)
    err2: float  # squared weight-space error, scale included


@dataclass
class Curve:
    """One module's options and its update's energy s²‖BA‖²_F (in the whitened metric if any).

    A partial curve (error_curve's `exact_bits` / `max_k`) also lists `pending` options whose
    error is not computed: their `nbytes` and `err2` are lower bounds (the error of any rank-k
    factors is at least the energy beyond σ_k; a width whose first ranks are computed also bounds
    its further ranks through their residual, _residual_bounds). Its first `certain` hull steps
    are those no pending option can change (every pending option lies strictly above the step's
    line), so an allocation that stays within them is the one the complete curve gives; -1: not
    even the cheapest option is certain."""

    name: str
    energy: float
    options: list[Option]
    overhead: int = 0  # header bytes the module costs whatever its option
    pending: list[Option] = field(default_factory=list)
    factors: object = None  # what the fit may reuse (SvdRecipe), opaque here

    @functools.cached_property
    def hull(self) -> list[Option]:
        return lower_hull(self.options)

    @functools.cached_property
    def certain(self) -> int:
        return _certain_steps(self.hull, self.pending, self.energy)

    @property
    def complete(self) -> bool:
        return not self.pending


def _certain_steps(hull: list[Option], pending: list[Option], energy: float) -> int:
    """How many leading hull steps (hull[j] → hull[j+1]) no pending option can change."""
    if not pending:
        return len(hull) - 1
    nb = np.array([p.nbytes for p in pending], dtype=np.float64)
    lb = np.array([p.err2 for p in pending], dtype=np.float64)
    tol = 1e-9 * energy  # the computed errors carry ~1e-15·energy of round-off
    h0 = hull[0]
    if not ((nb > h0.nbytes) | (lb > h0.err2 + tol)).all():
        return -1
    for j, (u, v) in enumerate(zip(hull, hull[1:])):
        line = u.err2 + (v.err2 - u.err2) * (nb - u.nbytes) / (v.nbytes - u.nbytes)
        if not (lb > line + tol).all():
            return j
    return len(hull) - 1  # beyond the last computed option a pending one may extend the hull


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


def _prefix_errors(energy: float, Bt: torch.Tensor, A: torch.Tensor, P1: torch.Tensor, P2: torch.Tensor,
                   blocks: bool = False):
    """‖BA − P1[w, :k]ᵀ P2[w, :k]‖²_F for every candidate w of a stack (P1: W×K×out holds the
    output-side factors transposed, P2: W×K×in the input-side ones; Bt = Bᵀ) and k = 1..K,
    from small products only (no out×in matrix). In torch, whose thread count the caller limits:
    numpy's BLAS spreads products of this size over every core, and on a busy machine its
    threads wait on each other (the plan ran 20-60x slower that way). `blocks`: also return the
    products it formed, (P1 B, P2 Aᵀ, P1 P1ᵀ, P2 P2ᵀ) as numpy stacks (_residual_bounds)."""
    W, K = P1.shape[:2]
    # every operand with its long side contiguous: MKL's double products run 2x faster so
    C1 = P1.reshape(W * K, -1) @ Bt.contiguous().T
    C2 = P2.reshape(W * K, -1) @ A.T
    cross = torch.cumsum((C1 * C2).sum(1).view(W, K), 1)
    G1, G2 = torch.bmm(P1, P1.transpose(1, 2)), torch.bmm(P2, P2.transpose(1, 2))
    self_ = torch.diagonal(torch.cumsum(torch.cumsum(G1 * G2, 1), 2), dim1=1, dim2=2)
    err2 = np.maximum(energy - 2.0 * cross.numpy() + self_.numpy(), 0.0)
    if not blocks:
        return err2
    return err2, (C1.view(W, K, -1).numpy(), C2.view(W, K, -1).numpy(), G1.numpy(), G2.numpy())


def _residual_bounds(items: list[tuple[Update, np.ndarray, tuple, int]]) -> list[np.ndarray]:
    """For each (upd, err_k, blocks, count): lower bounds (W × count) on ‖BA − P̃1 P̃2‖²_F of
    rank-(k + d) factors, d = 1..count, whose first k rows are the rounded ones `blocks` describes
    (_prefix_errors at rank k, errors err_k per candidate). The k + d factors differ from the first
    k by a matrix of rank ≤ d, so the error is at least err_k less the d largest squared singular
    values of the residual R = BA − P1ᵀP2 (Eckart–Young). R = [B, −P1ᵀ]·[A; P2], and its singular
    values come from the two Gram matrices, which are made of the blocks already formed. The
    rounding noise of the first k rows stays in the bound, which the Eckart–Young floor of rank
    k + d alone leaves out. Items of one size are solved in one call."""
    out: list[np.ndarray | None] = [None] * len(items)
    sizes: dict[tuple, list[int]] = {}
    for i, (_, _, (C1, _, _, _), _) in enumerate(items):
        sizes.setdefault(C1.shape[1:], []).append(i)
    for idx in sizes.values():
        gx, gy = [], []
        for i in idx:
            upd, _, (C1, C2, G1, G2), _ = items[i]
            # B·a and A/a with a a power of two (exact) making ‖Ba‖ ≈ ‖A/a‖: the Grams' round-off
            # grows with ‖X‖²‖Y‖², which a lopsided pair inflates while BA stays the same
            a = 2.0 ** round(0.25 * math.log2(max(np.trace(upd.gram_a), 1e-300) / max(np.trace(upd.gram_b), 1e-300)))
            gx.append(_gram_blocks(upd.gram_b * (a * a), -C1 * a, G1))
            gy.append(_gram_blocks(upd.gram_a / (a * a), C2 / a, G2))
        gx, gy = np.concatenate(gx), np.concatenate(gy)
        scale = np.trace(gx, axis1=1, axis2=2) * np.trace(gy, axis1=1, axis2=2)  # ‖X‖²‖Y‖² per candidate
        # in torch, whose threads the caller limits (numpy's LAPACK would wake every core's BLAS thread)
        lam, Q = torch.linalg.eigh(torch.from_numpy(gx))
        Z = Q * lam.clamp_min(0.0).sqrt()[:, None, :]
        s2 = np.maximum(torch.linalg.eigvalsh(Z.transpose(1, 2) @ torch.from_numpy(gy) @ Z).numpy()[:, ::-1], 0.0)
        start = 0
        for i in idx:
            upd, err_k, _, count = items[i]
            rows = slice(start, start + len(err_k))
            start += len(err_k)
            top = np.cumsum(s2[rows], 1)
            top = np.concatenate([top, np.repeat(top[:, -1:], max(count - top.shape[1], 0), 1)], 1)[:, :count]
            # the Gram route's round-off is ~eps·‖X‖²‖Y‖², the errors' ~eps·‖B‖²‖A‖²: keep well below both
            slack = 1e-9 * np.maximum(scale[rows], max(float(upd.energy), upd.factor_scale))
            out[i] = err_k[:, None] - top - slack[:, None]
    return out


def _gram_blocks(G: np.ndarray, C: np.ndarray, H: np.ndarray) -> np.ndarray:
    """[[G, Cᵀ], [C, H]] for each candidate (C: W×k×r, H: W×k×k): a Gram matrix of [F, Pᵀ] from
    FᵀF = G, PF = C and PPᵀ = H."""
    W, k, r = C.shape
    out = np.empty((W, r + k, r + k))
    out[:, :r, :r], out[:, :r, r:], out[:, r:, :r], out[:, r:, r:] = G, C.swapaxes(1, 2), C, H
    return out


def _fp16_values(x: torch.Tensor) -> torch.Tensor:
    """float16(x) as float64, rounded to nearest even as numpy's direct cast does (torch's own
    cast goes through float32 and can round twice): x / ulp rounded to an integer, times the
    ulp, with ulp = 2^(e−10) for |x| in [2^e, 2^(e+1)) and 2^−24 (subnormals) below 2^−14.
    |x| must not exceed float16's largest value. Four times faster than numpy's cast."""
    expo = x.view(torch.int64) & 0x7FF0000000000000  # the power of two below |x| (sign dropped)
    ulp = (expo - (10 << 52)).clamp_min_((1023 - 24) << 52).view(torch.float64)
    return torch.div(x, ulp).round_().mul_(ulp)  # exact: scaling by a power of two


def rounded_vectors(M: np.ndarray, widths, group: int, by_rows: bool = False,
                    scales_out: dict | None = None, codes_out: dict | None = None) -> torch.Tensor:
    """quant.rounded_widths(M, widths, group), the same values bit for bit, as one float64 tensor
    (widths × vectors × long side): M's vectors (its columns if it is tall or square, else its
    rows; `by_rows`: its rows, as a wide matrix's) as rows. The planning path: integer widths in one
    thread of torch instead of numpy (division, rounding half to even and float16 are IEEE
    operations either way; tests/test_budget.py compares them), codebooks by quant's own steps.
    `scales_out`: receives the float16 scales (vectors × groups) of the widths whose scales are
    searched (quant.clipped), so that the writer encodes with the very scales the plan measured.
    `codes_out`: receives, for each quantized width, (codes as quant.quantize gives them, vectors ×
    long side int8; their float16 scales)."""
    M = np.asarray(M, dtype=np.float64)
    if not by_rows and M.shape[0] >= M.shape[1]:  # quant's layout: vectors along the long side
        M = M.T
    T = torch.from_numpy(M)
    S, L = T.shape
    ng = -(-L // group)
    if L % group:
        G = torch.zeros(S, ng * group, dtype=torch.float64)
        G[:, :L] = T
    else:
        G = T.contiguous()
    G = G.view(S, ng, group)
    maxabs = G.abs().amax(2).numpy() if G.numel() else np.zeros((S, ng))
    if not np.isfinite(maxabs).all():
        raise ValueError("cannot quantize non-finite values")
    out = torch.empty(len(widths), S, ng, group, dtype=torch.float64)
    for w, bits in enumerate(widths):
        quant.check_bits(bits)
        if bits == 16:
            if (maxabs > quant.FP16_MAX).any():
                raise ValueError("values overflow float16")
            out[w] = _fp16_values(G)
            continue
        chosen = quant.scales_for(G.numpy(), bits, maxabs)
        if scales_out is not None and quant.clipped(bits):
            scales_out[bits] = chosen
        scales = chosen.astype(np.float64)[:, :, None]
        if quant.is_codebook(bits):  # levels by quant's comparisons, then float32(c_u · scale)
            t = np.divide(G.numpy(), scales, out=np.zeros(G.shape), where=scales > 0)
            levels = quant.codebook_codes(t, bits)
            if codes_out is not None:
                codes_out[bits] = (levels.reshape(S, ng * group)[:, :L].astype(np.int8), chosen)
            out[w] = torch.from_numpy(quant.codebook_values(levels, scales, bits))
            continue
        top = quant.qmax(bits)
        # a zero scale has an all-zero group or values that round to 0 either way
        torch.div(G, torch.from_numpy(np.where(scales > 0, scales, 1.0)), out=out[w]).round_()
        if quant.clipped(bits) or ((scales > 0) & (scales < 2.0 ** -14)).any():
            # a clipped scale lets the largest values clamp; so can a subnormal fp16 scale (far below
            # max|x| / qmax), while a normal one is within 2^-11 of it (|x| / scale < qmax + 0.07)
            out[w].clamp_(-top, top)
        if codes_out is not None:
            codes_out[bits] = (out[w].view(S, ng * group)[:, :L].to(torch.int8).numpy(), chosen)
        out[w].mul_(torch.from_numpy(scales))
    return out.view(len(widths), S, ng * group)[:, :, :L]


def svd_factors(B: torch.Tensor, A: torch.Tensor, whitening: np.ndarray | None = None,
                max_rank: int | None = None, update: Update | None = None, recipe: bool = False):
    """(F1 out×K, F2 K×in, σ): the truncated SVD of B·A (of B·A·L with `whitening`, mapped back:
    F2 = √σ Vᵀ L⁻¹) with the singular values split evenly, columns/rows by decreasing σ; the
    rank-k optimum is the first k of them. K is the numerical rank (at least 1). `update`: the
    caller's Update(B, A·L) when it has one (its Gram products are then not formed again).
    `recipe`: also return the SvdRecipe that recomputes F1, F2 (None when whitened or when the
    factors needed Householder QR)."""
    if update is None:
        A64 = A.double()
        if whitening is not None:
            A64 = A64 @ torch.from_numpy(np.asarray(whitening, dtype=np.float64))
        update = Update(B, A64)
    upd = update
    s = upd.spectrum
    K = _numerical_rank(s)
    if max_rank is not None:
        K = min(K, max_rank)
    maps = upd.stack.vector_maps(K)
    if maps is None:  # Householder route
        U, V = upd.singular_vectors(K)
    else:
        U, V = torch.bmm(upd.stack.B, maps[0])[0], torch.bmm(maps[1], upd.stack.A)[0]
    root = np.sqrt(s[:K])
    F1, F2 = U.numpy() * root, root[:, None] * V.numpy()
    if whitening is not None:
        import scipy.linalg
        F2 = scipy.linalg.solve_triangular(np.asarray(whitening, dtype=np.float64).T, F2.T, lower=False).T
    if recipe:
        return F1, F2, s[:K], (None if maps is None or whitening is not None else SvdRecipe(*maps, s[:K]))
    return F1, F2, s[:K]


def _numerical_rank(s: np.ndarray) -> int:
    return max(int((s > (s[0] if s.size else 0.0) * 1e-12).sum()), 1)


def _transposed64(B: torch.Tensor) -> torch.Tensor:
    """Bᵀ as a contiguous float64 tensor: products along B's long side then read both operands
    along rows (MKL's double products run about twice as fast so)."""
    return torch.empty(B.shape[1], B.shape[0], dtype=torch.float64).copy_(B.detach().T)


@dataclass(frozen=True)
class SvdRecipe:
    """The truncated-SVD factors of one unwhitened module (svd outers) from its B and A without
    their Gram matrices and core SVD: F1ᵀ = M1 Bᵀ, F2 = M2 A with the maps of
    Updates.vector_maps, √σ folded in. The plan keeps it, so that the fit after allocation recomputes exactly
    the plan's factors (the same products) at a fraction of the cost."""

    M1: torch.Tensor  # 1×k×r
    M2: torch.Tensor  # 1×k×r
    spectrum: np.ndarray  # σ_1..σ_k
    # {bits: (scales of F1's k columns, of F2's k rows)}: the float16 group scales the plan searched
    # for these factors (quant.clipped widths), each vector's the same at any rank up to k
    scales: dict = field(default_factory=dict)
    # {bits: ((codes, scales) of F1's k columns, of F2's k rows)}: what the plan rounded them to, as
    # quant.quantize gives them; the writer packs these instead of recomputing and rounding the factors
    codes: dict = field(default_factory=dict)

    def encoded(self, bits, k: int, shape: tuple[int, int], group: int) -> tuple[bytes, list[np.ndarray]] | None:
        """quant.encode_many of the rank-k factors of an out×in module at `bits` from the kept codes;
        None where the plan kept none for them (or F2 is square and stored by columns)."""
        out_f, in_f = shape
        if not self.encodes(bits, k, in_f):
            return None
        found = self.codes[bits]
        parts, values = [], []
        for (q, s), mshape in zip(found, ((out_f, k), (k, in_f))):
            raw, val = quant.encode_codes(q[:k], s[:k], mshape, bits, group)
            parts.append(raw)
            values.append(val)
        return b"".join(parts), values

    def encodes(self, bits, k: int, in_features: int) -> bool:
        """Whether `encoded` has the codes of the rank-k factors at `bits`."""
        found = self.codes.get(bits)
        return found is not None and k <= len(found[0][0]) and k < in_features

    def only(self, bits, k: int) -> SvdRecipe:
        """This recipe with the codes of the rank-k factors at `bits` alone (copies: the rest is freed)."""
        kept = {bits: tuple((q[:k].copy(), s[:k].copy()) for q, s in self.codes[bits])} if bits in self.codes else {}
        return dataclasses.replace(self, codes=kept)

    def scales_at(self, bits, k: int, in_features: int) -> list[np.ndarray | None] | None:
        """The searched scales of the rank-k factors at `bits`, for quant.encode_many; None where
        the plan has none. At rank k = in_features F2 is square and its vectors are its columns:
        not the rows the plan rounded."""
        found = self.scales.get(bits)
        if found is None or k > len(found[0]):
            return None
        return [found[0][:k], found[1][:k] if k < in_features else None]

    @classmethod
    def of(cls, upd: Update, k: int) -> SvdRecipe | None:
        """The recipe of the first k factors; None where the factors needed Householder QR."""
        maps = upd.stack.vector_maps(k)
        if maps is None:
            return None
        root = torch.from_numpy(np.sqrt(upd.spectrum[:k]))  # √σ folded into the small maps
        return cls((maps[0] * root).transpose(1, 2).contiguous(), maps[1] * root[:, None], upd.spectrum[:k])

    def factors_t(self, Bt: torch.Tensor, A: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(F1ᵀ k×out, F2 k×in) from Bt = Bᵀ (contiguous float64) and A (float64)."""
        return torch.bmm(self.M1, Bt[None])[0].numpy(), torch.bmm(self.M2, A[None])[0].numpy()

    def factors(self, B: torch.Tensor, A: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(F1 out×k, F2 k×in) of the module's own factors B, A."""
        F1t, F2 = self.factors_t(_transposed64(B), A.detach().double())
        return F1t.T, F2


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
                whitening: np.ndarray | None = None, overhead: int = 0, input_rounding=None,
                exact_bits: tuple[int, ...] | None = None, max_k: int | None = None) -> Curve:
    """Options (k, bits) of one module. Without `outers` (svd): the stored factors are the
    truncated SVD factors F1 (out×k), F2 (k×in). With random `outers` (U, V): the stored factors
    are the inner X (a×k), Y (k×b). Each factor is quantized once per width: its groups run along
    its long side, within one column of F1 / X or one row of F2 / Y, so the quantized rank-k
    factors are the first k columns / rows of the quantized full ones. `input_rounding(F, bits,
    group)`: the decoded values stored for the input-side factor (F2 / Y), if not plain rounding;
    it must round rows independently (calibrated.input_rounding).

    `exact_bits`, `max_k` (svd only): compute the errors of those widths up to rank max_k and
    leave the other options pending with lower bounds (Curve), for an allocation that needs only
    the start of each curve. The curve keeps an SvdRecipe for the fit (unwhitened svd)."""
    return error_curves([CurveInput(name, B, A, scale, outers, whitening, overhead, input_rounding, exact_bits, max_k)],
                        bits=bits, group=group)[0]


@dataclass
class CurveInput:
    """One module for error_curves: error_curve's arguments but the widths and the group."""

    name: str
    B: torch.Tensor
    A: torch.Tensor
    scale: float
    outers: tuple[torch.Tensor, torch.Tensor] | None = None
    whitening: np.ndarray | None = None
    overhead: int = 0
    input_rounding: object = None
    exact_bits: tuple[int, ...] | None = None
    max_k: int | None = None


def error_curves(inputs: list[CurveInput], *, bits: tuple[int | str, ...], group: int,
                 keep_codes: Callable[[dict], dict | None] | None = None) -> list[Curve]:
    """error_curve of several modules, the same curves: their factors' vectors of equal length are
    rounded together, in one rounded_vectors call per length (and set of widths). Rounding is most of a curve's cost and is done in
    many short array operations; a few long ones waste less on each call's overhead and let
    threads planning other modules run beside them (each short call hands the interpreter lock
    over, which on a small machine costs about as much as the call).

    `keep_codes(codes)`: the codes of an unwhitened svd curve's rounded factors ({bits: ((codes,
    scales) of F1ᵀ, of F2)}, views of the window's arrays) as its recipe may keep them (copies), or
    None; the writer then packs them instead of rounding again."""
    preps = [_prepare(x, bits) for x in inputs]
    coded = keep_codes is not None
    P1, scales1, codes1 = _rounded_stacked([p.F1t for p in preps], [p.widths for p in preps], group, coded)
    P2, scales2, codes2 = _rounded_stacked([p.S2 if x.input_rounding is None else None for p, x in zip(preps, inputs)],
                                           [p.widths for p in preps], group, coded)
    errors = [_errors(p, x, group, p1, p2) for p, x, p1, p2 in zip(preps, inputs, P1, P2)]
    residual = iter(_residual_bounds([r for _, r in errors if r is not None]))
    out = []
    for p, x, (err2, r), s1, s2, c1, c2 in zip(preps, inputs, errors, scales1, scales2, codes1, codes2):
        codes = {b: (c1[b], c2[b]) for b in c1 if b in c2}
        kept = keep_codes(codes) if p.recipe is not None and codes else None
        out.append(_finish(p, x, bits, group, err2, r and next(residual), {b: (s1[b], s2[b]) for b in s1 if b in s2},
                           kept))
    return out


def _rounded_stacked(mats: list[np.ndarray | None], widths: list[tuple], group: int, with_codes: bool = False):
    """(rounded_vectors(M, w, group, by_rows=True) of each matrix (None: skipped), the searched
    scales of each ({bits: rows × groups}), with `with_codes` the codes of each ({bits: (codes,
    scales)})): matrices of equal row length and widths rounded in one call (rows
    round independently: the same values)."""
    out: list[torch.Tensor | None] = [None] * len(mats)
    scales: list[dict] = [{} for _ in mats]
    codes: list[dict] = [{} for _ in mats]
    batches: dict[tuple, list[int]] = {}
    for i, M in enumerate(mats):
        if M is not None:
            batches.setdefault((M.shape[1], widths[i]), []).append(i)
    for (_, w), idx in batches.items():
        found, coded = {}, {}
        R = rounded_vectors(np.concatenate([mats[i] for i in idx]) if len(idx) > 1 else mats[idx[0]], w, group,
                            by_rows=True, scales_out=found, codes_out=coded if with_codes else None)
        start = 0
        for i in idx:
            n = mats[i].shape[0]
            out[i] = R[:, start:start + n]
            scales[i] = {b: v[start:start + n] for b, v in found.items()}
            codes[i] = {b: (q[start:start + n], v[start:start + n]) for b, (q, v) in coded.items()}
            start += n
    return out, scales, codes


@dataclass
class _Prepared:
    """A module's factors before rounding (error_curves)."""

    F1t: np.ndarray  # output-side factor, transposed (k0 × out, or k0 × a for random outers)
    S2: np.ndarray  # input-side factor (k0 × in, or K × b; whole when the curve is)
    Bt: torch.Tensor
    upd: Update
    K: int
    k0: int
    recipe: SvdRecipe | None
    maps: tuple
    widths: tuple


def _prepare(x: CurveInput, bits: tuple) -> _Prepared:
    A64 = x.A.detach().double()
    L = None if x.whitening is None else torch.from_numpy(np.asarray(x.whitening, dtype=np.float64))
    if (x.exact_bits is not None or x.max_k is not None) and x.outers is not None:
        raise ValueError("partial curves are for svd outers")
    recipe = None
    if x.outers is None and L is None:
        Bt = _transposed64(x.B)
        upd = Update(Bt.T, A64)
        K = _numerical_rank(upd.spectrum)
        k0 = K if x.max_k is None else max(1, min(K, x.max_k))
        recipe = SvdRecipe.of(upd, k0)
        if recipe is not None:  # only the first k0 factors: the fit recomputes exactly these
            F1t, S2 = recipe.factors_t(Bt, A64)
            maps = None, None
    if recipe is None:
        B64 = x.B.detach().double()
        Aw = A64 if L is None else A64 @ L
        upd = Update(B64, Aw)
        Bt = B64.T
        if x.outers is None:  # whitened, or factors that needed Householder QR: the whole curve
            S1, S2, _ = svd_factors(B64, A64, x.whitening, update=upd)
            maps = None, L  # the stored factors themselves; F2 is seen through L
        else:
            U, V = x.outers
            Vw = V.double() if L is None else V.double() @ L  # Y multiplies V: its fit and error see V L
            S1, S2, _ = random_inner(B64, Aw, U, Vw)
            maps = U.double(), Vw
        F1t = S1.T
        K = k0 = S1.shape[1]
    widths = tuple(b for b in bits if x.exact_bits is None or b in x.exact_bits) or tuple(bits)
    # F1 / X is never wide (K <= its rows), its vectors are its columns; F2[:k] / Y[:k] is wide for
    # every k below its width, its vectors are its rows
    return _Prepared(F1t, S2, Bt, upd, K, k0, recipe, maps, widths)


def _errors(p: _Prepared, x: CurveInput, group: int, P1: torch.Tensor, P2: torch.Tensor | None):
    """(errors: widths × k0, unscaled; what _residual_bounds needs for the pending ranks of a partial
    curve, or None) from the rounded factors of each width as stacks (widths × k0 × long side) of
    P1 = F1ᵀ and P2 = F2 (None: by x.input_rounding)."""
    S2, Bt, upd, K, k0, maps, widths = p.S2, p.Bt, p.upd, p.K, p.k0, p.maps, p.widths
    energy = float(upd.energy)
    if P2 is None:
        P2 = torch.stack([torch.from_numpy(np.asarray(x.input_rounding(S2[:min(k0, S2.shape[1] - 1)], b, group),
                                                      dtype=np.float64)) for b in widths])
    if maps[0] is not None:
        P1 = (maps[0] @ P1.transpose(1, 2)).transpose(1, 2)  # (U X)ᵀ
    if maps[1] is not None:
        P2 = P2 @ maps[1]
    beyond = K - P2.shape[1] if x.input_rounding is None and maps[0] is None and maps[1] is None else 0
    err2 = _prefix_errors(energy, Bt, upd.A, P1[:, :P2.shape[1]].contiguous(), P2.contiguous(), blocks=beyond > 0)
    if beyond > 0:
        err2, blocks = err2
        return err2, (upd, err2[:, -1], blocks, beyond)
    if k0 == S2.shape[1]:  # at full rank a square F2 / Y is stored by columns
        if x.input_rounding is None:
            Q2 = rounded_vectors(S2, widths, group).transpose(1, 2)
        else:
            Q2 = torch.stack([torch.from_numpy(np.asarray(x.input_rounding(S2, b, group), dtype=np.float64))
                              for b in widths])
        if maps[1] is not None:
            Q2 = Q2 @ maps[1]
        err2 = np.concatenate([err2[:, :k0 - 1], _prefix_errors(energy, Bt, upd.A, P1.contiguous(),
                                                                Q2.contiguous())[:, k0 - 1:]], axis=1)
    return err2, None


def _finish(p: _Prepared, x: CurveInput, bits: tuple, group: int, err2: np.ndarray,
            residual: np.ndarray | None, scales: dict, codes: dict | None = None) -> Curve:
    """The curve from its computed errors (_errors), the residual bounds of its pending ranks and
    the scales its factors were rounded with (kept on the recipe, for the writer)."""
    F1t, S2, upd, K, k0, widths = p.F1t, p.S2, p.upd, p.K, p.k0, p.widths
    energy = float(upd.energy)
    s2 = x.scale * x.scale
    err2 = s2 * err2
    # below every rank-k error (Eckart–Young), with room for the computed errors' round-off
    tail = np.concatenate([np.cumsum((upd.spectrum ** 2)[::-1])[::-1][1:], [0.0]])
    floor = np.maximum(s2 * (tail * (1 - 1e-9) - 1e-12 * energy), 0.0)
    opts, pending = [], []
    for b in bits:
        sizes = _sizes((F1t.shape[1], S2.shape[1]), b, group, K)
        known = k0 if b in widths else 0
        if known:
            opts.extend(map(Option, range(1, known + 1), (b,) * known, sizes, err2[widths.index(b), :known].tolist()))
        lb = floor[known:K]
        if known and residual is not None:  # and above what the rows rounded so far already cost
            bound = s2 * residual[widths.index(b)]
            if K == S2.shape[1]:  # at rank K = in the square F2 is stored by columns: not those rows
                bound = np.concatenate([bound[:-1], [-np.inf]])
            lb = np.maximum(lb, bound)
        pending.extend(map(Option, range(known + 1, K + 1), (b,) * (K - known), sizes[known:], lb.tolist()))
    recipe = p.recipe and dataclasses.replace(p.recipe, scales=scales, codes=codes or {})
    return Curve(x.name, s2 * energy, opts, x.overhead, pending, recipe)


@functools.lru_cache(maxsize=256)
def _sizes(shape: tuple[int, int], bits, group: int, K: int) -> tuple[int, ...]:
    """Data bytes of rank-k factors of an out×in module, k = 1..K."""
    out_f, in_f = shape
    return tuple(quant.nbytes((out_f, k), bits, group) + quant.nbytes((k, in_f), bits, group) for k in range(1, K + 1))


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
    most error per byte next (a heap keyed on that gain, ties to the earlier module). A module
    whose next step is not certain (a partial curve) queues a bound instead (_next_step_bound): the
    largest gain its next step could have, and the fewest bytes it could take. When the walk comes
    to that bound the caller either knows the step cannot fit (nor could the true one, later in the
    walk with fewer bytes left) or lists the module in `requests`, to be computed further."""

    def __init__(self, curves: list[Curve], fixed: int, balance: float = 1.0):
        self.curves, self.pos, self.heap, self.requests = curves, [0] * len(curves), [], []
        # each module's error counts E^(balance - 1) times (module docstring)
        self.weight = [c.energy ** (balance - 1.0) if balance != 1.0 and c.energy > 0 else 1.0 for c in curves]
        self.energy = sum(c.energy for c in curves)
        self.nbytes = fixed + sum(c.overhead + c.hull[0].nbytes for c in curves)
        self.err2 = sum(c.hull[0].err2 for c in curves)
        for i in range(len(curves)):
            self._push(i)

    def _push(self, i: int) -> None:
        c = self.curves[i]
        h, j = c.hull, self.pos[i]
        if j >= c.certain:
            bound = _next_step_bound(c, j, self.weight[i]) if c.pending else None
            if bound is not None:
                heapq.heappush(self.heap, (-bound[0], i, bound[1]))
            return
        heapq.heappush(self.heap, (-_gain(self.weight[i], h[j], h[j + 1]), i, 0))

    def next_step(self) -> tuple[int, int, bool] | None:
        """(module, extra bytes, exact) of the best step left, removed from the queue; None when
        done. Not exact: a pending step's bound, with the fewest extra bytes it could take."""
        if not self.heap:
            return None
        _, i, least = heapq.heappop(self.heap)
        if least:
            return i, least, False
        h, j = self.curves[i].hull, self.pos[i]
        return i, h[j + 1].nbytes - h[j].nbytes, True

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


def _gain(weight: float, a: Option, b: Option) -> float:
    """The weighted error saved per byte from option a to option b: one formula (and rounding)
    for the walk's steps and for the bounds on them."""
    return weight * (a.err2 - b.err2) / max(b.nbytes - a.nbytes, 1)


def _next_step_bound(c: Curve, j: int, weight: float) -> tuple[float, int] | None:
    """(gain, extra bytes): an upper bound on the weighted error saved per byte by the step after
    hull option j of the complete curve, and the fewest bytes any option beyond j takes more; None
    when no option could lower the error. The step goes to some option with more bytes, whose
    error is at least its computed value or pending bound. Each gain is _gain, rounded as the
    step's own, so that the bound is not an ulp below the step it bounds."""
    h = c.hull[j]
    gain, least = 0.0, None
    for o in (*c.options, *c.pending):
        extra = o.nbytes - h.nbytes
        if extra > 0:
            gain = max(gain, _gain(weight, h, o))
            least = extra if least is None else min(least, extra)
    return (gain, least) if gain > 0 else None


def _completed(curves: list[Curve], complete, needed: list[int]) -> list[Curve]:
    """`curves` with those at `needed` computed further by `complete` (more options exact)."""
    if complete is None:
        raise ValueError(f"curve {curves[needed[0]].name!r} is partial and there is no way to complete it")
    out = list(curves)
    for i, c in zip(needed, complete([curves[i] for i in needed])):
        if not c.complete and len(c.options) <= len(curves[i].options):
            raise ValueError(f"curve {c.name!r} came back no further")
        out[i] = c
    return out


def allocate(curves: list[Curve], budget: int | None = None, min_fidelity: float | None = None,
             fixed: int = 0, complete=None, balance: float = 1.0) -> Allocation:
    """One option per module: the least total error within `budget` bytes (all of the file:
    `fixed` + per-module overheads + data), or the fewest bytes reaching `min_fidelity`, or
    both (the budget's allocation, which must reach the fidelity). Raises BudgetError. With
    `balance` < 1 each module's error is weighed by energy^(balance − 1) (BALANCE).

    Partial curves: `complete(curves) -> curves` computes further (more options exact, complete at
    last) the curves of the modules whose certain steps the walk leaves, and the walk starts again;
    the result is the allocation of the complete curves (each step taken is one they have)."""
    curves = list(curves)
    while True:
        needed = [i for i, c in enumerate(curves) if c.certain < 0]
        if needed:
            curves = _completed(curves, complete, needed)
            continue
        g = _Greedy(curves, fixed, balance)
        if budget is not None and g.nbytes > budget:
            raise BudgetError(f"the smallest file this adapter allows is {g.nbytes:,} bytes (fidelity "
                              f"{g.fidelity():.4f}), over the budget of {budget:,} bytes", g.allocation())
        target = None if min_fidelity is None else (1.0 - min_fidelity) * g.energy
        while (step := g.next_step()) is not None:
            if budget is None and g.err2 <= target:
                break
            i, extra, exact = step
            if budget is not None and g.nbytes + extra > budget:
                continue  # this module's later steps cost more still; other modules' may fit
            if not exact:  # a pending step the walk reaches: compute the module further
                g.requests.append(i)
                continue
            g.take(i)
        if not g.requests:
            break
        curves = _completed(curves, complete, sorted(set(g.requests)))
    best = g.allocation()
    if target is not None and best.err2 > target * (1 + 1e-9):
        within = f" within {budget:,} bytes" if budget is not None else ""
        raise BudgetError(f"fidelity {min_fidelity:.4g} is out of reach{within}: the best is "
                          f"{best.fidelity:.4f} at {best.nbytes:,} bytes", best)
    return best


def frontier(curves: list[Curve], fixed: int = 0, complete=None, balance: float = 1.0) -> list[tuple[int, float]]:
    """The whole greedy path as (total bytes, fidelity) points, smallest file first (`balance`:
    as allocate's)."""
    while partial := [i for i, c in enumerate(curves) if not c.complete]:
        curves = _completed(curves, complete, partial)
    g = _Greedy(curves, fixed, balance)
    points = [(g.nbytes, g.fidelity())]
    while (step := g.next_step()) is not None:
        g.take(step[0])
        points.append((g.nbytes, g.fidelity()))
    return points
