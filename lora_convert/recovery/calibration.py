"""Input statistics of a base model's adapted modules over calibration text, for whitened fits.

The base model runs forward over the text once (no backprop); forward pre-hooks on each module the
adapter targets accumulate the second moment of its input, C = E[x xᵀ], in float64 on the model's
device, over the non-padding tokens only. Modules that read the same input tensor in a forward
(q/k/v read the same normed hidden state; gate/up likewise) share one accumulator. At the end of a
pass each C is replaced by its damped Cholesky factor L (C + λI = L Lᵀ), all compress needs.

Memory: float64 statistics cost features² · 8 bytes per distinct input. Modules are taken in
groups of whole layers whose statistics fit `max_bytes` (at least one layer): one forward pass over
the text per group, cut short once every module of the group has run. Finished groups are moved to
the CPU, and, when there is more than one group, spilled to safetensors files in a temporary
directory, so peak memory is one group's statistics plus the model. For Llama-2-7B one layer is
1.4 GB (q/k/v, o, gate/up: 4096² each, down: 11008²), 45 GB for all 32 layers.
"""
from __future__ import annotations

import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BadInputError
from ..lru import BytesLRU
from ..whiten import DEFAULT_DAMPING, damped_cholesky
from . import data as D

DEFAULT_MAX_BYTES = 2 << 30  # statistics held at once (float64) before passes are split by layer


class FactorStore:
    """Whitening factors L (and their damping λ) by key, in memory or spilled to safetensors files.

    Only L is kept: C = L Lᵀ − λI is recomputed on demand, so statistics cost one matrix each."""

    def __init__(self, spill_dir: str | None = None):
        self._memory: dict[str, torch.Tensor] = {}
        self._files: dict[str, Path] = {}
        self.damping: dict[str, float] = {}
        self._dir = None
        if spill_dir is not None:
            self._dir = Path(spill_dir)
        self._loaded = BytesLRU(512 << 20, size=lambda t: t.numel() * 8)  # q, k, v read one spilled factor

    def _spill_dir(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="lora-convert-calib-"))
            weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        return self._dir

    def put(self, factors: dict[str, tuple[torch.Tensor, float]], spill: bool) -> None:
        self.damping.update({k: lam for k, (_, lam) in factors.items()})
        if not spill:
            self._memory.update({k: L for k, (L, _) in factors.items()})
            return
        from safetensors.torch import save_file

        path = self._spill_dir() / f"factors-{len(self._files):05d}.safetensors"
        save_file({k: L.contiguous() for k, (L, _) in factors.items()}, str(path))
        self._files.update({k: path for k in factors})

    def factor(self, key: str) -> torch.Tensor:
        if key in self._memory:
            return self._memory[key]
        return self._loaded.get(key, lambda: self._read(key))

    def _read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._files[key]), framework="pt") as f:
            return f.get_tensor(key)

    def moment(self, key: str) -> torch.Tensor:
        L = self.factor(key)
        C = L @ L.T
        C.diagonal().sub_(self.damping[key])
        return C


@dataclass
class InputStats:
    """The calibration statistics of one module's input."""

    name: str  # adapter module name
    features: int  # input width
    tokens: int  # tokens the moment was averaged over
    source: str  # the module whose input tensor this is (itself unless shared)
    store: FactorStore

    @property
    def damping(self) -> float:
        """λ added to the diagonal of C before factoring (damping · mean(diag C), or more if needed)."""
        return self.store.damping[self.source]

    def second_moment(self) -> torch.Tensor:
        """C = E[x xᵀ] (features×features, float64, CPU), recomputed from the factor."""
        return self.store.moment(self.source)

    def factor(self) -> torch.Tensor:
        """Lower-triangular L with L Lᵀ = C + λI (float64, CPU)."""
        return self.store.factor(self.source)


class _StopForward(Exception):
    """Raised by a hook once every module of the current group has run: the rest of the forward
    pass would compute nothing this pass needs."""


