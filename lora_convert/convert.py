"""compress / reconstruct / compare: the operations between Adapter and MiniAdapter.

All of them are lazy: nothing is computed until a writer or a report iterates the
modules, and then one module (compress: one window of WINDOW modules, same-shaped ones
fitted as a stack) is held at a time per worker.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import budget, calibrated, outer, quant
from .adapter import Adapter, LoraModule, lora_scale, ordered_map
from .budget import Option
from .config import CompressConfig
from .container import (DTYPES, MiniAdapter, MiniModule, SizePlan, entry_field_bytes, module_spec,
                        quantized_parts, short_figure)
from .errors import BadInputError
from .lru import BytesLRU
from .mathcore import (OuterBasis, Update, Updates, choose_rank, difference_norm, fit_projected_stack,
                       mini_difference_norms, relative, scaled_relative_error)
from .outer import random as random_outer
from .report import FidelityReport, ModuleFidelity
from .st import dtype_name


def one_thread(fn):
    """Run `fn` with torch limited to one intra-op thread in the calling thread (restored after).

    Per-module math is many small LAPACK/BLAS calls on rank-wide factors: extra threads gain
    little there, and on a busy machine every OpenMP region waits for a descheduled thread
    (benchmarks/README.md: compress 10-30x slower with 2 threads on a loaded 2-core machine).
    Parallelism comes from working on several modules at once instead (`workers`). The
    OpenMP thread count is per thread, so concurrent callers do not disturb each other.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


def workers() -> int:
    """Modules processed concurrently: LORA_CONVERT_WORKERS, else min(4, CPUs)."""
    try:
        n = int(os.environ.get("LORA_CONVERT_WORKERS", "0"))
    except ValueError:
        n = 0
    return n if n > 0 else min(4, os.cpu_count() or 1)


def _storage_dtype(dtype: str, source: torch.dtype) -> torch.dtype:
    if dtype == "auto":
        return source if source in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise BadInputError(f"unknown dtype {dtype!r} (choose from auto, {', '.join(DTYPES)})") from None


# Bases of shared (random) outers, keyed by fingerprint: one per distinct outer, not per module.
_BASES = BytesLRU(96 << 20, size=lambda b: b.nbytes)

# Modules fitted together: same-shaped modules among this many consecutive ones are stacked, so
# their tall products are a few large BLAS calls and their small algebra one numpy call each.
WINDOW = 16
# ... and at most this many bytes of float64 factors per stack: larger stacks gain little and
# every byte of them is held per worker thread (peak RSS) and falls out of the cache.
STACK_BYTES = 8 << 20
_SCRATCH = threading.local()  # per thread: float64 stacks reused from window to window
_SCRATCH_MAX = 48 << 20  # bytes kept between windows per thread and role; larger stacks are freed


def _shared_basis(role: str, digest: str, M: torch.Tensor) -> OuterBasis:
    return _BASES.get((role, digest), lambda: OuterBasis(M))


