"""The one in-memory adapter model every format reads into and writes from.

An :class:`Adapter` is lazy: it knows its module names and how to load each
module, and loads factors only when asked, one module at a time, so memory
stays bounded by the largest module rather than the whole adapter.
"""
from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

if TYPE_CHECKING:  # imported where tensors are made: `inspect` describes adapters without torch
    import torch


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling rule: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass
class LoraModule:
    """One low-rank update ΔW = scale · up @ down.

    `down` (A) is r × in and `up` (B) is out × r, both 2-D. Conv kernels are
    flattened to out × (in·kh·kw); `kernel` records the original 4-D shapes so
    writers can restore them.
    """

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    use_rslora: bool = False
    kind: str = "linear"  # "linear" | "conv" | "embedding"
    kernel: dict = field(default_factory=dict)
    checked_finite: bool = False  # the reader already refused NaN/Inf in exactly these factors

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.down.shape[1])

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.use_rslora)

    @property
    def dtype(self) -> torch.dtype:
        return self.down.dtype


class LazyModules:
    """Iteration over `module_names` through `load_module`, one module in memory at a time.

    Shared by Adapter and container.MiniAdapter; subclasses provide the attributes
    module_names, load_module, passthrough_names and load_passthrough.
    """

    def __len__(self) -> int:
        return len(self.module_names)

    def module(self, name: str):
        return self.load_module(name)

    def modules(self) -> Iterator:
        """Every module in order; with `workers` > 1, the next few (or, with `load_window`, the
        next windows of `window` modules) are computed on threads while the caller uses the
        current one (torch and hashlib release the GIL)."""
        workers = getattr(self, "workers", 1)
        load_window = getattr(self, "load_window", None)
        if load_window is None:
            yield from ordered_map(self.load_module, self.module_names, workers)
            return
        names, size = self.module_names, max(1, self.window)
        for window in ordered_map(load_window, [names[i:i + size] for i in range(0, len(names), size)], workers):
            yield from window

    def passthrough(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.passthrough_names:
            yield name, self.load_passthrough(name)


def ordered_map(fn: Callable, items: Iterable, workers: int = 1, ahead: int = 0) -> Iterator:
    """fn(item) for each item, in order, computed on up to `workers` threads.

    At most workers + ahead + 1 results exist at once, so memory stays bounded by a few items
    (modules, or the windows of modules some callers map over). `ahead`: how many more results may
    be computed before the caller takes the oldest; without any, a worker whose item is done waits
    for the one still computing the oldest (items of unequal cost leave workers idle).
    An exception surfaces at its item's turn; work not yet started is cancelled.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    import torch

    it = iter(items)
    # torch's OpenMP thread count is per thread and starts at the core count in new threads:
    # left there, every BLAS call of every worker would fan out and they would fight (7x slower)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="lora_convert", initializer=torch.set_num_threads,
                              initargs=(1,))
    pending: deque = deque()
    try:
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers + ahead:
                break
        while pending:
            result = pending.popleft().result()
            for item in it:  # keep every worker busy while the caller has this one
                pending.append(pool.submit(fn, item))
                break
            yield result
            result = None  # the caller's turn is over: do not hold it while the next is computed
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Adapter(LazyModules):
    """A LoRA adapter, read lazily.

    `config` is the source format's own configuration (for PEFT the
    adapter_config.json dict), kept so writers can reproduce it; `metadata`
    holds source-file metadata (e.g. kohya's ss_* keys). `passthrough` names
    tensors that are carried through untouched (PEFT modules_to_save).
    """

    format: str
    module_names: list[str]
    load_module: Callable[[str], LoraModule]
    config: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    passthrough_names: list[str] = field(default_factory=list)
    load_passthrough: Callable[[str], torch.Tensor] | None = None
    source: str = ""
    workers: int = 1  # modules computed concurrently while iterating (LazyModules.modules)


def from_modules(fmt: str, modules: list[LoraModule], **kw) -> Adapter:
    """An Adapter over modules already in memory (tests, small programmatic use)."""
    table = {m.name: m for m in modules}
    return Adapter(format=fmt, module_names=list(table), load_module=table.__getitem__, **kw)
