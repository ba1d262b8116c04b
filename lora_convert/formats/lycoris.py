"""LyCORIS LoHa and LoKr files, read as equivalent plain LoRA pairs.

LoHa: ΔW = scale · (w1a w1b) ⊙ (w2a w2b), keys ``hada_w1_a`` (out×r), ``hada_w1_b`` (r×in·k·k),
``hada_w2_a/b``; with Tucker cores ``hada_t1/t2`` (r×r×kh×kw) the ``_a`` factors are r×out and
the ``_b`` factors r×in. scale = alpha / r (no alpha: 1).
LoKr: ΔW = scale · kron(w1, w2), each factor full (``lokr_w1``, ``lokr_w2``) or a product
(``lokr_w1_a @ lokr_w1_b``, ``lokr_w2_a @ lokr_w2_b``, Tucker ``lokr_t2``); scale = alpha / r of
the decomposed factor (w2's if both), 1 when neither is decomposed (ComfyUI's rule).

LoRA-Mini needs a low-rank pair, so each module is converted by a factored SVD that never
forms ΔW: a Hadamard product of rank-r1 and rank-r2 products is P Q with P the row-wise
(face-splitting) product of w1a, w2a and Q the column-wise Khatri-Rao product of w1b, w2b
(rank <= r1·r2); the SVD of a Kronecker product is the Kronecker product of the factors' SVDs.
Singular values are kept until the dropped tail is below `lycoris_tol` of the norm; the
measured error of every module is recorded in ``adapter.config["conversion"]`` (and on the
module as ``conversion_error``). Plain LoRA/LoCon modules in the same file are read as kohya's.
The conversion is numpy float64 (factored.py), so `scan` (inspect) makes it without torch and
finds the same modules, errors and refusals as `read`.

Layer kind: Tucker cores and 4-D LoKr factors carry the conv kernel; without them LyCORIS
stores a conv kernel flattened (r × in·kh·kw, also for 1×1 convs), indistinguishable from a
linear factor, so the kind comes from the architecture (naming.layer_kernel: SD1.x/SD2.x/SDXL
UNet layers, text encoders, transformers) or from the caller (`conv_kernels`). Modules that
nothing tells are listed in ``config["kernel_unknown"]`` and every writer refuses them.

Names: kohya's prefixes (``lora_unet_``, ``lora_te1_`` …) or LyCORIS's own ``lycoris_<module path>``
(``create_lycoris`` on any torch model; LoCon pairs included); writing keeps the source's naming
and produces the converted LoRA as LoCon pairs (kohya layout, conv kernels 4-D).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..adapter import Adapter, LoraModule
from ..errors import BadInputError, UnsupportedError
from ..st import LazyTensors
from . import kohya, naming
from ._util import is_safetensors_file, safetensors_keys, unknown_keys_error
from .base import AdapterHeader, FunctionFormat, ModuleHeader, register

if TYPE_CHECKING:
    import numpy as np

# numpy loads when a module is converted, torch only when read() makes its tensors: the registry
# imports every layout to detect one.

NAME = "lycoris"
LABEL = "LyCORIS LoHa/LoKr"
OUTPUT_IS_DIR = False
DEFAULT_TOL = 1e-6
_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a",
          "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha")
_KEY = re.compile(r"^(?P<stem>(?:lora_(?:unet|te\d?)|lycoris)_[^.]+)\.(?P<role>" + "|".join(_ROLES) + r")$")
# LoCon pairs under LyCORIS's own prefix (create_lycoris on any torch model names modules
# lycoris_<module path>); kohya-prefixed LoCon pairs are kohya's (kohya.index_keys).
_LOCON_KEY = re.compile(r"^(?P<stem>lycoris_[^.]+)\.(?P<role>lora_down\.weight|lora_up\.weight|lora_mid\.weight)$")
LYCORIS_PREFIX = "lycoris_"
_UNSUPPORTED = re.compile(r"\.(diff|diff_b|dora_scale|on_input|oft_\w+|ia3_\w+|a1\.weight|w_norm|b_norm)$")


def detect(path: Path) -> bool:
    """A .safetensors file with at least one LoHa or LoKr factor under a kohya/LyCORIS prefix, or
    LoCon pairs under LyCORIS's own ``lycoris_`` prefix."""
    return is_safetensors_file(path) and any(
        ((m := _KEY.match(k)) and m.group("role") != "alpha") or _LOCON_KEY.match(k) for k in safetensors_keys(path))


