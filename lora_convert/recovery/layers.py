"""LoRA-Mini layers: a frozen base module plus scale · U X Y V, applied as thin products.

The outers U (out×a) and V (b×in) are frozen buffers (regenerated from the seed or
loaded from the file, never trained); the inners X (a×k) and Y (k×b) are the only
parameters. The out×in ΔW is never formed. The product is associated as
(x · (Y V)ᵀ) · (U X)ᵀ: forming the rank-k factors costs k·b·in + out·a·k once per
forward, after which each token costs k·(in + out), the cost of a rank-k LoRA, instead
of in·b + b·k + k·a + a·out for x·Vᵀ·Yᵀ·Xᵀ·Uᵀ (~25x more for a = b = 256, k = 3 on a
576-wide layer). Gradients reach X and Y through the same products.

The inners train in normalised coordinates: with c_U, c_V the RMS column / row norms of
the outers, the layer holds U/c_U, c_U·X, Y·c_V, V/c_V (the same product). Random outers
have entries in (-1, 1), so c_U ≈ √(out/3) ≈ 14-23 for a 576-1536 wide layer; without
this, an optimizer step on X moves the output c_U·c_V (~300x) more than the same step on a
LoRA factor, and one learning rate could not suit layers of different widths. SVD outers
are orthonormal (c = 1). `inner_matrices()` converts back to the file's coordinates.

Stored outers (svd) are part of the file anyway, so for them the layer trains the stored factors
themselves: B' = U·X (out×k) and A' = Y·V (k×in) are the parameters (held as X and Y, divided by
a power of two near their RMS entry, so an optimizer step is a relative change and the division
is exact), and the file gets U = B', V = A', X = Y = I: the same shapes and bytes. A k×k inner
alone could only mix the k stored directions (one number per module at k = 1); the factors can
turn them.

`fake_quant` (quantization-aware training, recovery.qat) makes the forward use the factors as the
file will store them (`storage`: the module's quant spec, or its float dtype), with gradients
passed straight through to the unrounded parameters.

Random outers from one generator stream are the same matrix for every module of a shape
(outer/random.py), so layers built with one `shared` dict hold one normalised copy of
each, not one per layer, also after `model.to(device)`: 60 copies of the a = b = 256 outers would take 57 MB beside
SmolLM2-135M's 540 MB, more than a LoRA of rank 16 and its optimizer state together.

A layer can also hold the original LoRA pair (the teacher) as frozen buffers and
switch between three modes on the same base weights, so recovery needs one copy of
the base model, not three:
    "student"  base(x) + scale · U X Y V x        (the LoRA-Mini adapter)
    "teacher"  base(x) + scale_t · B A x          (the original LoRA, as PEFT computes it)
    "base"     base(x)
"""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import outer
from ..adapter import LoraModule
from ..container import MiniModule
from ..errors import BadInputError, UnsupportedError
from .qat import fake_quant, lossless

MODES = ("student", "teacher", "base")
OUTERS = ("U", "V")
# One Module._apply call (model.to(...), .half(), ...) passes the same `fn` to every module: the outers
# are converted once per distinct tensor in that call, so layers sharing an outer still share it after.
_CONVERTED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def layer_kind(base: nn.Module) -> str:
    """'linear' | 'conv' | 'embedding' for the base modules LoRA-Mini can wrap."""
    if isinstance(base, nn.Linear) or type(base).__name__ == "Conv1D":  # transformers' GPT-2 Conv1D is a linear
        return "linear"
    if isinstance(base, nn.Conv2d):
        if base.groups != 1 or base.padding_mode != "zeros":
            raise UnsupportedError("grouped or non-zero-padded Conv2d is not supported by LoRA-Mini layers")
        return "conv"
    if isinstance(base, nn.Embedding):
        return "embedding"
    raise UnsupportedError(f"cannot wrap a {type(base).__name__} (LoRA-Mini layers wrap Linear, Conv2d, Embedding)")


def base_shape(base: nn.Module, kind: str) -> tuple[int, int]:
    """(out, in) of the flattened weight the update ΔW (out×in) is added to."""
    if kind == "embedding":  # PEFT stores the embedding update transposed: out = dim, in = vocabulary
        return base.embedding_dim, base.num_embeddings
    if type(base).__name__ == "Conv1D":  # weight is in×out
        return base.weight.shape[1], base.weight.shape[0]
    w = base.weight
    return w.shape[0], w[0].numel()


