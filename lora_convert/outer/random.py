"""Random outers regenerated bit-exactly from a seed: the file stores only the seed.

By default files use one generator stream per seed (``"stream": ""``): every module whose U
has the same shape gets the same U, and likewise for V, as VeRA shares its random matrices
across layers. The fit is per module, so sharing costs no accuracy, and a 7B-shaped adapter
needs four distinct outers instead of 448. With ``stream="module"`` in the options (CLI
``--outer-stream module``) each module keys the generator on its own name, as LoRA-Mini's
paper draws independent outers per layer; files without a ``stream`` key were written that
way and are read as such.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import IntegrityError, UnsupportedError
from ..lru import BytesLRU
from .base import OuterSource, register
from .rng import GENERATOR_NAME, GENERATOR_VERSION, fingerprint, random_matrix

if TYPE_CHECKING:  # tensors are made where they are asked for: `inspect` checks fingerprints without torch
    import numpy as np
    import torch

NAME = "random"
STORED = False
DEFAULT_OUTER_DIM = 64
SHARED_STREAM = ""
# float32 outers kept for reuse; a Llama-2-7B-shaped adapter at a=b=64 needs 7.7 MB of them.
_CACHE = BytesLRU(64 << 20, size=lambda v: v[0].nbytes)


def outer_dims(out_features: int, in_features: int, outer_dim) -> tuple[int, int]:
    """(a, b) from --outer-dim (int or pair), capped by the module's dimensions."""
    if outer_dim is None:
        a = b = DEFAULT_OUTER_DIM
    elif isinstance(outer_dim, int):
        a = b = outer_dim
    else:
        a, b = outer_dim
    return min(a, out_features), min(b, in_features)


def outer_array(seed: int, stream: str, role: str, rows: int, cols: int, cache: bool = True,
                matrix=random_matrix) -> tuple[np.ndarray, str]:
    """(matrix as a float32 array, its SHA-256 fingerprint); cached unless `cache` is false (an
    outer used once, as per-module ones are while compressing), so callers must not modify it.
    `matrix`: the generator function (rng.random_matrix, or rng.subset_matrix for `select`)."""
    def make():
        m = matrix(seed, stream, role, rows, cols)
        return m, fingerprint(m)
    return _CACHE.get((matrix.__name__, seed, stream, role, rows, cols), make) if cache else make()


def outer_matrix(seed: int, stream: str, role: str, rows: int, cols: int, cache: bool = True,
                 matrix=random_matrix) -> tuple[torch.Tensor, str]:
    """outer_array as a tensor (sharing the array's memory)."""
    import torch

    m, digest = outer_array(seed, stream, role, rows, cols, cache, matrix)
    return torch.from_numpy(m), digest


def stream_of(name: str, spec: dict) -> str:
    """The generator stream a spec names: its ``stream``, or the module name in older files."""
    return spec.get("stream", name)


STREAMS = ("shared", "module")  # options["stream"]: one stream per seed, or one per module (keyed on its name)


def per_module(options: dict) -> bool:
    return options.get("stream", "shared") == "module"


def make(module, options: dict, source: str = NAME, matrix=random_matrix):
    a, b = outer_dims(module.out_features, module.in_features, options.get("outer_dim"))
    seed = int(options.get("seed", 0))
    shared = not per_module(options)
    stream = SHARED_STREAM if shared else module.name
    U, u_sha = outer_matrix(seed, stream, "U", module.out_features, a, shared, matrix)
    V, v_sha = outer_matrix(seed, stream, "V", b, module.in_features, shared, matrix)
    spec = {"source": source, "generator": GENERATOR_NAME, "generator_version": GENERATOR_VERSION,
            "seed": seed, "stream": stream, "a": a, "b": b, "u_sha256": u_sha, "v_sha256": v_sha}
    return U, V, spec


def make_stack(modules, options: dict, updates=None, scratch=None, source: str = NAME, matrix=random_matrix):
    """make for a stack of same-shaped modules sharing U (out×a) and V (b×in): one stream per
    seed, or a stack of one module with its own stream (see stack_size)."""
    if per_module(options) and len(modules) > 1:
        raise ValueError("per-module outers are fitted one module per stack")
    U, V, spec = make(modules[0], options, source, matrix)
    return U, V, [dict(spec) for _ in modules]


def stack_size(options: dict) -> int | None:
    """Most modules per stack: stacks share one pair of outers, so per-module streams allow one."""
    return 1 if per_module(options) else None


def regenerate(name: str, spec: dict, out_features: int, in_features: int, path=None,
               matrix=random_matrix) -> tuple[np.ndarray, np.ndarray]:
    """A module's outers (U, V) as float32 arrays, checked against their fingerprints."""
    version = spec.get("generator_version")
    if version != GENERATOR_VERSION or spec.get("generator") != GENERATOR_NAME:
        raise UnsupportedError(f"module {name!r}: {spec.get('source', NAME)} outer generator "
                               f"{spec.get('generator')!r} version {version!r} is not supported "
                               f"(this build has {GENERATOR_NAME} v{GENERATOR_VERSION})", path)
    stream, seed = stream_of(name, spec), int(spec["seed"])
    U, u_sha = outer_array(seed, stream, "U", out_features, int(spec["a"]), matrix=matrix)
    V, v_sha = outer_array(seed, stream, "V", int(spec["b"]), in_features, matrix=matrix)
    for role, digest in (("u", u_sha), ("v", v_sha)):
        if digest != spec.get(f"{role}_sha256"):
            raise IntegrityError(f"module {name!r}: regenerated outer {role.upper()} does not match its "
                                 "SHA-256 fingerprint (wrong seed, generator or tampered metadata)", path)
    return U, V


class RandomOuter(OuterSource):
    """Outers regenerated from a seed by `matrix` (rng.py), recorded as source `name`: this
    module's functions, registered as "random"; outer/select.py registers the coordinate subsets."""

    stored = STORED

    def __init__(self, name: str = NAME, matrix=random_matrix):
        self.name, self.matrix = name, matrix

    def make(self, module, options):
        return make(module, options, self.name, self.matrix)

    def make_stack(self, modules, options, updates=None, scratch=None):
        return make_stack(modules, options, updates, scratch, self.name, self.matrix)

    def restore(self, name, spec, out_features, in_features, tensors, path=None):
        import torch

        U, V = regenerate(name, spec, out_features, in_features, path, self.matrix)
        return torch.from_numpy(U), torch.from_numpy(V)

    def check(self, name, spec, out_features, in_features, path=None):
        regenerate(name, spec, out_features, in_features, path, self.matrix)

    def stack_size(self, options):
        return stack_size(options)


register(RandomOuter())
