"""compress / reconstruct / compare: the operations between Adapter and MiniAdapter.

All of them are lazy: nothing is computed until a writer or a report iterates the
modules, and then one module (compress: one window of WINDOW modules, same-shaped ones
fitted as a stack) is held at a time per worker.
"""
from __future__ import annotations

import functools
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import calibrated, outer
from .adapter import Adapter, LoraModule
from .container import DTYPES, MiniAdapter, MiniModule
from .errors import BadInputError
from .lru import BytesLRU
from .mathcore import OuterBasis, Updates, difference_norm, fit_projected_stack, frobenius, mini_difference_norms
from .report import FidelityReport, ModuleFidelity

_DTYPE_NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.float64: "float64"}


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
def compress_window(modules: list[LoraModule], source: str = "random", *, seed: int = 0, outer_dim=None,
                    rank: int | None = None, keep_energy: float | None = None,
                    dtype: str = "auto", outer_stream: str = "shared", calibration=None) -> list[MiniModule]:
    """compress_module for each of `modules`, in order; same-shaped ones are fitted as a stack.
    Modules with `calibration` statistics are fitted one at a time to their output (see calibrated)."""
    options = {"seed": seed, "outer_dim": outer_dim, "rank": rank, "keep_energy": keep_energy, "stream": outer_stream}
    src = outer.get(source)
    shapes: dict[tuple, list[int]] = {}
    done: dict[int, MiniModule] = {}
    for i, m in enumerate(modules):
        stats = calibration.get(m.name) if calibration else None
        if stats is not None:
            done[i] = calibrated.compress_module(m, src, options, _storage_dtype(dtype, m.dtype), stats.factor())
            continue
        shapes.setdefault((tuple(m.up.shape), tuple(m.down.shape), m.dtype), []).append(i)
    for idx in shapes.values():
        m = modules[idx[0]]
        per_stack = max(1, STACK_BYTES // (8 * m.rank * (m.out_features + m.in_features)))
        per_stack = min(per_stack, getattr(src, "stack_size", lambda o: None)(options) or per_stack)
        for start in range(0, len(idx), per_stack):
            part = idx[start:start + per_stack]
            done.update(zip(part, _compress_stack([modules[i] for i in part], src, options, dtype)))
    return [done[i] for i in range(len(modules))]


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
    fit = _fit_stored(src, upd, U, V, specs, store) if src.STORED else _fit_shared(upd, U, V, specs, options)
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
        rel = diff / ref if ref else (0.0 if diff == 0.0 else float("inf"))
        a, b = spec["a"], spec["b"]  # stored outers are only as wide as their own module's rank
        Ui, Vi = (fit.U[i, :, :a].contiguous(), fit.V[i, :b].contiguous()) if src.STORED else (fit.U, fit.V)
        out.append(MiniModule(name=m.name, kind=m.kind, kernel=m.kernel, rank=m.rank, alpha=m.alpha,
                              use_rslora=m.use_rslora, dtype=_DTYPE_NAME.get(m.dtype, str(m.dtype)), outer=spec,
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
    if not outer.random_outer.per_module(options):  # the same outers come back in later stacks
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
        raise BadInputError(f"module {ms[i].name!r}: the inner matrices overflow {_DTYPE_NAME[store]} (largest |X|, |Y|: "
                            f"{max(np.abs(X[i]).max(), np.abs(Y[i]).max()):.3g}); the outers are ill-conditioned for "
                            "this module: store them as fp32 (--dtype fp32) or choose another --seed / --outer-dim")


def compress(adapter: Adapter, outer: str = "random", *, seed: int = 0, outer_dim=None,
             rank: int | None = None, keep_energy: float | None = None, dtype: str = "auto",
             outer_stream: str = "shared", calibration=None) -> MiniAdapter:
    """LoRA-Mini form of `adapter` (lazy: modules are fitted when iterated or saved).

    `outer_stream` (random outers): "shared" keys the generator on the seed alone, so modules
    of one shape share U and V; "module" keys it on each module's name as well.
    `calibration`: {module name: statistics with .factor()} (recovery.calibration.collect_input_stats):
    those modules minimise their output error on the calibration data instead of the weight error.

    >>> import lora_convert as lc                                    # doctest: +SKIP
    >>> mini = lc.compress(lc.load_adapter("fixtures/peft-tiny-llama"), outer="random", seed=7)
    >>> report = lc.save(mini, "mini")
    """
    _validate_options(outer, rank, keep_energy, outer_dim, seed, outer_stream)
    kwargs = dict(seed=seed, outer_dim=outer_dim, rank=rank, keep_energy=keep_energy, dtype=dtype,
                  outer_stream=outer_stream, calibration=calibration)
    calibrated.check_modules(adapter, calibration)
    _storage_dtype(dtype, torch.float32)  # fail early on a bad name

    @one_thread  # reading the factors too
    def load_window(names: list[str]) -> list[MiniModule]:
        try:
            return compress_window([adapter.module(n) for n in names], outer, **kwargs)
        except BadInputError as exc:
            if exc.path is None:  # compress_window's own refusals: name the adapter
                raise BadInputError(exc.problem, adapter.source or None) from None
            raise

    return MiniAdapter(source_format=adapter.format, module_names=list(adapter.module_names),
                       load_module=lambda name: load_window([name])[0], load_window=load_window,
                       # per-module outers share nothing within a window, and each module holds its own
                       window=1 if outer_stream == "module" else WINDOW,
                       source_config=adapter.config, source_metadata=adapter.metadata,
                       passthrough_names=list(adapter.passthrough_names), load_passthrough=adapter.load_passthrough,
                       original_bytes=source_bytes(adapter.source), source=adapter.source, workers=workers())


MAX_SEED = 2**63  # seeds are stored in JSON; keep them exact for 64-bit readers


def _validate_options(source, rank, keep_energy, outer_dim, seed, outer_stream="shared") -> None:
    src = outer.get(source)
    if src.STORED and outer_dim is not None:
        raise BadInputError(f"--outer-dim applies to random outers; {source} outers are sized by "
                            "--rank / --keep-energy")
    if outer_stream not in outer.random_outer.STREAMS:
        raise BadInputError(f"--outer-stream must be one of {', '.join(outer.random_outer.STREAMS)}, "
                            f"got {outer_stream!r}")
    if src.STORED and outer_stream != "shared":
        raise BadInputError(f"--outer-stream applies to random outers; {source} outers are stored")
    if not 0 <= seed < MAX_SEED:
        raise BadInputError(f"--seed must be in [0, 2**63), got {seed}")
    if rank is not None and rank <= 0:
        raise BadInputError(f"--rank must be positive, got {rank}")
    if keep_energy is not None and not 0.0 < keep_energy <= 1.0:
        raise BadInputError(f"--keep-energy must be in (0, 1], got {keep_energy}")
    dims = [outer_dim] if isinstance(outer_dim, int) else list(outer_dim or [])
    if any(d <= 0 for d in dims):
        raise BadInputError(f"--outer-dim must be positive, got {outer_dim}")


def source_bytes(source: str) -> int | None:
    """Size on disk of an adapter's tensor files (for the compression ratio)."""
    if not source or not os.path.exists(source):
        return None
    p = Path(source)
    files = [p] if p.is_file() else [*p.glob("*.safetensors"), *p.glob("*.bin")]
    return sum(f.stat().st_size for f in files) or None


@one_thread
def reconstruct_module(m: MiniModule, trim_rank: bool = False) -> LoraModule:
    """A standard LoRA pair for `m`: B' = U X, A' = Y V, same scale as the original.

    By default the inner rank k is zero-padded back to the original rank r, so the
    restored adapter has the original config and exactly the original scale. With
    `trim_rank` it has rank k and alpha chosen so that alpha'/k (or /√k) equals the
    original scale.
    """
    B2, A2 = m.factors()
    dtype = getattr(torch, m.dtype, torch.float32)
    alpha, k = m.alpha, m.inner_rank
    if trim_rank and k < m.rank:
        alpha = m.scale * (k ** 0.5 if m.use_rslora else k)
    elif k < m.rank:
        B2 = torch.cat([B2, B2.new_zeros(B2.shape[0], m.rank - k)], dim=1)
        A2 = torch.cat([A2, A2.new_zeros(m.rank - k, A2.shape[1])], dim=0)
    return LoraModule(name=m.name, down=A2.to(dtype), up=B2.to(dtype), alpha=alpha, use_rslora=m.use_rslora,
                      kind=m.kind, kernel=m.kernel)


def reconstruct(mini: MiniAdapter, trim_rank: bool = False) -> Adapter:
    """The standard adapter a LoRA-Mini adapter stands for (lazy), in its source format."""
    @one_thread  # loading and checking the LoRA-Mini module too
    def load(name: str) -> LoraModule:
        return reconstruct_module(mini.module(name), trim_rank)

    return Adapter(format=mini.source_format, module_names=list(mini.module_names), load_module=load,
                   config=mini.source_config, metadata=mini.source_metadata,
                   passthrough_names=list(mini.passthrough_names), load_passthrough=mini.load_passthrough,
                   source=mini.source, workers=workers())


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
                                  recovered=m.recovered))
        if progress:
            progress(m)
    _check_passthrough(mini)
    return report


@one_thread
def _module_error(m: MiniModule, o: LoraModule) -> tuple[float, float]:
    """(relative error of m against o, ||s·B·A||_F of o), from the factors."""
    B2, A2 = m.factors()
    ref = o.scale * frobenius(o.up, o.down)
    err = difference_norm(o.up.double() * o.scale, o.down, B2 * m.scale, A2)
    return (err / ref if ref else (0.0 if err == 0 else float("inf"))), ref


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
