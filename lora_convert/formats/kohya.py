"""kohya-ss / A1111 / ComfyUI single-file LoRA (SD1.x/2.x, SDXL, Flux).

Keys: ``<stem>.lora_down.weight`` (r×in, or r×in×kh×kw for conv), ``<stem>.lora_up.weight``
(out×r, or out×r×1×1), optional ``<stem>.alpha`` (missing: alpha = r, scale 1) and, for LoCon
with a Tucker core, ``<stem>.lora_mid.weight`` (r×r×kh×kw, down then 1×1). Stems are
underscored module paths under ``lora_unet_`` / ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` /
``lora_te3_``; in memory they are dotted paths (see naming.py). ``ss_*`` metadata is kept and
the rank/alpha entries updated on write.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..adapter import Adapter, LoraModule
from ..errors import BadInputError, UnsupportedError
from ..st import DTYPE_NAMES, LazyTensors, StreamingWriter, require_finite, tensor_buffer
from . import flux, naming
from ._util import (check_kernel_known, check_no_passthrough, is_safetensors_file, most_common, safetensors_keys,
                    scalar_tensor, unknown_keys_error)
from .base import AdapterHeader, FunctionFormat, ModuleHeader, register

if TYPE_CHECKING:
    import torch

NAME = "kohya"
LABEL = "kohya/A1111/ComfyUI LoRA"
OUTPUT_IS_DIR = False
ROLES = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha")
_KEY = re.compile(r"^(?P<stem>lora_(?:unet|te\d?)_[^.]+)\.(?P<role>lora_down\.weight|lora_up\.weight|"
                  r"lora_mid\.weight|alpha|dora_scale)$")
# ComfyUI's own naming: dotted model paths under diffusion_model. / text_encoders.clip_l.transformer.
# (ai-toolkit writes lora_A/lora_B there); read as kohya files.
_COMFY_KEY = re.compile(r"^(?P<stem>(?:diffusion_model|text_encoders\.clip_[lg]\.transformer)\..+?)\.(?P<role>"
                        r"lora_down\.weight|lora_up\.weight|lora_mid\.weight|lora_A\.weight|lora_B\.weight|alpha|"
                        r"dora_scale)$")
_COMFY_ROLE = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
LYCORIS_MARK = re.compile(r"\.(hada_|lokr_)")


def detect(path: Path) -> bool:
    """A .safetensors file with kohya LoRA pairs and no LyCORIS (LoHa/LoKr) tensors."""
    if not is_safetensors_file(path):
        return False
    keys = safetensors_keys(path)
    return any((_KEY.match(k) or _COMFY_KEY.match(k)) and k.endswith((".lora_down.weight", ".lora_A.weight"))
               for k in keys) and not any(LYCORIS_MARK.search(k) for k in keys)


def label(adapter: Adapter) -> str:
    return f"kohya ({adapter.config.get('variant', '?')})"


def index_keys(keys, path) -> tuple[dict, dict, list]:
    """stem -> {role: key} for kohya LoRA keys; name map stem -> in-memory name; unclaimed keys."""
    entries, names, rest = {}, {}, []
    for key in keys:
        m = _KEY.match(key) or _COMFY_KEY.match(key)
        if not m:
            rest.append(key)
            continue
        if m.group("role") == "dora_scale":
            raise UnsupportedError(f"module {m.group('stem')!r} is DoRA (dora_scale); DoRA is not supported yet", path)
        role = _COMFY_ROLE.get(m.group("role"), m.group("role"))
        if role in entries.get(m.group("stem"), {}):
            raise BadInputError(f"module {m.group('stem')!r} has both lora_down/lora_up and lora_A/lora_B", path)
        entries.setdefault(m.group("stem"), {})[role] = key
    for stem in [s for s, e in entries.items() if set(e) == {"alpha"}]:
        rest.append(entries.pop(stem)["alpha"])  # an alpha without factors belongs to someone else (LyCORIS)
    for stem, entry in entries.items():
        if "lora_down.weight" not in entry or "lora_up.weight" not in entry:
            missing = "lora_down" if "lora_down.weight" not in entry else "lora_up"
            raise BadInputError(f"module {stem!r} is incomplete (missing {missing}.weight)", path)
        names[stem] = to_name(stem, path)
    return entries, names, rest


def to_name(stem: str, path) -> str:
    mapped = naming.kohya_to_module(stem)
    if mapped is None:
        raise BadInputError(f"key stem {stem!r} has no known kohya prefix (or ComfyUI model path)", path)
    return mapped[0]


def check_unique(names: dict, path) -> None:
    seen = {}
    for stem, name in names.items():
        if name in seen:
            raise BadInputError(f"modules {seen[name]!r} and {stem!r} name the same layer ({name})", path)
        seen[name] = stem


def _open(path: Path):
    """(tensors, stem -> {role: key}, in-memory name -> stem, config)."""
    path = Path(path)
    lazy = LazyTensors(path)
    entries, names, rest = index_keys(lazy.keys(), path)
    if rest:
        raise unknown_keys_error(rest, "kohya LoRA factors (lora_down/lora_up/lora_mid/alpha)", path)
    if not entries:
        raise BadInputError("no LoRA modules found", path)
    check_unique(names, path)
    by_name = {names[s]: s for s in entries}
    te_prefixes = sorted({naming.kohya_to_module(s)[1] for s in entries if s.startswith("lora_te")})
    return lazy, entries, by_name, {"variant": naming.variant_of(by_name, lazy.metadata), "te_prefixes": te_prefixes}


def read(path: Path, **_) -> Adapter:
    """Read a kohya LoRA file lazily."""
    lazy, entries, by_name, config = _open(path)

    def load(name: str) -> LoraModule:
        return load_module(lazy, name, entries[by_name[name]])

    return Adapter(format=NAME, module_names=sorted(by_name), load_module=load, config=config,
                   metadata=dict(lazy.metadata), source=str(Path(path)))


def scan(path: Path, **_) -> AdapterHeader:
    """read() and loading every module, without making tensors."""
    lazy, entries, by_name, config = _open(path)
    return AdapterHeader(format=NAME, module_names=sorted(by_name), config=config, metadata=dict(lazy.metadata),
                         modules=(scan_module(lazy, n, entries[by_name[n]]) for n in sorted(by_name)),
                         source=str(Path(path)))


def scan_module(lazy: LazyTensors, name: str, entry: dict) -> ModuleHeader:
    """load_module's checks on the stored bytes; a Tucker core is folded (numpy, float64) only to
    check that the folded factor is finite, as formats.read checks every converted factor."""
    for role in ROLES:
        if role in entry:
            lazy.require_finite(entry[role], f"module {name!r} {role}")
    shapes = {role: lazy.shape(key) for role, key in entry.items()}
    alpha = lazy.array(entry["alpha"]) if "alpha" in entry else None
    h = module_header(name, shapes, alpha, _down_dtype(lazy.dtype(entry["lora_down.weight"]), "lora_mid.weight" in entry),
                      lazy.path)
    if "lora_mid.weight" in entry:
        import numpy as np

        mid, down = lazy.array(entry["lora_mid.weight"]), lazy.array(entry["lora_down.weight"])
        with np.errstate(over="ignore", invalid="ignore"):
            folded = np.einsum("abhw,bi->aihw", mid, down[:, :, 0, 0]).astype(np.float32 if h.dtype == "float32" else
                                                                             np.float64)
        if not np.isfinite(folded).all():
            raise BadInputError(f"module {name!r} down factor (as converted) contains NaN or Inf values", lazy.path)
    return h


def _down_dtype(code: str, tucker: bool) -> str:
    """Torch's name for the in-memory down factor's dtype: a Tucker fold promotes it to at least float32."""
    return ("float64" if code == "F64" else "float32") if tucker else DTYPE_NAMES[code]


def load_module(lazy: LazyTensors, name: str, entry: dict) -> LoraModule:
    """One kohya/LoCon module; a Tucker core is folded into down (exact: the three convs compose)."""
    def get(role):
        return require_finite(lazy.get(entry[role]), f"module {name!r} {role}", lazy.path)

    t = {role: get(role) for role in ROLES if role in entry}
    down, up = t["lora_down.weight"], t["lora_up.weight"]
    h = module_header(name, {role: tuple(v.shape) for role, v in t.items()}, t.get("alpha"), None, lazy.path)
    if "lora_mid.weight" in entry:
        down = fold_tucker(down, t["lora_mid.weight"])
    return LoraModule(name=name, down=down.reshape(h.rank, -1), up=up.reshape(h.out_features, h.rank), alpha=h.alpha,
                      kind=h.kind, kernel=h.kernel)


def module_header(name: str, shapes: dict, alpha, dtype: str | None, path) -> ModuleHeader:
    """A kohya module from its tensors' shapes (role -> shape) and alpha (a tensor or array, or
    None): the factors checked to form a low-rank pair, a Tucker core to fit lora_down."""
    down, up = shapes["lora_down.weight"], shapes["lora_up.weight"]
    if "lora_mid.weight" in shapes:
        mid = shapes["lora_mid.weight"]
        if len(down) != 4 or len(mid) != 4 or tuple(down[2:]) != (1, 1) or mid[1] != down[0]:
            raise BadInputError(f"module {name!r}: lora_mid {mid} does not fit lora_down {down}", path)
        down = (mid[0], down[1], *mid[2:])  # the folded down: r × in × kh × kw
    r = down[0]
    if len(down) not in (2, 4) or len(up) != len(down) or up[1] != r or r == 0:
        raise BadInputError(f"module {name!r}: lora_down {down} and lora_up {up} "
                            "do not form a low-rank pair", path)
    if alpha is not None:
        if math.prod(shapes["alpha"]) != 1:
            raise BadInputError(f"module {name!r}: .alpha must be a scalar, got shape {shapes['alpha']}", path)
        alpha = float(alpha.reshape(()))
    if len(up) == 4 and tuple(up[2:]) != (1, 1):
        raise UnsupportedError(f"module {name!r}: lora_up with a {tuple(up[2:])} kernel is not supported "
                               "(expected 1x1)", path)
    kind, kernel = ("conv", {"down_shape": list(down), "up_shape": list(up)}) if len(down) == 4 else ("linear", {})
    return ModuleHeader(name=name, kind=kind, kernel=kernel, rank=r, out_features=up[0],
                        in_features=math.prod(down[1:]), alpha=float(r) if alpha is None else alpha,
                        use_rslora=False, dtype=dtype or "")


def fold_tucker(down: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """LoCon Tucker: x -> 1x1 conv (down, r×in) -> kh×kw conv (mid, r×r) -> 1x1 conv (up).
    The first two compose into one kh×kw conv r×in: down'[a,i] = Σ_b mid[a,b] down[b,i]
    (module_header checked the shapes)."""
    import torch

    dtype = torch.promote_types(down.dtype, torch.float32)
    return torch.einsum("abhw,bi->aihw", mid.to(torch.float64), down[:, :, 0, 0].to(torch.float64)).to(dtype)


# ---------------------------------------------------------------- writing

def target_variant(adapter: Adapter) -> str:
    if adapter.format in (NAME, "lycoris") and adapter.config.get("variant"):
        return adapter.config["variant"]
    return naming.variant_of(adapter.module_names, adapter.metadata)


def kernel_factors(m: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) in their layer's shape: conv kernels restored from `kernel`."""
    if m.kind == "embedding":
        raise UnsupportedError(f"module {m.name!r} is an embedding; the kohya layout has no embedding LoRA")
    if m.kind == "conv":
        down = m.down.reshape([m.rank, *m.kernel["down_shape"][1:]])
        up = m.up.reshape([m.out_features, m.rank, *m.kernel["up_shape"][2:]])
        return down.contiguous(), up.contiguous()
    return m.down.contiguous(), m.up.contiguous()