def label(adapter: Adapter) -> str:
    algos = ", ".join(adapter.config.get("algos", []))
    return f"LyCORIS ({algos}; {adapter.config.get('variant', '?')})"


def read(path: Path, lycoris_tol: float = DEFAULT_TOL, conv_kernels: dict | None = None, **_) -> Adapter:
    """Read LoHa/LoKr (and LoCon) modules lazily, converting each to a LoRA pair when loaded.

    `conv_kernels` maps module names to their layer's kernel, ``(kh, kw)`` for a conv or ``()``
    for a linear layer, where a LoHa/LoKr module without a Tucker core does not say and the
    known architectures (naming.layer_kernel) do not either."""
    lazy, names, load, config = _open(path, lycoris_tol, conv_kernels, kohya.load_module, _Converted.module)
    return Adapter(format=NAME, module_names=names, load_module=load, config=config,
                   metadata=dict(lazy.metadata), source=str(path))


def scan(path: Path, lycoris_tol: float = DEFAULT_TOL, conv_kernels: dict | None = None, **_) -> AdapterHeader:
    """read() and loading every module, without torch (the same conversion, kept as numbers)."""
    lazy, names, header, config = _open(path, lycoris_tol, conv_kernels, kohya.scan_module, _Converted.header)
    return AdapterHeader(format=NAME, module_names=names, modules=(header(n) for n in names),
                         config=config, metadata=dict(lazy.metadata), source=str(path))


def _open(path: Path, lycoris_tol: float, conv_kernels: dict | None, locon, converted):
    """The file indexed and checked as far as the header goes: (lazy, module names, one(name),
    config). one(name) is locon(lazy, name, entry) for a plain LoRA/LoCon module, else the
    LoHa/LoKr module converted (its error recorded in config) and passed to converted(...):
    read() makes LoraModules, scan() ModuleHeaders, by the same path."""
    path = Path(path)
    lazy = LazyTensors(path)
    lora_entries, names, rest = kohya.index_keys(lazy.keys(), path)
    entries, unknown = {}, []
    for key in rest:
        m = _KEY.match(key) or _LOCON_KEY.match(key)
        if m:
            entries.setdefault(m.group("stem"), {})[m.group("role")] = key
        elif _UNSUPPORTED.search(key):
            raise UnsupportedError(f"tensor {key!r}: this LyCORIS algorithm is not supported (LoHa, LoKr, "
                                   "LoCon only)", path)
        else:
            unknown.append(key)
    if unknown:
        raise unknown_keys_error(unknown, "LyCORIS LoHa/LoKr/LoCon factors", path)
    both = sorted(set(entries) & set(lora_entries))
    if both:
        raise BadInputError(f"module {both[0]!r} has both LoRA (lora_down/lora_up) and LoHa/LoKr factors", path)
    for stem in entries:
        names[stem] = kohya.to_name(stem, path)
    kohya.check_unique(names, path)
    algos = {stem: _algo(stem, e, path) for stem, e in entries.items()}
    entries.update(lora_entries)
    algos.update({stem: "LoCon" for stem in lora_entries})
    by_name = {names[s]: s for s in algos}
    own = {s.startswith(LYCORIS_PREFIX) for s in algos}
    if len(own) > 1:
        raise BadInputError("the file mixes LyCORIS's own lycoris_ prefix with kohya's lora_unet_/lora_te_ "
                            "prefixes", path)
    conversion = {"method": "factored SVD (LoHa: face-splitting/Khatri-Rao; LoKr: Kronecker of SVDs)",
                  "tolerance": lycoris_tol, "rel_error": {}}
    kernels = _layer_kernels(lazy, by_name, entries, algos, conv_kernels or {})
    config = {"variant": naming.variant_of(by_name, lazy.metadata), "algos": sorted(set(algos.values())),
              "conversion": conversion, "naming": "lycoris" if own == {True} else "kohya"}
    unknown_kernels = sorted(n for n, k in kernels.items() if k is None)
    if unknown_kernels:
        config["kernel_unknown"] = unknown_kernels  # writers refuse these (see _util.check_kernel_known)

    def one(name: str):
        stem = by_name[name]
        if algos[stem] == "LoCon":
            return locon(lazy, name, entries[stem])
        c = _convert(lazy, name, entries[stem], algos[stem], lycoris_tol, kernels.get(name))
        conversion["rel_error"][name] = c.error
        return converted(c)

    return lazy, sorted(by_name), one, config


