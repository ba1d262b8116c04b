"""SVD outers: the update's own top singular vectors, stored in the file (near-lossless).

Besides the common interface (see outer/__init__.py) this source provides `inner`: the
optimal inner matrices are known in closed form, so compress need not fit them.
"""
from __future__ import annotations

import numpy as np
import torch

from ..mathcore import Update, choose_rank

NAME = "svd"
STORED = True


def make(module, options: dict, update: Update | None = None):
    update = update or Update(module.up, module.down)
    k = max(choose_rank(update.spectrum, update.energy, options.get("rank"), options.get("keep_energy")), 1)
    U, V = update.singular_vectors(k)
    return U, V, {"source": NAME, "a": k, "b": k}


def inner(update: Update, k: int):
    """The least-squares X, Y for these outers, in closed form: U·diag(S_k)·V is the truncated
    SVD, so X = Y = diag(√S_k) (split evenly, as PEFT's own SVD initialisations do)."""
    root = torch.from_numpy(np.sqrt(update.spectrum[:k]))
    return torch.diag(root), torch.diag(root)


def restore(name: str, spec: dict, out_features: int, in_features: int, tensors, path=None):
    return tensors["U"], tensors["V"]
