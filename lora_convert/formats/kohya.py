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
import re
from pathlib import Path

import torch

from ..adapter import Adapter, LoraModule
from ..errors import BadInputError, UnsupportedError
from ..st import LazyTensors, StreamingWriter, require_finite, tensor_buffer
from . import flux, naming
from ._util import (check_kernel_known, check_no_passthrough, is_safetensors_file, most_common, safetensors_keys,
                    scalar_tensor, unknown_keys_error)
from .base import AdapterFormat, register

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


def read(path: Path, **_) -> Adapter:
    """Read a kohya LoRA file lazily."""
    path = Path(path)
    lazy = LazyTensors(path)
    entries, names, rest = index_keys(lazy.keys(), path)
    if rest:
        raise unknown_keys_error(rest, "kohya LoRA factors (lora_down/lora_up/lora_mid/alpha)", path)
    if not entries:
        raise BadInputError("no LoRA modules found", path)
    check_unique(names, path)
    by_name = {names[s]: s for s in entries}
    variant = naming.variant_of(by_name, lazy.metadata)

    def load(name: str) -> LoraModule:
        return load_module(lazy, name, entries[by_name[name]])

    te_prefixes = sorted({naming.kohya_to_module(s)[1] for s in entries if s.startswith("lora_te")})
    return Adapter(format=NAME, module_names=sorted(by_name), load_module=load,
                   config={"variant": variant, "te_prefixes": te_prefixes}, metadata=dict(lazy.metadata),
                   source=str(path))


def load_module(lazy: LazyTensors, name: str, entry: dict) -> LoraModule:
    """One kohya/LoCon module; a Tucker core is folded into down (exact: the three convs compose)."""
    def get(role):
        return require_finite(lazy.get(entry[role]), f"module {name!r} {role}", lazy.path)

    down, up = get("lora_down.weight"), get("lora_up.weight")
    if "lora_mid.weight" in entry:
        down = fold_tucker(down, get("lora_mid.weight"), name, lazy.path)
    r = down.shape[0]
    if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != r or r == 0:
        raise BadInputError(f"module {name!r}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} "
                            "do not form a low-rank pair", lazy.path)
    alpha = _scalar_alpha(get("alpha"), name, lazy.path) if "alpha" in entry else float(r)
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise UnsupportedError(f"module {name!r}: lora_up with a {tuple(up.shape[2:])} kernel is not supported "
                               "(expected 1x1)", lazy.path)
    kind, kernel = ("conv", {"down_shape": list(down.shape), "up_shape": list(up.shape)}) if down.dim() == 4 \
        else ("linear", {})
    return LoraModule(name=name, down=down.reshape(r, -1), up=up.reshape(up.shape[0], r), alpha=alpha,
                      kind=kind, kernel=kernel)


def fold_tucker(down: torch.Tensor, mid: torch.Tensor, name: str, path) -> torch.Tensor:
    """LoCon Tucker: x -> 1x1 conv (down, r×in) -> kh×kw conv (mid, r×r) -> 1x1 conv (up).
    The first two compose into one kh×kw conv r×in: down'[a,i] = Σ_b mid[a,b] down[b,i]."""
    if down.dim() != 4 or mid.dim() != 4 or tuple(down.shape[2:]) != (1, 1) or mid.shape[1] != down.shape[0]:
        raise BadInputError(f"module {name!r}: lora_mid {tuple(mid.shape)} does not fit lora_down "
                            f"{tuple(down.shape)}", path)
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


def _scalar_alpha(t, name: str, path) -> float:
    if t.numel() != 1:
        raise BadInputError(f"module {name!r}: .alpha must be a scalar, got shape {tuple(t.shape)}", path)
    return float(t.reshape(()))


class KohyaFormat(AdapterFormat):
    """kohya's single-file layout: this module's functions, registered."""

    name, label, output_is_dir = NAME, LABEL, OUTPUT_IS_DIR

    def detect(self, path):
        return detect(path)

    def read(self, path, **options):
        return read(path, **options)

    def write(self, adapter, dest):
        write(adapter, dest)

    def describe(self, adapter):
        return label(adapter)


register(KohyaFormat())