class MiniLayer(nn.Module):
    """A base Linear / Conv2d / Embedding plus a LoRA-Mini update (and optionally its teacher)."""

    def __init__(self, base: nn.Module, module: MiniModule, teacher: LoraModule | None = None, *,
                 register_base: bool = True, shared: dict | None = None):
        super().__init__()
        if register_base:
            self.base = base
        else:  # a wrapper that holds several adapters owns the base: not registered (and saved) twice
            object.__setattr__(self, "base", base)
        self.kind = layer_kind(base)
        self.name = module.name
        self.mode = "student"
        self.set_module(module, shared)
        if teacher is not None:
            self.attach_teacher(teacher)

    def _apply(self, fn, recurse=True):
        try:
            done = _CONVERTED.setdefault(fn, {})
        except TypeError:  # a callable without weak references: convert per layer, as nn.Module does
            return super()._apply(fn, recurse)
        outers = {n: self._buffers.pop(n) for n in OUTERS if self._buffers.get(n) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            for n, t in outers.items():  # weak references: a long-lived fn must not keep tensors alive
                src, out = done.get(id(t), (None, None))
                converted = out() if src is not None and src() is t else None
                if converted is None:
                    converted = fn(t)
                    done[id(t)] = (weakref.ref(t), weakref.ref(converted))
                self._buffers[n] = converted
        return self

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    def set_module(self, module: MiniModule, shared: dict | None = None) -> None:
        """Load outers (frozen) and inners (trainable, float32 master copies) from `module`; stored
        outers: the factors U·X, Y·V are the trainable parameters (see the module docstring).

        `shared` (a dict kept by the caller across layers) lets layers whose module holds the same
        outer tensor share one normalised copy of it; the buffers are never modified in place.
        """
        self._check(module.out_features, module.in_features, f"LoRA-Mini module {module.name!r}")
        dev = self.device
        self.factored = outer.get(module.outer["source"]).stored
        # how the file will store the factors: quantized, or float tensors of their dtype
        self.storage = dict(module.quant) if module.quant else {"dtype": module.X.dtype}
        self.fake_quant = False
        if self.factored:
            U, V, X, Y = (t.to(dev, torch.float64) for t in (module.U, module.V, module.X, module.Y))
            B, A = U @ X, Y @ V
            self.c_u, self.c_v = 1.0 / pow2_rms(B), 1.0 / pow2_rms(A)
            self.register_buffer("U", None, persistent=False)
            self.register_buffer("V", None, persistent=False)
            X, Y = B, A
        else:
            U, self.c_u = normalised_outer(module.U, 0, dev, shared)
            V, self.c_v = normalised_outer(module.V, 1, dev, shared)
            # Outers are derived data (seed or file): non-persistent, so model.state_dict() stays the base's.
            self.register_buffer("U", U, persistent=False)
            self.register_buffer("V", V, persistent=False)
            X, Y = (t.to(dev, torch.float64) for t in (module.X, module.Y))
        self.X = nn.Parameter((X * self.c_u).float())
        self.Y = nn.Parameter((Y * self.c_v).float())
        self.scale = float(module.scale)

    def inner_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(X, Y) in the file's coordinates (for the original outers), float64 on the CPU; for stored
        outers the trained factors (U·X, Y·V), which the file stores as U, V with X = Y = I."""
        X = self.X.detach().to("cpu", torch.float64) / self.c_u
        Y = self.Y.detach().to("cpu", torch.float64) / self.c_v
        return X, Y

    def stored_inners(self) -> tuple[torch.Tensor, torch.Tensor]:
        """X, Y (parameter coordinates) as the forward uses them: rounded as the file will store
        them while `fake_quant` is on (straight-through gradients), else the parameters."""
        if not self.fake_quant or lossless(self.storage):
            return self.X, self.Y
        return fake_quant(self.X, self.c_u, self.storage), fake_quant(self.Y, self.c_v, self.storage)

    def attach_teacher(self, teacher: LoraModule) -> None:
        """Keep the original LoRA pair as frozen buffers for the "teacher" mode."""
        self._check(teacher.out_features, teacher.in_features, f"teacher module {teacher.name!r}")
        dev = self.device
        self.register_buffer("teacher_A", teacher.down.to(dev, torch.float32), persistent=False)
        self.register_buffer("teacher_B", teacher.up.to(dev, torch.float32), persistent=False)
        self.teacher_scale = float(teacher.scale)

    @property
    def has_teacher(self) -> bool:
        return getattr(self, "teacher_A", None) is not None

    def _check(self, out_f: int, in_f: int, what: str) -> None:
        want = base_shape(self.base, self.kind)
        if (out_f, in_f) != tuple(want):
            raise BadInputError(f"{what} is {out_f}×{in_f} but the model's {type(self.base).__name__} "
                                f"at {self.name!r} is {want[0]}×{want[1]} (wrong base model?)")

    def forward(self, x, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        if self.mode == "base":
            return out
        if self.mode == "teacher":
            if not self.has_teacher:
                raise RuntimeError(f"layer {self.name!r} has no teacher attached")
            delta = self.teacher_scale * self._mix(self._down(x, self.teacher_A), self.teacher_B)
        else:
            delta = self.delta(x)
        return out + delta.to(out.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """scale · U X Y V applied to `x` as the base module consumes it (the student's update)."""
        # k×in and out×k (see the module docstring); the scale goes into the out×k factor, not onto
        # the tokens×out product, which saves a full pass over the output and its backward.
        X, Y = self.stored_inners()
        if self.factored:
            down, up = Y / self.c_v, X * (self.scale / self.c_u)
        else:
            down, up = Y @ self.V, self.U @ (X * self.scale)
        return self._mix(self._down(x, down), up)

    def update_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U X, Y V) in the file's coordinates: the update is scale · (U X)(Y V), out×k by k×in."""
        X, Y = self.stored_inners()
        if self.factored:
            return X / self.c_u, Y / self.c_v
        return self.U @ X, Y @ self.V

    def _down(self, x: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        """Apply an r×in down-projection the way the base module consumes its input."""
        if self.kind == "embedding":
            b = self.base
            return F.embedding(x, D.T, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)
        x = x.to(D.dtype) if not torch.is_autocast_enabled(x.device.type) else x
        if self.kind == "conv":
            b = self.base
            kernel = D.reshape(D.shape[0], *b.weight.shape[1:])
            return F.conv2d(x, kernel, None, b.stride, b.padding, b.dilation)
        return F.linear(x, D)

    def _mix(self, h: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """Apply a p×q matrix on the channel axis (last for linear/embedding, 1 for conv)."""
        if self.kind == "conv":
            return F.conv2d(h, M[:, :, None, None])
        return F.linear(h, M)

    def extra_repr(self) -> str:
        k = self.X.shape[1]
        a, b = (k, k) if self.factored else (self.X.shape[0], self.Y.shape[1])
        return f"name={self.name!r}, kind={self.kind}, a={a}, k={k}, b={b}, scale={self.scale:g}, mode={self.mode}"


def normalised_outer(M: torch.Tensor, dim: int, device, shared: dict | None) -> tuple[torch.Tensor, float]:
    """(M / c as float32 on `device`, c) with c = rms_norm(M, dim); reused from `shared` when a tensor
    viewing the same memory was normalised before (regenerated outers are new tensor objects over one
    cached array; the entry keeps that memory alive, so its address is not reused, and outers are
    never modified in place)."""
    key = (M.data_ptr(), tuple(M.shape), tuple(M.stride()), M.dtype, dim, str(device))
    hit = shared.get(key) if shared is not None else None
    if hit is not None:
        return hit[1], hit[2]
    M64 = M.to(device, torch.float64)
    c = rms_norm(M64, dim)
    out = (M64 / c).float()
    if shared is not None:
        shared[key] = (M, out, c)
    return out, c


def rms_norm(M: torch.Tensor, dim: int) -> float:
    """Root-mean-square norm of M's columns (dim=0) or rows (dim=1); 1.0 for an all-zero matrix."""
    n = float(M.pow(2).sum(dim).mean().sqrt())
    return n if n > 0 else 1.0


def pow2_rms(M: torch.Tensor) -> float:
    """The power of two nearest (in log) to the root-mean-square entry of M; 1.0 for an all-zero
    matrix. Dividing by it is exact, so the parameters give back the file's values bit for bit."""
    r = float(M.pow(2).mean().sqrt()) if M.numel() else 0.0
    return float(2.0 ** round(math.log2(r))) if r > 0 and math.isfinite(r) else 1.0


def set_fake_quant(layers: Iterable[MiniLayer], on: bool) -> None:
    for layer in layers:
        layer.fake_quant = on


@contextlib.contextmanager
def _temporarily(layers: Iterable[MiniLayer], attr: str, value) -> Iterator[None]:
    """Every layer's `attr` set to `value` inside the block, each layer's own value restored after."""
    layers = list(layers)
    previous = [getattr(layer, attr) for layer in layers]
    for layer in layers:
        setattr(layer, attr, value)
    try:
        yield
    finally:
        for layer, p in zip(layers, previous):
            setattr(layer, attr, p)


def rounded(layers: Iterable[MiniLayer], on: bool = True):
    """Temporarily run the students with their factors as the file will store them."""
    return _temporarily(layers, "fake_quant", on)


def inner_parameters(layers: Iterable[MiniLayer]) -> list[nn.Parameter]:
    """X and Y of every layer, in a stable order (optimizer and checkpoint state rely on it)."""
    return [p for layer in layers for p in (layer.X, layer.Y)]


def _checked_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def set_mode(layers: Iterable[MiniLayer], mode: str) -> None:
    _checked_mode(mode)
    for layer in layers:
        layer.mode = mode


def use_mode(layers: Iterable[MiniLayer], mode: str):
    """Temporarily run the model as base, teacher or student; restores the previous mode."""
    return _temporarily(layers, "mode", _checked_mode(mode))