def _scratch(role: str, shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float64 tensor from this thread's reusable buffer for `role`: fresh
    buffers of this size page-fault in on every window, which costs as much as the work."""
    numel = math.prod(shape)
    buf = getattr(_SCRATCH, role, None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=torch.float64)
        if numel * 8 <= _SCRATCH_MAX:
            setattr(_SCRATCH, role, buf)
    return buf[:numel].view(shape)


def _widen(role: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors stacked as float64 in this thread's scratch buffer for `role`."""
    out = _scratch(role, (len(tensors), *tensors[0].shape))
    for dst, t in zip(out, tensors):
        dst.copy_(t)
    return out


def compress_module(m: LoraModule, source: str = "random", **options) -> MiniModule:
    """Fit one module's inner matrices for the chosen outers and record its fidelity
    (compress_window for one module; options as for compress)."""
    return compress_window([m], source, **options)[0]


@one_thread
def compress_window(modules: list[LoraModule], source: str | CompressConfig = "random", *,
                    plan: dict[str, Planned] | None = None, calibration=None, **options) -> list[MiniModule]:
    """compress_module for each of `modules`, in order; same-shaped ones are fitted as a stack.
    `source` is an outer source name (with CompressConfig fields as `options`) or a config;
    `plan` gives quantized modules their (rank, bits) (budgets). Modules with `calibration`
    statistics are fitted one at a time to their output (see calibrated)."""
    if isinstance(source, str) and outer.get(source).stored:
        options.pop("outer_dim", None)  # per-module calls pass one set of options to every source
    cfg = _config(source, options)
    src = outer.get(cfg.outer)
    opts = _outer_options(cfg)
    if cfg.quantized:
        # a byte budget planned by weight-space error spends no header bytes on the calibrated figure
        figure = plan is None or calibrated.allocation_metric(cfg.min_fidelity is not None) != "weight"
        out = []
        for m in modules:
            stats = calibration.get(m.name) if calibration else None
            choice = (plan or {}).get(m.name)
            out.append(_compress_quantized(m, src, cfg, opts, choice) if stats is None else
                       calibrated.compress_quantized(m, src, opts, cfg.bits, cfg.group_size, stats.factor(), choice,
                                                     figure=figure))
        return out
    shapes: dict[tuple, list[int]] = {}
    done: dict[int, MiniModule] = {}
    for i, m in enumerate(modules):
        stats = calibration.get(m.name) if calibration else None
        if stats is not None:
            done[i] = calibrated.compress_module(m, src, opts, _storage_dtype(cfg.dtype, m.dtype), stats.factor())
            continue
        shapes.setdefault((tuple(m.up.shape), tuple(m.down.shape), m.dtype), []).append(i)
    for idx in shapes.values():
        m = modules[idx[0]]
        per_stack = max(1, STACK_BYTES // (8 * m.rank * (m.out_features + m.in_features)))
        per_stack = min(per_stack, src.stack_size(opts) or per_stack)
        for start in range(0, len(idx), per_stack):
            part = idx[start:start + per_stack]
            done.update(zip(part, _compress_stack([modules[i] for i in part], src, opts, cfg.dtype)))
    return [done[i] for i in range(len(modules))]


def _config(source, options: dict) -> CompressConfig:
    if isinstance(source, CompressConfig):
        return source.replace(**options) if options else source
    return CompressConfig(outer=source, **options)


def _outer_options(cfg: CompressConfig) -> dict:
    """What outer sources read (outer/__init__.py): the options dict of their interface."""
    return {"seed": cfg.seed, "outer_dim": cfg.outer_dim, "rank": cfg.rank, "keep_energy": cfg.keep_energy,
            "stream": cfg.outer_stream}


def _stored_factors(m: LoraModule, src, opts: dict):
    """(F1, F2, σ, energy, outers): the full-rank factors a quantized module stores prefixes of
    (svd: the truncated-SVD factors; random: the inner matrices for the regenerated outers U, V),
    float64 numpy, and ||B A||²_F."""
    B, A = m.up.double(), m.down.double()
    upd = Update(B, A)
    energy = float(upd.energy)
    if src.stored:
        F1, F2, s = budget.svd_factors(B, A, update=upd)
        return F1, F2, s, energy, None
    U, V, spec = src.make(m, opts)
    X, Y, s = budget.random_inner(B, A, U, V)
    return X, Y, s, energy, (U, V, spec)


@dataclass(frozen=True)
class Planned:
    """A budget's choice for one module, with the fidelity figures its file entry records (the
    plan's, so that the header is exactly as long as the plan counted)."""

    k: int
    bits: int | str
    rel_error: float
    energy: float
    factors: budget.SvdRecipe | None = None  # the plan's svd factors, recomputed from B and A alone
    # the module without its factors (meta tensors) where `factors` keeps the codes of this choice:
    # the writer packs those and never reads the module
    head: LoraModule | None = None


def _compress_quantized(m: LoraModule, src, cfg: CompressConfig, opts: dict, choice: Planned | None) -> MiniModule:
    """One module stored quantized (container: packed bytes): rank and bits from the budget's
    plan, else --rank / --keep-energy and --bits."""
    kept = choice is not None and choice.factors is not None and choice.factors.encoded(
        choice.bits, choice.k, (m.out_features, m.in_features), cfg.group_size)
    if kept:  # the plan's codes of these very factors
        (blob, (Q1, Q2)), outers, bits = kept, None, choice.bits
    else:
        if choice is not None and choice.factors is not None:  # the plan's factors, without a second SVD
            F1, F2 = choice.factors.factors(m.up, m.down)
            outers = None
        else:
            F1, F2, s, energy, outers = _stored_factors(m, src, opts)
        if choice is not None:
            k, bits = min(choice.k, F1.shape[1]), choice.bits
        else:
            k, bits = max(min(choose_rank(s, energy, cfg.rank, cfg.keep_energy), F1.shape[1]), 1), cfg.bits
        # the plan's factors come with the scales it searched for them: the same ones, not searched again
        given = choice.factors.scales_at(bits, k, F2.shape[1]) if choice is not None and choice.factors else None
        try:  # encoded now, so that save writes these bytes instead of encoding the values again
            blob, (Q1, Q2) = quant.encode_many([F1[:, :k], F2[:k]], bits, cfg.group_size, given)
        except ValueError as exc:
            raise BadInputError(f"module {m.name!r}: cannot store its factors as {quant.width_name(bits)} "
                                f"({exc})") from None
    U, V, X, Y, spec = quantized_parts(torch.from_numpy(Q1), torch.from_numpy(Q2), outers, src.name)
    if choice is not None:  # the plan's error is that of these very codes (budget.error_curve)
        fidelity = {"rel_error": choice.rel_error, "energy": choice.energy}
    else:
        diff = difference_norm(m.up.double(), m.down.double(), U.double() @ X.double(), Y.double() @ V.double())
        ref = energy ** 0.5
        rel = diff / ref if ref else (0.0 if diff == 0.0 else float("inf"))
        fidelity = {"rel_error": short_figure(rel), "energy": short_figure(m.scale**2 * energy)}
    return MiniModule(name=m.name, kind=m.kind, kernel=m.kernel, rank=m.rank, alpha=m.alpha, use_rslora=m.use_rslora,
                      dtype=dtype_name(m.dtype), outer=dict(spec), U=U, V=V, X=X, Y=Y, fidelity=fidelity,
                      quant={"bits": bits, "group": cfg.group_size}).remember_blob(blob)


def _planned_fidelity(err2: float, energy: float) -> tuple[float, float]:
    """(rel_error, energy) as a planned module's entry records them (plan_curves counts their
    bytes the same way)."""
    rel = (err2 * (1.0 / energy)) ** 0.5 if energy > 0 else 0.0
    return short_figure(rel), short_figure(energy)


def _compress_stack(ms: list[LoraModule], src, options: dict, dtype: str) -> list[MiniModule]:
    """Same-shaped modules, fitted together. Everything is float64 from the factors and reuses
    one set of products: BᵀB and AAᵀ (energy, SVD outers), UᵀB and AVᵀ (fit and error), UᵀU
    and VVᵀ (cached for shared outers). The error reported is that of the values written: U,
    V, X, Y as stored."""
    store = _storage_dtype(dtype, ms[0].dtype)
    # B is held transposed (n×r×out, contiguous): UᵀB of the whole stack is then one product
    Bt = _widen("B", [m.up.T for m in ms])
    upd = Updates(Bt.transpose(1, 2), _widen("A", [m.down for m in ms]))
    U, V, specs = src.make_stack(ms, options, upd, scratch=_scratch)
    fit = _fit_stored(src, upd, U, V, specs, store) if src.stored else _fit_shared(upd, U, V, specs, options)
    Xs, Ys = torch.from_numpy(fit.X).to(store), torch.from_numpy(fit.Y).to(store)
    Xd, Yd = Xs.double().numpy(), Ys.double().numpy()
    _check_finite(ms, store, fit.X, fit.Y, Xd, Yd)
    diffs = mini_difference_norms(upd, fit.UtB, fit.AVt, fit.GU, fit.GV, Xd, Yd)
    out = []
    for i, (m, k, spec) in enumerate(zip(ms, fit.ks, specs)):
        diff = float(diffs[i])
        if diff != diff:  # too close to exact for the Gram formula: QR of the stacked factors
            U64, V64 = fit.outers64(i)
            diff = difference_norm(upd.B[i], upd.A[i], U64 @ torch.from_numpy(Xd[i]), torch.from_numpy(Yd[i]) @ V64)
        ref = float(upd.energy[i]) ** 0.5
        rel = relative(diff, ref)
        a, b = spec["a"], spec["b"]  # stored outers are only as wide as their own module's rank
        Ui, Vi = (fit.U[i, :, :a].contiguous(), fit.V[i, :b].contiguous()) if src.stored else (fit.U, fit.V)
        out.append(MiniModule(name=m.name, kind=m.kind, kernel=m.kernel, rank=m.rank, alpha=m.alpha,
                              use_rslora=m.use_rslora, dtype=dtype_name(m.dtype), outer=spec,
                              U=Ui, V=Vi, X=Xs[i, :a, :k].contiguous(), Y=Ys[i, :k, :b].contiguous(),
                              fidelity={"rel_error": rel, "energy": m.scale**2 * float(upd.energy[i])}))
    return out


@dataclass
class _StackFit:
    """Inner matrices of a stack for its outers as written, and the products the error needs."""

    U: torch.Tensor  # outers as written: shared (2-D) or per module (3-D, storage dtype)
    V: torch.Tensor
    X: np.ndarray  # n×a×kmax float64, zero-padded beyond each module's rank ks[i]
    Y: np.ndarray  # n×kmax×b
    ks: list[int]
    UtB: np.ndarray  # Uᵀ B (n×a×r) and A Vᵀ (n×r×b) of the outers as written, float64
    AVt: np.ndarray
    GU: np.ndarray  # UᵀU and VVᵀ: a×a, b×b when shared, else stacked
    GV: np.ndarray
    outers64: Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # module i's (U, V) as float64


def _fit_stored(src, upd: Updates, U: torch.Tensor, V: torch.Tensor, specs: list[dict], store) -> _StackFit:
    """Outers stored per module: rounded to the storage dtype first, then everything is computed
    with the rounded values (widened back into the same float64 buffers)."""
    U64, V64 = U, V
    U, V = U.to(store), V.to(store)
    U64.copy_(U), V64.copy_(V)
    ks = [s["a"] for s in specs]
    X, Y = src.inner_stack(upd, ks)
    return _StackFit(U, V, X, Y, ks, UtB=torch.bmm(U64.transpose(1, 2), upd.B).numpy(),
                     AVt=torch.bmm(upd.A, V64.transpose(1, 2)).numpy(),
                     GU=torch.bmm(U64.transpose(1, 2), U64).numpy(), GV=torch.bmm(V64, V64.transpose(1, 2)).numpy(),
                     outers64=lambda i: (U64[i], V64[i]))


def _fit_shared(upd: Updates, U: torch.Tensor, V: torch.Tensor, specs: list[dict], options: dict) -> _StackFit:
    """One pair of outers for the whole stack: UᵀB and AVᵀ are one large product each."""
    if not random_outer.per_module(options):  # the same outers come back in later stacks
        ub, vb = _shared_basis("U", specs[0]["u_sha256"], U), _shared_basis("V", specs[0]["v_sha256"], V.T)
    else:
        ub, vb = OuterBasis(U), OuterBasis(V.T)
    n, r = upd.A.shape[:2]
    UtB = (upd.B.transpose(1, 2).reshape(n * r, -1) @ ub.m).reshape(n, r, -1).numpy().swapaxes(1, 2)
    AVt = (upd.A.reshape(n * r, -1) @ vb.m).reshape(n, r, -1).numpy()
    fits = fit_projected_stack(upd, ub, vb, UtB, AVt, rank=options["rank"], keep_energy=options["keep_energy"])
    ks = [max(f.rank, 1) for f in fits]  # an all-zero update keeps one zero direction: shapes stay valid
    X, Y = _padded([f.X for f in fits], max(ks), 1), _padded([f.Y for f in fits], max(ks), 0)
    return _StackFit(U, V, X, Y, ks, UtB, AVt, ub.gram, vb.gram, outers64=lambda i: (ub.m, vb.m.T))


def _padded(mats: list[torch.Tensor], k: int, dim: int) -> np.ndarray:
    """Stack of inner matrices zero-padded to k along `dim` (zero columns of X / rows of Y add
    nothing to U X Y V)."""
    shape = list(mats[0].shape)
    shape[dim] = k
    out = np.zeros((len(mats), *shape))
    for dst, t in zip(out, mats):
        dst[tuple(slice(0, s) for s in t.shape)] = t.numpy()
    return out


def _check_finite(ms, store, X, Y, Xd, Yd) -> None:
    ok = np.isfinite(Xd).all((1, 2)) & np.isfinite(Yd).all((1, 2))
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise BadInputError(f"module {ms[i].name!r}: the inner matrices overflow {dtype_name(store)} (largest |X|, |Y|: "
                            f"{max(np.abs(X[i]).max(), np.abs(Y[i]).max()):.3g}); the outers are ill-conditioned for "
                            "this module: store them as fp32 (--dtype fp32) or choose another --seed / --outer-dim")


def compress(adapter: Adapter, outer: str | CompressConfig = "random", *, calibration=None,
             output: str | os.PathLike | None = None,
             **options) -> MiniAdapter:
    """LoRA-Mini form of `adapter` (lazy: modules are fitted when iterated or saved).

    `outer` is the outer source ("random" or "svd") with CompressConfig fields as keywords, or a
    CompressConfig (keywords then override its fields). With target_size / min_fidelity every
    module's error curve is computed first (one pass over the adapter) and rank and bits are
    allocated across modules; a budget that cannot be met raises BudgetError naming the best.

    `outer_stream` (random outers): "shared" keys the generator on the seed alone, so modules
    of one shape share U and V; "module" keys it on each module's name as well. `output`: where
    the result will be saved; a budget counts the directory layout's summary file unless it is
    a ``.safetensors`` file.
    `calibration`: {module name: statistics with .factor()} (recovery.calibration.collect_input_stats):
    those modules minimise their output error on the calibration data instead of the weight error.

    >>> import lora_convert as lc                                    # doctest: +SKIP
    >>> mini = lc.compress(lc.load_adapter("fixtures/peft-tiny-llama"), outer="random", seed=7)
    >>> report = lc.save(mini, "mini")
    >>> small = lc.compress(adapter, "svd", target_size="32x")       # rank and bits per module
    """
    cfg = _config(outer, options)
    calibrated.check_modules(adapter, calibration)
    original = source_bytes(adapter.source)
    plan, max_bytes = None, None
    if cfg.budgeted:
        max_bytes = cfg.budget_bytes(original)
        directory = output is None or Path(output).suffix != ".safetensors"
        curves, fixed, complete, heads = _plan(adapter, cfg, max_bytes,
                                               calibrated_whitening(adapter, calibration, cfg.min_fidelity is not None),
                                               directory, partial=True)
        factors = {c.name: c.factors for c in curves}

        def completed(partial: list[budget.Curve]) -> list[budget.Curve]:
            done = complete(partial)
            factors.update((c.name, c.factors) for c in done)  # their factors reach every rank now
            return done

        try:
            choice = budget.allocate(curves, max_bytes, cfg.min_fidelity, fixed, complete=completed,
                                     balance=budget.balance_for(cfg.min_fidelity)).choice
        except budget.BudgetError as exc:
            raise BudgetError(str(exc), adapter.source or None, exc.best) from None
        energy = {c.name: c.energy for c in curves}
        plan = {}
        for name, o in choice.items():
            recipe = factors[name] and factors[name].only(o.bits, o.k)  # the other codes are freed
            ready = recipe is not None and recipe.encodes(o.bits, o.k, heads[name].in_features)
            plan[name] = Planned(o.k, o.bits, *_planned_fidelity(o.err2, energy[name]), recipe,
                                 heads[name] if ready else None)
        del curves, factors, heads

    @one_thread  # reading the factors too
    def load_window(names: list[str]) -> list[MiniModule]:
        try:  # a module whose plan kept its codes is written from them, without reading its factors
            return compress_window([plan[n].head if plan and plan[n].head else adapter.module(n) for n in names],
                                   cfg, plan=plan, calibration=calibration)
        except BadInputError as exc:
            if exc.path is None:  # compress_window's own refusals: name the adapter
                raise BadInputError(exc.problem, adapter.source or None) from None
            raise

    return MiniAdapter(source_format=adapter.format, module_names=list(adapter.module_names),
                       load_module=lambda name: load_window([name])[0], load_window=load_window,
                       # per-module outers share nothing within a window, and each module holds its own
                       window=1 if cfg.outer_stream == "module" else WINDOW,
                       source_config=adapter.config, source_metadata=adapter.metadata,
                       passthrough_names=list(adapter.passthrough_names), load_passthrough=adapter.load_passthrough,
                       original_bytes=original, source=adapter.source, workers=workers(), max_bytes=max_bytes)


class BudgetError(BadInputError):
    """compress: no allocation meets --target-size / --min-fidelity; `best` is the closest one."""

    def __init__(self, message: str, path=None, best: budget.Allocation | None = None):
        super().__init__(message, path)
        self.best = best


def plan_curves(adapter: Adapter, cfg: CompressConfig, max_bytes: int | None = None,
                whitening: Callable[[str], torch.Tensor | None] | None = None,
                directory: bool = True, floor: bool = False) -> tuple[list[budget.Curve], int]:
    """Every module's (rank, bits) error curve (modules on `workers()` threads), each option's
    bytes counting its entry in the header, and the bytes of the file that do not depend on the
    choice (container.SizePlan; `directory`: the summary file of the directory layout too).
    `whitening(name)`: the module's input whitening factor L (calibrated_whitening), or None; the
    curves are then in the metric of calibrated.allocation_metric (`floor`: curves for a floor on the
    calibrated share, as cfg.min_fidelity asks too)."""
    curves, fixed, _, _ = _plan(adapter, cfg, max_bytes, whitening, directory, floor=floor)
    return curves, fixed


# A partial plan (compress with a byte budget) first computes the widths up to this many bits ...
PARTIAL_BITS = 4
# ... up to rank PARTIAL_SPAN·k + PARTIAL_EXTRA, k the rank a module of the adapter's precision
# keeps at 4 bits in its share of the budget; every other option waits, with a lower bound, until
# the allocation reaches it (budget.Curve), and a module it reaches is computed again to about
# twice that rank, then whole.
PARTIAL_SPAN = 2
PARTIAL_EXTRA = 2
# Modules planned together (budget.error_curves): about a layer of a transformer, fewer when the
# workers would otherwise idle
PLAN_WINDOW = 8
# A budgeted plan keeps the codes it rounded each module's factors to, up to this many bytes in
# all, so that the writer packs them instead of reading and rounding the module again
CODES_BYTES = 64 << 20


@one_thread
def _plan(adapter: Adapter, cfg: CompressConfig, max_bytes: int | None,
          whitening: Callable[[str], torch.Tensor | None] | None, directory: bool = True, partial: bool = False,
          floor: bool = False):
    """plan_curves, and a function completing partial curves. `partial` (with a byte budget, svd
    outers, no calibration): each module's curve starts partial (PARTIAL_BITS, PARTIAL_SPAN)."""
    src = outer.get(cfg.outer)
    opts = _outer_options(cfg)
    metric = calibrated.allocation_metric(floor or cfg.min_fidelity is not None)
    original = source_bytes(adapter.source)
    ratio = original / max_bytes if partial and original and max_bytes and src.stored and whitening is None else None

    low = tuple(b for b in cfg.allowed_bits if quant.code_bits(b) <= PARTIAL_BITS)
    heads: dict[str, LoraModule] = {}
    arena = _Arena(CODES_BYTES)

    def keep_codes(codes: dict) -> dict | None:
        """The codes of a curve's rounded factors copied into the arena, or None once it is full."""
        flat = [a for pair in codes.values() for qs in pair for a in qs]
        kept = arena.take(flat)
        if kept is None:
            return None
        it = iter(kept)
        return {b: tuple((next(it), next(it)) for _ in pair) for b, pair in codes.items()}

    def extent(m: LoraModule, K: int, known: int = 0) -> dict:
        """error_curve's exact_bits / max_k for a partial curve of module m (numerical rank K), or
        {} for the whole curve; `known`: the rank its partial curve reaches (it is computed further)."""
        if known:
            max_k = 2 * known + PARTIAL_EXTRA
        else:
            share = m.rank * m.up.element_size() / ((PARTIAL_BITS + 16 / cfg.group_size) / 8 * ratio)
            max_k = math.ceil(PARTIAL_SPAN * share) + PARTIAL_EXTRA
        # a curve that would reach every rank anyway is computed whole: the wider codes cost little
        # next to the 3-4 bit ones, and such budgets tend to want them (a partial curve would be
        # computed again, whole, as soon as the allocation reached for one)
        return {"exact_bits": low, "max_k": max_k} if low and max_k < K else {}

    def prepared(name: str, known: int | None, whole: bool = False) -> tuple[budget.CurveInput, dict, torch.Tensor | None]:
        """Module `name`'s curve input (partial as `extent` says; `known`: the rank its partial curve
        reached, None: start; whole without a budget ratio or with `whole`), its spec and its
        whitening factor."""
        m = adapter.module(name)
        heads[name] = _head(m)
        outers = None
        if not src.stored:
            U, V, ospec = src.make(m, opts)
            outers = (U, V)
        else:
            ospec = {"source": src.name, "a": 1, "b": 1}
        L = whitening(name) if whitening else None
        fidelity = {}
        if L is not None:
            calibrated.check_width(m, L)
        if L is None or metric == "weight":  # weight-space curve (calibrated: the writer fits it to outputs)
            part = extent(m, min(m.rank, m.out_features, m.in_features), known or 0) if ratio and not whole else {}
            x = budget.CurveInput(name, m.up, m.down, m.scale, outers, **part)
        else:  # output-space errors, input-side factor rounded with error feedback (calibrated.py)
            x = budget.CurveInput(name, m.up, m.down, m.scale, outers, whitening=L.numpy(),
                                  input_rounding=calibrated.input_rounding(L, outers and outers[1]))
            fidelity = calibrated.PLANNED_FIDELITY  # its entry's extra figure, at its longest
        spec = module_spec(m.kind, m.kernel, m.rank, m.alpha, m.use_rslora, dtype_name(m.dtype), m.out_features,
                           m.in_features, 1, ospec, dict(fidelity),
                           {"bits": cfg.allowed_bits[-1], "group": cfg.group_size})
        return x, spec, L

    def bad_module(name: str, exc: ValueError) -> BadInputError:
        return BadInputError(f"module {name!r}: {exc}", adapter.source or None)

    def window_curves(names: list[str], known: dict[str, int] | None,
                      whole: frozenset) -> list[tuple[budget.Curve, dict, bool]]:
        """curves' work for one window; error_curves' ValueError passes through."""
        inputs, specs, Ls = [], [], []
        for name in names:
            try:
                x, spec, L = prepared(name, known and known[name], name in whole)
            except ValueError as exc:
                raise bad_module(name, exc) from None
            inputs.append(x)
            specs.append(spec)
            Ls.append(L)
        out = budget.error_curves(inputs, bits=cfg.allowed_bits, group=cfg.group_size,
                                  keep_codes=keep_codes if ratio and not arena.full else None)
        for i, (c, x, L) in enumerate(zip(out, inputs, Ls)):
            if x.input_rounding is not None:
                out[i] = calibrated.reweighted(c, x.scale ** 2 * float(Update(x.B, x.A).energy), metric)
        return [(c, spec, L is not None) for c, spec, L in zip(out, specs, Ls)]

    @one_thread
    def curves(names: list[str], known: dict[str, int] | None = None,
               whole: frozenset = frozenset()) -> list[tuple[budget.Curve, dict, bool]]:
        """The curves of a window of modules (error_curves rounds their factors together); `known`,
        `whole`: as prepared's, by name. (Not recursive: a closure that refers to itself lives in a
        reference cycle, and would keep the plan's code buffer until the cycle collector ran.)"""
        try:
            return window_curves(names, known, whole)
        except ValueError as exc:
            if len(names) == 1:
                raise bad_module(names[0], exc) from None
        out = []
        for name in names:  # one module's: find and name it
            try:
                out.extend(window_curves([name], known, whole))
            except ValueError as exc:
                raise bad_module(name, exc) from None
        return out

    def windows(names: list[str]) -> list[list[str]]:
        size = max(1, min(PLAN_WINDOW, math.ceil(len(names) / workers())))
        return [names[i:i + size] for i in range(0, len(names), size)]

    raw, specs, whitened = [], {}, set()
    # every window may finish ahead of the caller: their curves are kept anyway, and windows of
    # unequal cost would otherwise leave a worker idle behind the slower one
    plan_windows = windows(adapter.module_names)
    for c, spec, w in (r for window in ordered_map(curves, plan_windows, workers(), ahead=len(plan_windows))
                       for r in window):
        raw.append(c)
        specs[c.name] = spec
        if w:
            whitened.add(c.name)
    probe = MiniAdapter(source_format=adapter.format, module_names=[], load_module=None,
                        source_config=adapter.config, source_metadata=adapter.metadata,
                        passthrough_names=list(adapter.passthrough_names), load_passthrough=adapter.load_passthrough,
                        original_bytes=original)
    max_data = max_bytes or sum(max(o.nbytes for o in c.options + c.pending) for c in raw)
    sizes = SizePlan(probe, specs, max_data, directory)
    fixed = sizes.fixed + (calibrated.summary_overhead() if whitened and directory and metric != "weight" else 0)

    def costed(c: budget.Curve) -> budget.Curve:
        """c with every option's bytes counting its entry in the header (pending ones at least)."""
        if c.name in whitened:  # the error figures of the calibrated fit are not known yet: at their longest
            e = short_figure(c.energy)  # the update's weight-space energy, as Planned carries it
            costs = [sizes.entry_bytes(c.name, o.k, o.bits, calibrated.ERROR_FIGURE_BOUND, e) for o in c.options]
            return budget.Curve(c.name, c.energy, [Option(o.k, o.bits, o.nbytes + n, o.err2)
                                                   for o, n in zip(c.options, costs)])
        # entry_bytes at the first option, plus how much longer each option's numbers are
        o0 = c.options[0]
        e0 = _planned_fidelity(o0.err2, c.energy)
        base = sizes.entry_bytes(c.name, o0.k, o0.bits, *e0) - len(repr(o0.k)) - entry_field_bytes(o0.bits) - len(repr(e0[0]))
        inv = 1.0 / c.energy if c.energy > 0 else 0.0
        head = lambda o: base + len(repr(o.k)) + entry_field_bytes(o.bits)  # noqa: E731
        return budget.Curve(c.name, c.energy,
                            [Option(o.k, o.bits, o.nbytes + head(o) + len(repr(short_figure((o.err2 * inv) ** 0.5))), o.err2)
                             for o in c.options],
                            pending=[Option(o.k, o.bits, o.nbytes + head(o) + len("0.0"), o.err2) for o in c.pending],
                            factors=c.factors)

    def complete(partial_curves: list[budget.Curve]) -> list[budget.Curve]:
        """Those curves computed further: to about twice the rank they reach, then whole."""
        known = {c.name: max(o.k for o in c.options) for c in partial_curves}
        # one whose computed ranks reach its numerical rank (which can be below the nominal one)
        # lacks only widths: computed further, it is whole
        whole = frozenset(c.name for c in partial_curves if known[c.name] >= max(o.k for o in c.pending))
        further = lambda names: curves(names, known, whole)  # noqa: E731
        parts = windows(list(known))
        return [costed(c) for window in ordered_map(further, parts, workers(), ahead=len(parts)) for c, _, _ in window]

    return [costed(c) for c in raw], fixed, complete, heads


class _Arena:
    """Copies of many small arrays in one buffer of `size` bytes, allocated on first use: its pages
    become resident only as they are written, and the copies do not pin the allocator's heaps
    between the plan's larger temporaries (kept one by one, 64 MB of codes raised the 7B-shaped
    plan's peak by about 160 MB)."""

    def __init__(self, size: int):
        self.size, self.used, self.buf, self.lock = size, 0, None, threading.Lock()

    @property
    def full(self) -> bool:
        """Less than 1/64 of the buffer left: not worth converting more codes for it."""
        return self.size - self.used <= self.size // 64

    def take(self, arrays: list[np.ndarray]) -> list[np.ndarray] | None:
        """Copies of `arrays` in the buffer, or None where they do not fit."""
        spans = [-(-a.nbytes // 8) * 8 for a in arrays]  # 8-byte aligned: any dtype can view its span
        with self.lock:
            if self.used + sum(spans) > self.size:
                return None
            if self.buf is None:
                self.buf = np.empty(self.size, dtype=np.uint8)
            at, self.used = self.used, self.used + sum(spans)
        out = []
        for a, span in zip(arrays, spans):
            dst = self.buf[at:at + a.nbytes].view(a.dtype).reshape(a.shape)
            dst[...] = a
            out.append(dst)
            at += span
        return out


def _head(m: LoraModule) -> LoraModule:
    """m with its factors replaced by meta tensors of the same shapes and dtype: everything about
    the module but its numbers (Planned.head)."""
    return dataclasses.replace(m, down=torch.empty(m.down.shape, dtype=m.down.dtype, device="meta"),
                               up=torch.empty(m.up.shape, dtype=m.up.dtype, device="meta"))


def calibrated_whitening(adapter: Adapter, calibration,
                         floor: bool = True) -> Callable[[str], torch.Tensor | None] | None:
    """plan_curves' `whitening` from calibration statistics: each module's factor L, so that it is
    fitted to its outputs. A floor on the calibrated share (`floor`) needs one for every module (one
    metric for all, or its sums would mix units); without one, modules with no statistics (conv and
    embedding updates) get None and the plain fit."""
    if not calibration:
        return None
    missing = [n for n in adapter.module_names if n not in calibration]
    if missing and floor:
        raise BadInputError(f"a floor on the calibrated share needs statistics for every module; {len(missing)} have "
                            f"none (e.g. {missing[0]!r}: conv or embedding updates); use --target-size, or drop "
                            "--calibration", adapter.source or None)
    return lambda name: calibration[name].factor() if name in calibration else None


def source_bytes(source: str) -> int | None:
    """Size on disk of an adapter's tensor files (for the compression ratio)."""
    if not source or not os.path.exists(source):
        return None
    p = Path(source)
    files = [p] if p.is_file() else [*p.glob("*.safetensors"), *p.glob("*.bin")]
    return sum(f.stat().st_size for f in files) or None


@one_thread
def reconstruct_module(m: MiniModule, trim_rank: bool = False, alpha: float | None = None) -> LoraModule:
    """A standard LoRA pair for `m`: B' = U X, A' = Y V, with the original update scale·B·A.

    By default the inner rank k is zero-padded back to the original rank r, so the
    restored adapter has the original config and exactly the original scale. With
    `trim_rank` it has rank k and keeps its alpha: the scale ratio (k/r, or √(k/r) with
    rsLoRA) is folded into B', because clients that read one lora_alpha and divide by each
    module's rank (llama.cpp's converter) would otherwise scale every trimmed module wrong.
    With `alpha` the module gets that plain (non-rsLoRA) lora_alpha, the ratio folded into B'.
    """
    B2, A2 = m.factors()  # float64: the fold is exact before the cast to the stored dtype
    dtype = getattr(torch, m.dtype, torch.float32)
    k = m.inner_rank
    rank = k if trim_rank and k < m.rank else m.rank
    new_alpha, rslora = (m.alpha, m.use_rslora) if alpha is None else (float(alpha), False)
    ratio = m.scale / lora_scale(new_alpha, rank, rslora)
    if ratio != 1.0:
        B2 = B2 * ratio
    if k < rank:
        B2 = torch.cat([B2, B2.new_zeros(B2.shape[0], rank - k)], dim=1)
        A2 = torch.cat([A2, A2.new_zeros(rank - k, A2.shape[1])], dim=0)
    return LoraModule(name=m.name, down=A2.to(dtype), up=B2.to(dtype), alpha=new_alpha, use_rslora=rslora,
                      kind=m.kind, kernel=m.kernel)


def reconstruct(mini: MiniAdapter, trim_rank: bool = False, one_alpha: bool = False) -> Adapter:
    """The standard adapter a LoRA-Mini adapter stands for (lazy), in its source format.

    `one_alpha`: every module gets one plain lora_alpha (a PEFT source's global one, with
    rsLoRA turned into alpha·√r; else the first module's), the per-module ratio folded into
    B'. For clients that read a single lora_alpha (llama.cpp, vLLM) when the source has
    alpha_pattern or use_rslora.
    """
    alpha = _global_alpha(mini) if one_alpha else None

    @one_thread  # loading and checking the LoRA-Mini module too
    def load(name: str) -> LoraModule:
        return reconstruct_module(mini.module(name), trim_rank, alpha)

    return Adapter(format=mini.source_format, module_names=list(mini.module_names), load_module=load,
                   config=mini.source_config, metadata=mini.source_metadata,
                   passthrough_names=list(mini.passthrough_names), load_passthrough=mini.load_passthrough,
                   source=mini.source, workers=workers())


def _global_alpha(mini: MiniAdapter) -> float:
    """The plain lora_alpha every module is written with under reconstruct(one_alpha=True)."""
    cfg = mini.source_config if mini.source_format == "peft" else {}
    if isinstance(cfg.get("lora_alpha"), (int, float)) and isinstance(cfg.get("r"), int):
        return float(cfg["lora_alpha"]) * (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else 1.0)
    if not mini.module_names:
        return 1.0
    first = mini.module(mini.module_names[0])
    return first.scale * first.rank


def compare(mini: MiniAdapter, original: Adapter, progress=None) -> FidelityReport:
    """Per-module error of `mini` against the original adapter, from the factors."""
    missing = sorted(set(original.module_names) ^ set(mini.module_names))
    if missing:
        raise BadInputError(f"module sets differ between the LoRA-Mini file and the original: {missing[:3]}",
                            original.source)
    report = FidelityReport()
    for m in mini.modules():
        o = original.module(m.name)
        if (o.out_features, o.in_features) != (m.out_features, m.in_features):
            raise BadInputError(f"module {m.name!r} is {o.out_features}x{o.in_features} here but "
                                f"{m.out_features}x{m.in_features} in the LoRA-Mini file: not its original",
                                original.source)
        rel, ref = _module_error(m, o)
        report.add(ModuleFidelity(m.name, (m.out_features, m.in_features), m.rank, m.inner_rank,
                                  m.outer["source"], int(m.outer["a"]), int(m.outer["b"]), rel, ref**2,
                                  recovered=m.recovered, bits=m.bits, quantized=bool(m.quant), codebook=m.codebook))
        if progress:
            progress(m)
    _check_passthrough(mini)
    return report


@one_thread
def _module_error(m: MiniModule, o: LoraModule) -> tuple[float, float]:
    """(relative error of m against o, ||s·B·A||_F of o), from the factors."""
    B2, A2 = m.factors()
    return scaled_relative_error(o.up, o.down, o.scale, B2, A2, m.scale)


def stored_report(mini: MiniAdapter, progress=None) -> FidelityReport:
    """The fidelity recorded at compression time, after loading (and so checking) every module."""
    report = FidelityReport(original_bytes=mini.original_bytes,
                            compressed_bytes=os.path.getsize(mini.source) if mini.source else None)
    for m in mini.modules():
        report.add(m.fidelity_row())
        if progress:
            progress(m)
    _check_passthrough(mini)
    return report


def _check_passthrough(mini: MiniAdapter) -> None:
    """Load (and so checksum) every passthrough tensor, one at a time: verify vouches for them too."""
    for _ in mini.passthrough():
        pass
