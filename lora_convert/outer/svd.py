"""SVD outers: the update's own top singular vectors, stored in the file (near-lossless)."""
from __future__ import annotations

from ..mathcore import choose_rank, factored_svd

NAME = "svd"
STORED = True


def make(module, options: dict):
    u, s, v = factored_svd(module.up, module.down)
    total = float((s**2).sum())
    k = choose_rank(s, total, options.get("rank"), options.get("keep_energy"))
    k = max(k, 1)
    U, V = u[:, :k].contiguous(), v[:, :k].T.contiguous()
    return U, V, {"source": NAME, "a": k, "b": k}


def restore(name: str, spec: dict, out_features: int, in_features: int, tensors, path=None):
    return tensors["U"], tensors["V"]