def _unit(path: str) -> str:
    """The layer a module belongs to: its path up to the last numeric component."""
    m = re.match(r"(.*\.\d+)(\.|$)", path)
    return m.group(1) if m else path


class _Collector:
    def __init__(self, group: list[tuple[str, str, int]], device):
        self.group = group  # (adapter name, model path, features)
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        self.first = True
        self.mask = None
        self.prev = None  # (tensor, owner) of the last module input seen in this forward
        self.seen: set[str] = set()

    def hook(self, name: str, features: int):
        def pre_hook(_module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            self._add(name, features, x)
            self.seen.add(name)
            if len(self.seen) == len(self.group):
                raise _StopForward
        return pre_hook

    def _add(self, name: str, features: int, x: torch.Tensor) -> None:
        if x.shape[-1] != features:
            raise BadInputError(f"module {name!r} reads inputs of width {x.shape[-1]} in the base model but "
                                f"the adapter's is {features}: the base model does not match the adapter")
        shared = self.prev is not None and self.prev[0] is x
        if self.first and shared:
            self.alias[name] = self.prev[1]
        if name in self.alias:
            if not shared or self.prev[1] != self.alias[name]:
                raise RuntimeError(f"module {name!r} stopped sharing its input with {self.alias[name]!r}")
            return
        self.prev = (x, name)
        if self.mask is not None and x.dim() >= 2 and tuple(x.shape[:2]) == tuple(self.mask.shape):
            x = x[self.mask]
        x = x.reshape(-1, features).to(torch.float64)
        acc = self.sums.get(name)
        if acc is None:
            acc = self.sums[name] = torch.zeros(features, features, dtype=torch.float64, device=x.device)
            self.tokens[name] = 0
        acc.addmm_(x.T, x)
        self.tokens[name] += x.shape[0]

    def start_batch(self, mask: torch.Tensor) -> None:
        self.mask, self.prev, self.seen = mask, None, set()


@torch.no_grad()
def collect_input_stats(model: torch.nn.Module, modules: dict[str, tuple[str, int]], batches, *,
                        damping: float = DEFAULT_DAMPING, max_bytes: int = DEFAULT_MAX_BYTES,
                        spill_dir: str | None = None, progress=None) -> dict[str, InputStats]:
    """Per module, the second moment of its input over `batches` (dicts with input_ids and
    attention_mask; moved to the model's device).

    `modules` maps adapter module names to (model module path, input width). Returns
    {adapter name: InputStats}; the model is left without hooks.
    """
    device = next(model.parameters()).device
    known = dict(model.named_modules())
    order = {p: i for i, p in enumerate(known)}
    items = sorted(((n, p, f) for n, (p, f) in modules.items()), key=lambda t: order.get(t[1], -1))
    groups = _groups(items, max_bytes)
    store = FactorStore(spill_dir)
    extra = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}  # no KV cache
    stats: dict[str, InputStats] = {}
    for gi, group in enumerate(groups):
        col = _Collector(group, device)
        handles = [known[p].register_forward_pre_hook(col.hook(n, f), with_kwargs=True) for n, p, f in group]
        try:
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                col.start_batch(batch["attention_mask"].bool())
                try:
                    model(**batch, **extra)
                except _StopForward:
                    pass
                col.first = False
                if progress:
                    progress(gi, len(groups))
        finally:
            for h in handles:
                h.remove()
        missing = [n for n, _, _ in group if n not in col.sums and n not in col.alias]
        if missing:
            raise BadInputError(f"module {missing[0]!r} of the adapter never ran in the base model's forward pass "
                                "on the calibration text (wrong base model?)")
        factors = {}
        for n in list(col.sums):  # factored on the device, one at a time
            L, lam = damped_cholesky(col.sums.pop(n).div_(max(col.tokens[n], 1)), damping)
            factors[n] = (L.cpu(), lam)
        store.put(factors, spill=len(groups) > 1)
        for n, _, f in group:
            src = col.alias.get(n, n)
            stats[n] = InputStats(n, f, col.tokens[src], src, store)
        del col, factors
    return stats


