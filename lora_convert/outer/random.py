"""Random outers regenerated bit-exactly from a seed: the file stores only the seed."""
from __future__ import annotations

import torch

from ..errors import IntegrityError, UnsupportedError
from .rng import GENERATOR_NAME, GENERATOR_VERSION, fingerprint, random_matrix

NAME = "random"
STORED = False
DEFAULT_OUTER_DIM = 64


def outer_dims(out_features: int, in_features: int, outer_dim) -> tuple[int, int]:
    """(a, b) from --outer-dim (int or pair), capped by the module's dimensions."""
    if outer_dim is None:
        a = b = DEFAULT_OUTER_DIM
    elif isinstance(outer_dim, int):
        a = b = outer_dim
    else:
        a, b = outer_dim
    return min(a, out_features), min(b, in_features)


def generate(name: str, seed: int, out_features: int, in_features: int, a: int, b: int):
    U = random_matrix(seed, name, "U", out_features, a)
    V = random_matrix(seed, name, "V", b, in_features)
    return U, V


def make(module, options: dict):
    a, b = outer_dims(module.out_features, module.in_features, options.get("outer_dim"))
    seed = int(options.get("seed", 0))
    U, V = generate(module.name, seed, module.out_features, module.in_features, a, b)
    spec = {"source": NAME, "generator": GENERATOR_NAME, "generator_version": GENERATOR_VERSION,
            "seed": seed, "a": a, "b": b, "u_sha256": fingerprint(U), "v_sha256": fingerprint(V)}
    return torch.from_numpy(U), torch.from_numpy(V), spec


def restore(name: str, spec: dict, out_features: int, in_features: int, tensors, path=None):
    version = spec.get("generator_version")
    if version != GENERATOR_VERSION or spec.get("generator") != GENERATOR_NAME:
        raise UnsupportedError(f"module {name!r}: random outer generator "
                               f"{spec.get('generator')!r} version {version!r} is not supported "
                               f"(this build has {GENERATOR_NAME} v{GENERATOR_VERSION})", path)
    U, V = generate(name, int(spec["seed"]), out_features, in_features, int(spec["a"]), int(spec["b"]))
    for role, mat in (("u", U), ("v", V)):
        if fingerprint(mat) != spec.get(f"{role}_sha256"):
            raise IntegrityError(f"module {name!r}: regenerated outer {role.upper()} does not match its "
                                 "SHA-256 fingerprint (wrong seed, generator or tampered metadata)", path)
    return torch.from_numpy(U), torch.from_numpy(V)