class HashingWriter(StreamingWriter):
    """StreamingWriter that also hashes the data buffer, for A1111's sshs_model_hash."""

    def __init__(self, path):
        super().__init__(path)
        self.sha256 = hashlib.sha256()

    def add(self, name, tensor):
        super().add(name, tensor)
        self.sha256.update(tensor_buffer(tensor))


def lycoris_named(adapter: Adapter) -> bool:
    """Whether the adapter came from a file in LyCORIS's own naming (``lycoris_<module path>``,
    what create_lycoris writes for any torch model): written back the same way."""
    return adapter.format == "lycoris" and adapter.config.get("naming") == "lycoris"


def write(adapter: Adapter, dest: Path, note=None) -> None:
    """Write one kohya .safetensors file; alpha per module keeps every scale (rsLoRA folded into alpha)."""
    check_no_passthrough(adapter, NAME)
    variant = target_variant(adapter)
    if variant == "Flux" and flux.needs_fusion(adapter.module_names):
        adapter = flux.to_bfl(adapter)  # kohya's Flux layout has BFL names and fused qkv
    own = lycoris_named(adapter)
    stats = {"linear": [], "conv": []}
    seen = {}
    with HashingWriter(dest) as writer:
        for m in adapter.modules():
            check_kernel_known(adapter, m)
            stem = "lycoris_" + m.name.replace(".", "_") if own else naming.module_to_kohya(m.name, variant)
            if stem in seen:
                raise UnsupportedError(f"modules {seen[stem]!r} and {m.name!r} both map to kohya key {stem!r}")
            seen[stem] = m.name
            down, up = kernel_factors(m)
            alpha = m.scale * m.rank if m.use_rslora else m.alpha  # kohya always divides by r
            writer.add(f"{stem}.lora_down.weight", down)
            writer.add(f"{stem}.lora_up.weight", up)
            writer.add(f"{stem}.alpha", scalar_tensor(alpha))
            stats["conv" if m.kind == "conv" else "linear"].append((m.rank, alpha))
        note = note() if callable(note) else note  # callers may only know it once modules are loaded
        writer.finish(updated_metadata(adapter, variant, stats, writer.sha256.hexdigest(), note))


