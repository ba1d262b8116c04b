"""One-module reference helpers the tests compare against."""
from __future__ import annotations

from lora_convert.mathcore import Update, fit_inner  # noqa: F401  (re-exported for the tests)


def svd_outers(B, A, k: int):
    """Top-k singular vectors of B@A as outers: U (out×k), V (k×in), orthonormal."""
    return Update(B, A).singular_vectors(k)
