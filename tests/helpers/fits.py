"""One-module reference fits built on mathcore's stack fit: what the tests compare against."""
from __future__ import annotations

import numpy as np
import torch

from lora_convert.mathcore import InnerFit, OuterBasis, Update, fit_projected_stack


def fit_inner(B, A, U, V, rank: int | None = None, keep_energy: float | None = None) -> InnerFit:
    """Closed-form X, Y minimising ||U X Y V - B A||_F with rank(X Y) <= rank (or keeping
    `keep_energy` of the update's energy): mathcore.fit_projected_stack for one module."""
    upd, ub, vb = Update(B, A), OuterBasis(U), OuterBasis(V.detach().to("cpu", torch.float64).T)
    UtB, AVt = np.asarray(ub.m.T @ upd.B), np.asarray(upd.A @ vb.m)
    return fit_projected_stack(upd.stack, ub, vb, UtB[None], AVt[None], rank, keep_energy)[0]


def svd_outers(B, A, k: int):
    """Top-k singular vectors of B@A as outers: U (out×k), V (k×in), orthonormal."""
    return Update(B, A).singular_vectors(k)