def _algo(stem: str, entry: dict, path) -> str:
    roles = set(entry)
    if roles & {"lora_down.weight", "lora_up.weight", "lora_mid.weight"}:
        if roles - {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"}:
            raise BadInputError(f"module {stem!r} has both LoRA (lora_down/lora_up) and LoHa/LoKr factors", path)
        if not {"lora_down.weight", "lora_up.weight"} <= roles:
            missing = "lora_down" if "lora_down.weight" not in roles else "lora_up"
            raise BadInputError(f"module {stem!r} is incomplete (missing {missing}.weight)", path)
        return "LoCon"
    if roles >= {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} and not any(r.startswith("lokr") for r in roles):
        return "LoHa"
    has_w1 = "lokr_w1" in roles or {"lokr_w1_a", "lokr_w1_b"} <= roles
    has_w2 = "lokr_w2" in roles or {"lokr_w2_a", "lokr_w2_b"} <= roles
    if has_w1 and has_w2 and not any(r.startswith("hada") for r in roles):
        return "LoKr"
    raise BadInputError(f"module {stem!r} has an incomplete or mixed LoHa/LoKr factor set: {sorted(roles)}", path)


def _layer_kernels(lazy: LazyTensors, by_name: dict, entries: dict, algos: dict, given: dict) -> dict:
    """name -> the layer kernel of every LoHa/LoKr module whose factors do not keep it (no Tucker
    core, no 4-D full factor): from `given`, else the known architectures; None: unknown."""
    cross = None
    for name, stem in by_name.items():  # the UNet's cross-attention width tells SD1.x from SD2.x
        if name.endswith(".attn2.to_k") or name.endswith("attn2.to_k"):
            cross = _in_width(lazy, entries[stem], algos[stem])
            break
    linear_projection = naming.unet_linear_projection(list(by_name), lazy.metadata, cross)
    kernels = {}
    for name, stem in by_name.items():
        roles = entries[stem]
        if algos[stem] == "LoCon" or {"hada_t1", "lokr_t2"} & set(roles) or any(
                len(lazy.shape(roles[r])) == 4 for r in ("lokr_w1", "lokr_w2") if r in roles):
            continue
        kernel = given[name] if name in given else naming.layer_kernel(name, linear_projection)
        kernels[name] = None if kernel is None else tuple(kernel)
    return kernels


def _in_width(lazy: LazyTensors, entry: dict, algo: str) -> int | None:
    """A module's input width from the header shapes alone (None when they do not say)."""
    def cols(role):
        return lazy.shape(entry[role])[-1] if role in entry else None
    if algo == "LoCon":
        return lazy.shape(entry["lora_down.weight"])[1]
    if algo == "LoHa":
        return cols("hada_w1_b")
    w1 = cols("lokr_w1") or cols("lokr_w1_b")
    w2 = cols("lokr_w2") or cols("lokr_w2_b")
    return w1 * w2 if w1 and w2 and "lokr_t2" not in entry else None


@dataclass
class _Converted:
    """A LoHa/LoKr module as a LoRA pair: float32 factors (up out×k, down k×in) and the
    relative error of the conversion."""

    name: str
    up: np.ndarray
    down: np.ndarray
    alpha: float
    kind: str
    kernel: dict
    error: float

    def module(self) -> LoraModule:
        import torch

        m = LoraModule(name=self.name, down=torch.from_numpy(self.down), up=torch.from_numpy(self.up),
                       alpha=self.alpha, kind=self.kind, kernel=self.kernel, checked_finite=True)
        m.conversion_error = self.error  # LoraModule has no field for it; readers of LyCORIS set this attribute
        return m

    def header(self) -> ModuleHeader:
        return ModuleHeader(name=self.name, kind=self.kind, kernel=self.kernel, rank=self.down.shape[0],
                            out_features=self.up.shape[0], in_features=self.down.shape[1], alpha=self.alpha,
                            use_rslora=False, dtype="float32", conversion_error=self.error)


def _convert(lazy: LazyTensors, name: str, entry: dict, algo: str, tol: float, layer=None) -> _Converted:
    import numpy as np

    values = {}

    def get(role):
        if role not in entry:
            return None
        if role not in values:
            raw = lazy.raw(entry[role])
            lazy.require_finite(entry[role], f"module {name!r} {role}", raw)
            values[role] = lazy.array(entry[role], raw)
        return values[role]

    try:
        with np.errstate(all="ignore"):  # overflow shows as non-finite factors, refused below
            U, S, V, ref, scale, kernel = _loha(get) if algo == "LoHa" else _lokr(get)
            if kernel is None and layer:  # a flattened conv kernel: the layer's kernel comes from the architecture
                width = V.shape[0]
                if width % (layer[0] * layer[1]):
                    raise BadInputError(f"module {name!r}: its factors are {width} wide, not a multiple of the "
                                        f"{layer[0]}x{layer[1]} kernel its layer has", lazy.path)
                kernel = (width // (layer[0] * layer[1]), *layer)
            c = _lora_from_svd(name, U, S, V, ref, scale, kernel, tol)
    except np.linalg.LinAlgError as exc:
        raise BadInputError(f"module {name!r}: factors cannot be decomposed ({str(exc).splitlines()[0][:120]})",
                            lazy.path) from None
    except (ValueError, IndexError) as exc:  # shape mismatches inside einsum, products, reshapes
        raise BadInputError(f"module {name!r}: {algo} factor shapes do not fit ({exc})", lazy.path) from None
    for what, t in (("down", c.down), ("up", c.up)):  # as formats.read checks every converted factor
        if not np.isfinite(t).all():
            raise BadInputError(f"module {name!r} {what} factor (as converted) contains NaN or Inf values", lazy.path)
    return c


def _tucker(t, a, b):
    """Tucker factor (t: r×r×kh×kw, a: r×out, b: r×in) as P (out×r), Q (r×in·kh·kw); kernel (in, kh, kw)."""
    import numpy as np

    Q = np.einsum("ijhw,jq->iqhw", t, b, optimize=True)
    return a.T, Q.reshape(Q.shape[0], -1), tuple(Q.shape[1:])


def _hada_factor(get, n: int):
    a, b, t = get(f"hada_w{n}_a"), get(f"hada_w{n}_b"), get(f"hada_t{n}")
    if t is not None:
        return _tucker(t, a, b)
    return a, b.reshape(b.shape[0], -1), None


def _loha(get):
    from ..factored import factored_svd

    P1, Q1, k1 = _hada_factor(get, 1)
    P2, Q2, k2 = _hada_factor(get, 2)
    if P1.shape[0] != P2.shape[0] or Q1.shape[1] != Q2.shape[1]:
        raise ValueError(f"w1 is {P1.shape[0]}×{Q1.shape[1]} but w2 is {P2.shape[0]}×{Q2.shape[1]}")
    out, r1, r2 = P1.shape[0], P1.shape[1], P2.shape[1]
    P = (P1[:, :, None] * P2[:, None, :]).reshape(out, r1 * r2)  # face-splitting (row-wise Kronecker)
    Q = (Q1[:, None, :] * Q2[None, :, :]).reshape(r1 * r2, -1)  # Khatri-Rao (column-wise Kronecker)
    alpha = get("alpha")
    scale = float(alpha.reshape(-1)[0]) / get("hada_w1_b").shape[0] if alpha is not None else 1.0
    U, S, V = factored_svd(P, Q)
    return U, S, V, (P, Q), scale, k1 or k2


def _lokr_factor(get, n: int):
    """SVD (U, S, V) of w1 or w2 flattened to 2-D, its decomposed rank (None if full), kernel."""
    import numpy as np

    from ..factored import factored_svd

    full, a, b, t = get(f"lokr_w{n}"), get(f"lokr_w{n}_a"), get(f"lokr_w{n}_b"), get(f"lokr_t{n}")
    if full is not None:
        kernel = tuple(full.shape[1:]) if full.ndim == 4 else None
        u, s, vh = np.linalg.svd(full.reshape(full.shape[0], -1), full_matrices=False)
        return (u, s, vh.T), None, kernel
    if t is not None:
        P, Q, kernel = _tucker(t, a, b)
        return factored_svd(P, Q), b.shape[0], kernel
    return factored_svd(a, b.reshape(b.shape[0], -1)), b.shape[0], None


def _lokr(get):
    import numpy as np

    (U1, S1, V1), rank1, _ = _lokr_factor(get, 1)
    (U2, S2, V2), rank2, kernel2 = _lokr_factor(get, 2)
    dim = rank2 if rank2 is not None else rank1
    alpha = get("alpha")
    scale = float(alpha.reshape(-1)[0]) / dim if alpha is not None and dim is not None else 1.0
    # SVD of kron(w1, w2) = kron(U1,U2) · diag(kron(S1,S2)) · kron(V1,V2)ᵀ: exact, nothing dense formed.
    U, S, V = _kron(U1, U2), _kron(S1, S2), _kron(V1, V2)
    order = np.argsort(-S, kind="stable")
    ref = (_kron(U1 * S1, U2 * S2), V.T)
    kernel = None
    if kernel2 is not None:  # in = in1·in2; the kernel belongs to w2's columns
        kernel = (V1.shape[0] * kernel2[0], *kernel2[1:])
    return U[:, order], S[order], V[:, order], ref, scale, kernel


def _kron(a, b):
    """Kronecker product of two vectors or two matrices, by broadcasting."""
    if a.ndim == 1:
        return (a[:, None] * b[None, :]).reshape(-1)
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])


