"""SVD outers: the update's own top singular vectors, stored in the file (near-lossless).

Besides the common interface (see outer/base.py) this source provides `inner_stack`: the
optimal inner matrices are known in closed form, so compress need not fit them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .base import OuterSource, register

if TYPE_CHECKING:  # mathcore (torch) loads when outers are fitted, not when a file's header is read
    from ..mathcore import Updates

NAME = "svd"
STORED = True


def make_stack(modules, options: dict, updates: Updates, scratch=None):
    """Top-k singular vectors of each update as its outers: U (n×out×kmax), V (n×kmax×in),
    float64, orthonormal in their first k_i columns (rows) and zero beyond. `scratch(role,
    shape)`, when given, supplies the float64 tensors to write them into."""
    from ..mathcore import choose_rank

    ks = [max(choose_rank(s, e, options.get("rank"), options.get("keep_energy")), 1)
          for s, e in zip(updates.spectrum, updates.energy)]
    n, out_f, _ = updates.B.shape
    kmax = max(ks)
    out = (scratch("U", (n, out_f, kmax)), scratch("V", (n, kmax, updates.A.shape[2]))) if scratch else None
    U, V = updates.singular_vectors(kmax, out=out)
    for i, k in enumerate(ks):
        U[i, :, k:], V[i, k:] = 0.0, 0.0
    return U, V, [{"source": NAME, "a": k, "b": k} for k in ks]


def inner_stack(updates: Updates, ks: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares X, Y for these outers, in closed form: U·diag(S_k)·V is the truncated
    SVD, so X = Y = diag(√S_k) (split evenly, as PEFT's own SVD initialisations do); zero-padded
    to the stack's largest k."""
    X = np.zeros((len(ks), max(ks), max(ks)))
    for i, k in enumerate(ks):
        X[i, :k, :k] = np.diag(np.sqrt(updates.spectrum[i, :k]))
    return X, X.copy()


def restore(name: str, spec: dict, out_features: int, in_features: int, tensors, path=None):
    return tensors["U"], tensors["V"]


class SvdOuter(OuterSource):
    """The update's own singular vectors, stored: this module's functions, registered."""

    name, stored = NAME, STORED

    def make_stack(self, modules, options, updates, scratch=None):
        return make_stack(modules, options, updates, scratch)

    def restore(self, name, spec, out_features, in_features, tensors, path=None):
        return restore(name, spec, out_features, in_features, tensors, path)

    def inner_stack(self, updates, ks):
        return inner_stack(updates, ks)


register(SvdOuter())
