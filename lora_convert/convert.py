"""compress / reconstruct / compare: the operations between Adapter and MiniAdapter.

All of them are lazy and per-module: nothing is computed until a writer or a
report iterates the modules, and then one module is held at a time.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from . import outer
from .adapter import Adapter, LoraModule
from .container import DTYPES, MiniAdapter, MiniModule
from .errors import BadInputError
from .lru import BytesLRU
from .mathcore import OuterBasis, Update, difference_norm, fit_projected, frobenius, mini_difference_norm
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


def _shared_basis(role: str, digest: str, M: torch.Tensor) -> OuterBasis:
    return _BASES.get((role, digest), lambda: OuterBasis(M))


@one_thread
def compress_module(m: LoraModule, source: str = "random", *, seed: int = 0, outer_dim=None,
                    rank: int | None = None, keep_energy: float | None = None,
                    dtype: str = "auto") -> MiniModule:
    """Fit one module's inner matrices for the chosen outers and record its fidelity.

    Everything is float64 from the factors and reuses one set of products: BᵀB and AAᵀ
    (energy, SVD outers), UᵀB and AVᵀ (fit and error), UᵀU and VVᵀ (cached for shared
    outers). The error reported is that of the values written: U, V, X, Y as stored.
    """
    src = outer.get(source)
    options = {"seed": seed, "outer_dim": outer_dim, "rank": rank, "keep_energy": keep_energy}
    store = _storage_dtype(dtype, m.dtype)
    upd = Update(m.up, m.down)
    U, V, spec = src.make(m, options, update=upd)
    if src.STORED:
        U, V = U.to(store), V.to(store)
        ub, vb = OuterBasis(U), OuterBasis(V.T)
    else:
        ub, vb = _shared_basis("U", spec["u_sha256"], U), _shared_basis("V", spec["v_sha256"], V.T)
    UtB, AVt = ub.m.T @ upd.B, upd.A @ vb.m
    if hasattr(src, "inner"):  # closed-form inners (svd): nothing to fit
        X, Y = src.inner(upd, U.shape[1])
    else:
        fit = fit_projected(upd, ub, vb, UtB, AVt, rank=rank, keep_energy=keep_energy)
        X, Y = fit.X, fit.Y
    if X.shape[1] == 0:  # an all-zero update: keep one zero direction so shapes stay valid
        X, Y = torch.zeros(U.shape[1], 1, dtype=torch.float64), torch.zeros(1, V.shape[0], dtype=torch.float64)
    X64, Y64, X, Y = X, Y, X.to(store), Y.to(store)
    Xd, Yd = X.double(), Y.double()
    if not (torch.isfinite(Xd).all() and torch.isfinite(Yd).all()):
        raise BadInputError(f"module {m.name!r}: the inner matrices overflow {_DTYPE_NAME[store]} (largest |X|, |Y|: "
                            f"{_abs_max(X64, Y64):.3g}); the outers are ill-conditioned for this module: "
                            "store them as fp32 (--dtype fp32) or choose another --seed / --outer-dim")
    diff = mini_difference_norm(upd, UtB, AVt, ub.gram, vb.gram, Xd, Yd)
    if diff is None:  # too close to exact for the Gram formula: QR of the stacked factors
        diff = difference_norm(upd.B, upd.A, ub.m @ Xd, Yd @ vb.m.T)
    ref = upd.energy ** 0.5
    rel = diff / ref if ref else (0.0 if diff == 0.0 else float("inf"))
    return MiniModule(name=m.name, kind=m.kind, kernel=m.kernel, rank=m.rank, alpha=m.alpha,
                      use_rslora=m.use_rslora, dtype=_DTYPE_NAME.get(m.dtype, str(m.dtype)), outer=spec,
                      U=U, V=V, X=X, Y=Y, fidelity={"rel_error": rel, "energy": m.scale**2 * upd.energy})


def _abs_max(*tensors: torch.Tensor) -> float:
    return max(float(t.abs().max()) for t in tensors)


def compress(adapter: Adapter, outer: str = "random", *, seed: int = 0, outer_dim=None,
             rank: int | None = None, keep_energy: float | None = None, dtype: str = "auto") -> MiniAdapter:
    """LoRA-Mini form of `adapter` (lazy: modules are fitted when iterated or saved).

    >>> import lora_convert as lc                                    # doctest: +SKIP
    >>> mini = lc.compress(lc.load_adapter("fixtures/peft-tiny-llama"), outer="random", seed=7)
    >>> report = lc.save(mini, "mini")
    """
    _validate_options(outer, rank, keep_energy, outer_dim, seed)
    kwargs = dict(seed=seed, outer_dim=outer_dim, rank=rank, keep_energy=keep_energy, dtype=dtype)
    _storage_dtype(dtype, torch.float32)  # fail early on a bad name

    @one_thread  # reading the factors too
    def load(name: str) -> MiniModule:
        try:
            return compress_module(adapter.module(name), outer, **kwargs)
        except BadInputError as exc:
            if exc.path is None:  # compress_module's own refusals: name the adapter
                raise BadInputError(exc.problem, adapter.source or None) from None
            raise

    return MiniAdapter(source_format=adapter.format, module_names=list(adapter.module_names), load_module=load,
                       source_config=adapter.config, source_metadata=adapter.metadata,
                       passthrough_names=list(adapter.passthrough_names), load_passthrough=adapter.load_passthrough,
                       original_bytes=source_bytes(adapter.source), source=adapter.source, workers=workers())


MAX_SEED = 2**63  # seeds are stored in JSON; keep them exact for 64-bit readers


def _validate_options(source, rank, keep_energy, outer_dim, seed) -> None:
    src = outer.get(source)
    if src.STORED and outer_dim is not None:
        raise BadInputError(f"--outer-dim applies to random outers; {source} outers are sized by "
                            "--rank / --keep-energy")
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
        rel, ref = _module_error(m, original.module(m.name))
        report.add(ModuleFidelity(m.name, (m.out_features, m.in_features), m.rank, m.inner_rank,
                                  m.outer["source"], int(m.outer["a"]), int(m.outer["b"]), rel, ref**2))
        if progress:
            progress(m)
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
    return report