def updated_metadata(adapter: Adapter, variant: str, stats: dict, data_hash: str, note: dict | None) -> dict:
    """Source ss_* metadata with rank/alpha entries rewritten to what the file now holds."""
    keep = adapter.format in (NAME, "lycoris")
    meta = {k: v for k, v in adapter.metadata.items() if keep and isinstance(v, str)}
    meta.pop("sshs_legacy_hash", None)  # a hash of the old file's bytes; it would be wrong now
    if meta.get("ss_network_module", "").startswith("lycoris") or "ss_network_module" not in meta:
        meta["ss_network_module"] = "networks.lora"  # the file now holds plain LoRA (LoCon) pairs
    main = stats["linear"] or stats["conv"]
    if main:
        rank, alpha = most_common(main)
        meta["ss_network_dim"], meta["ss_network_alpha"] = str(rank), _num(alpha)
    args = _network_args(meta)
    if stats["conv"]:
        rank, alpha = most_common(stats["conv"])
        args.update(conv_dim=str(rank), conv_alpha=_num(alpha))
    for k in ("algo", "use_tucker", "use_cp", "factor", "decompose_both"):
        args.pop(k, None)
    if args or "ss_network_args" in meta:
        meta["ss_network_args"] = json.dumps(args)
    meta["sshs_model_hash"] = data_hash
    if "ss_base_model_version" not in meta:
        meta["ss_base_model_version"] = {"SDXL": "sdxl_base_v1-0", "Flux": "flux1"}.get(variant, "sd_v1")
    if note:
        meta["lora_convert"] = json.dumps(note, sort_keys=True)
    return meta


def _network_args(meta: dict) -> dict:
    try:
        args = json.loads(meta.get("ss_network_args") or "{}")
    except ValueError:
        return {}
    return args if isinstance(args, dict) else {}


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


register(FunctionFormat(NAME, LABEL, detect, read, write, scan=scan, describe=label, output_is_dir=OUTPUT_IS_DIR))