def _groups(items: list[tuple[str, str, int]], max_bytes: int) -> list[list[tuple[str, str, int]]]:
    """Whole layers per group while their statistics (counted as if no input were shared) fit."""
    units: dict[str, list] = {}
    for it in items:
        units.setdefault(_unit(it[1]), []).append(it)
    groups, cur, used = [], [], 0
    for unit in units.values():
        size = sum(f * f * 8 for _, _, f in unit)
        if cur and used + size > max_bytes:
            groups.append(cur)
            cur, used = [], 0
        cur.extend(unit)
        used += size
    if cur:
        groups.append(cur)
    return groups


# ------------------------------------------------------------------ from files, for compress

def linear_inputs(adapter, model) -> dict[str, tuple[str, int]]:
    """{adapter name: (model path, input width)} for the adapter's linear modules; the base model
    must hold each of them with the same shape."""
    from .inject import resolve_names

    names = list(adapter.module_names)
    try:
        paths = resolve_names(model, names)
    except BadInputError as exc:
        raise BadInputError(exc.problem) from None
    out = {}
    for name in names:
        m = adapter.module(name)
        if m.kind != "linear":
            continue  # conv and embedding updates are fitted without calibration
        mod = model.get_submodule(paths[name])
        shape = _linear_shape(mod)
        if shape is not None and shape != (m.out_features, m.in_features):
            raise BadInputError(f"module {name!r} is {shape[0]}x{shape[1]} in the base model but "
                                f"{m.out_features}x{m.in_features} in the adapter: not its base model")
        out[name] = (paths[name], m.in_features)
    return out


def _linear_shape(mod) -> tuple[int, int] | None:
    if isinstance(mod, torch.nn.Linear):
        return mod.out_features, mod.in_features
    w = getattr(mod, "weight", None)
    if type(mod).__name__ == "Conv1D" and w is not None:  # GPT-2: weight is in×out
        return int(w.shape[1]), int(w.shape[0])
    return None


def _quietly(fn, *args):
    """fn(*args) without transformers' loading progress bars: compress's errors stay one line."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return fn(*args)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def calibration_stats(adapter, text: str, base: str | None = None, *, gguf_file: str | None = None,
                      revision: str | None = None, offline: bool = False, device: str = "auto",
                      max_len: int = 256, batch_size: int = 4, max_sequences: int | None = None,
                      damping: float = DEFAULT_DAMPING, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, InputStats]:
    """Read `text`, load the base model (local directory, GGUF file or Hub id, as `recover`), and
    collect the input statistics of every linear module `adapter` targets."""
    from .models import ModelSource, load_model, model_dtype, pick_device

    texts = D.read_texts(text)  # before the model: bad text fails fast
    base = base or (adapter.config or {}).get("base_model_name_or_path")
    if not base:
        raise BadInputError("no base model given and the adapter does not record base_model_name_or_path; "
                            "pass --base", adapter.source or None)
    dev = pick_device(device)
    src = ModelSource.parse(base, gguf_file, revision, offline)
    model, tokenizer, task = _quietly(load_model, src, "auto", model_dtype(dev))
    model.to(dev)
    try:
        modules = linear_inputs(adapter, model)
    except BadInputError as exc:
        raise BadInputError(exc.problem, base) from None
    seqs = D.tokenize(tokenizer, texts, max_len, pack=task == "causal-lm")
    if max_sequences:
        seqs = seqs[:max_sequences]
    if not seqs:
        raise BadInputError("no sequences of at least 2 tokens in the calibration text", text)
    batches = D.eval_batches(seqs, batch_size, tokenizer.pad_token_id)
    try:
        return collect_input_stats(model, modules, batches, damping=damping, max_bytes=max_bytes)
    except BadInputError as exc:
        raise BadInputError(exc.problem, base) from None
