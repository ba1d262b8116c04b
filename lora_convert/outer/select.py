"""Coordinate-subset outers regenerated from a seed: U holds a of the identity's columns (out×a)
and V b of its rows (b×in), the coordinates drawn by the random outers' generator
(rng.subset_matrix; docs/CONTAINER.md, "Subset outers"). The inner matrices then act on a
subset of the layer's own input and output coordinates instead of random mixtures of all of
them; trained from scratch with Adam, whose step is per coordinate, that kept more of LoRA's
improvement at equal trainable parameters (benchmarks/README.md, "Training from scratch").
Files store the seed only, exactly as for random outers (same spec fields, source "select").
"""
from __future__ import annotations

from .base import register
from .random import RandomOuter
from .rng import subset_matrix

NAME = "select"

register(RandomOuter(NAME, subset_matrix))
