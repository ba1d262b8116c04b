"""Sources of the fixed outer matrices U (out×a) and V (b×in), one module each.

Each outer module provides:
    NAME: str
    STORED: bool                       whether U and V are written into the file
    make_stack(modules, options, updates, scratch=None) -> (U, V, specs)   for compression of
        same-shaped modules (updates: their mathcore.Updates); U, V are 2-D when every module
        shares them (out×a, b×in), else stacked per module (n×out×a, n×b×in), float64 and
        written into scratch(role, shape) tensors when given; specs are JSON-able
    restore(name, spec, out_features, in_features, tensors) -> (U, V)   when loading;
        raises IntegrityError when a regenerated matrix does not match its fingerprint
Optional:
    inner_stack(updates, ks) -> (X, Y)  closed-form least-squares inners for these outers
"""
from __future__ import annotations

from ..errors import BadInputError
from . import random as random_outer
from . import svd as svd_outer

REGISTRY = {random_outer.NAME: random_outer, svd_outer.NAME: svd_outer}


def get(name: str):
    try:
        return REGISTRY[name]
    except KeyError:
        raise BadInputError(f"unknown outer source {name!r} (known: {', '.join(REGISTRY)})") from None