def _lora_from_svd(name, U, S, V, ref, scale, kernel, tol) -> _Converted:
    import numpy as np

    from ..factored import relative_error

    k = _keep(S, tol)
    root = np.sqrt(S[:k])
    up, down = (U[:, :k] * root).astype(np.float32), np.ascontiguousarray((V[:, :k] * root).T, dtype=np.float32)
    err = relative_error(ref[0], ref[1], up, down)
    kind, kern = "linear", {}
    if kernel is not None and len(kernel) == 3:
        kind, kern = "conv", {"down_shape": [k, *kernel], "up_shape": [up.shape[0], k, 1, 1]}
    return _Converted(name=name, up=up, down=down, alpha=scale * k, kind=kind, kernel=kern, error=err)


def _keep(S: np.ndarray, tol: float) -> int:
    """Smallest k whose dropped tail ||S[k:]|| is within tol·||S||."""
    import numpy as np

    energy = S ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 1
    tail = np.cumsum(energy[::-1])[::-1]  # tail[i] = Σ_{j>=i} S_j²
    ok = np.flatnonzero(tail <= (tol ** 2) * total)
    return max(1, int(ok[0]) if ok.size else S.size)


def write(adapter: Adapter, dest: Path) -> None:
    """LoHa/LoKr structure cannot be restored from a LoRA pair: write the converted LoRA in the kohya
    layout (same key names; A1111, ComfyUI and LyCORIS load it; a file in LyCORIS's own lycoris_
    naming keeps it) with conv kernels 4-D, and say so in the metadata."""
    conversion = adapter.config.get("conversion") or {}

    def note():
        errors = conversion.get("rel_error") or {}
        return {"converted_from": "LyCORIS " + "/".join(adapter.config.get("algos", [])),
                "written_as": "plain LoRA (LoCon pairs, LyCORIS naming)" if kohya.lycoris_named(adapter)
                else "plain LoRA (kohya layout)",
                "max_conversion_rel_error": max(errors.values(), default=0.0)}

    kohya.write(adapter, dest, note=note)


register(FunctionFormat(NAME, LABEL, detect, read, write, scan=scan, describe=label, output_is_dir=OUTPUT_IS_DIR))
