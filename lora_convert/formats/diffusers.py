"""diffusers LoRA files (``pytorch_lora_weights.safetensors``, as written by ``save_lora_weights``).

Keys: ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight`` (PEFT layout; conv factors
4-D), or the older ``.lora.down.weight`` / ``.lora.up.weight``; components ``unet``,
``transformer``, ``text_encoder``, ``text_encoder_2``, ``text_encoder_3``, ``prior``. Scale comes
from, in order: ``<component>.<module>.alpha`` keys (community conversions of kohya files),
the ``lora_adapter_metadata`` JSON in the safetensors metadata (``<component>.r``,
``<component>.lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``), else scale 1
(alpha = r: what diffusers assumes without either).

Writing folds every module's scale into its factors (√scale on each) and records alpha = r in
``lora_adapter_metadata``: the update is then right in every diffusers version, including those
that ignore the metadata.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..adapter import Adapter, LoraModule
from ..errors import BadInputError, UnsupportedError
from ..st import LazyTensors, StreamingWriter, require_finite
from . import naming
from ._util import (check_kernel_known, check_no_passthrough, fold_scale, is_safetensors_file, most_common, safetensors_keys,
                    unknown_keys_error)
from .peft import module_rank_alpha

NAME = "diffusers"
LABEL = "diffusers LoRA"
OUTPUT_IS_DIR = False
WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
_COMP = r"(?P<comp>unet|transformer|text_encoder(?:_[23])?|prior)"
_KEY = re.compile(r"^" + _COMP + r"\.(?P<path>.+?)\.(?P<role>lora_A\.weight|lora_B\.weight|lora\.down\.weight|"
                  r"lora\.up\.weight|alpha)$")
_FACTOR_ROLE = {"lora_A.weight": "A", "lora.down.weight": "A", "lora_B.weight": "B", "lora.up.weight": "B"}
_UNSUPPORTED = re.compile(r"\.(lora_magnitude_vector|lora_B\.bias|lora_A\.bias)$|\.lokr_|\.hada_")


def output_is_dir(dest) -> bool:
    """A ``.safetensors`` destination is the file itself; anything else is a directory holding
    ``pytorch_lora_weights.safetensors`` (what ``save_lora_weights`` produces)."""
    return Path(dest).suffix != ".safetensors"


def weights_path(path: Path) -> Path | None:
    if path.is_dir():
        return path / WEIGHTS_FILE if (path / WEIGHTS_FILE).is_file() else None
    return path if is_safetensors_file(path) else None


def detect(path: Path) -> bool:
    """A safetensors file (or a directory with pytorch_lora_weights.safetensors) holding
    component-prefixed lora_A/lora_B (or lora.down/lora.up) factors."""
    file = weights_path(Path(path))
    return file is not None and any(
        (m := _KEY.match(k)) and m.group("role") != "alpha" for k in safetensors_keys(file))


def label(adapter: Adapter) -> str:
    comps = sorted({naming.split_component(n)[0] for n in adapter.module_names})
    return f"diffusers LoRA ({', '.join(comps)})"


def _index(lazy: LazyTensors):
    modules, unknown = {}, []
    for key in lazy.keys():
        m = _KEY.match(key)
        if not m:
            if _UNSUPPORTED.search(key):
                raise UnsupportedError(f"tensor {key!r}: DoRA, LoRA bias and LyCORIS keys in diffusers files are "
                                       "not supported", lazy.path)
            unknown.append(key)
            continue
        name = f"{m.group('comp')}.{m.group('path')}"
        role = _FACTOR_ROLE.get(m.group("role"), "alpha")
        modules.setdefault(name, {})[role] = key
    if unknown:
        raise unknown_keys_error(unknown, "diffusers LoRA factors (<component>.<module>.lora_A/lora_B/alpha)",
                                 lazy.path)
    for name, entry in modules.items():
        if "A" not in entry or "B" not in entry:
            raise BadInputError(f"module {name!r} is incomplete (needs both lora_A and lora_B)", lazy.path)
    return modules


def component_configs(metadata: dict, path) -> dict:
    """lora_adapter_metadata -> {component: LoraConfig-like dict}."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError as exc:
        raise BadInputError(f"invalid {METADATA_KEY} JSON ({exc})", path) from None
    if not isinstance(flat, dict):
        raise BadInputError(f"{METADATA_KEY} is not a JSON object", path)
    configs = {}
    for key, value in flat.items():
        comp, _, field = key.partition(".")
        configs.setdefault(comp, {})[field] = value
    return configs


def read(path: Path, **_) -> Adapter:
    path = Path(path)
    file = weights_path(path)
    if file is None:
        raise BadInputError(f"no {WEIGHTS_FILE} (or .safetensors file) found", path)
    lazy = LazyTensors(file)
    modules = _index(lazy)
    if not modules:
        raise BadInputError("no LoRA modules found", file)
    configs = component_configs(lazy.metadata, file)

    def load(name: str) -> LoraModule:
        return _load(lazy, name, modules[name], configs)

    return Adapter(format=NAME, module_names=sorted(modules), load_module=load, config={"components": configs},
                   metadata=dict(lazy.metadata), source=str(path))


def _load(lazy: LazyTensors, name: str, entry: dict, configs: dict) -> LoraModule:
    from .peft import _kind  # the same PEFT tensor layout: conv factors are 4-D, up is 1x1

    A = require_finite(lazy.get(entry["A"]), f"module {name!r} lora_A", lazy.path)
    B = require_finite(lazy.get(entry["B"]), f"module {name!r} lora_B", lazy.path)
    r = A.shape[0]
    if A.dim() < 2 or B.dim() != A.dim() or B.shape[1] != r or r == 0:
        raise BadInputError(f"module {name!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not form "
                            "a low-rank pair", lazy.path)
    kind, kernel = _kind(name, A, B, lazy.path)
    alpha, rslora = _alpha(lazy, name, entry, configs, r)
    return LoraModule(name=name, down=A.reshape(r, -1), up=B.reshape(B.shape[0], r), alpha=alpha,
                      use_rslora=rslora, kind=kind, kernel=kernel)


def _alpha(lazy, name, entry, configs, r) -> tuple[float, bool]:
    comp, path = naming.split_component(name)
    cfg = configs.get(comp)
    if "alpha" in entry:
        return float(lazy.get(entry["alpha"]).reshape(-1)[0]), bool(cfg and cfg.get("use_rslora"))
    if cfg:
        cfg_r, alpha = module_rank_alpha(cfg, path)
        if cfg_r != r:
            raise BadInputError(f"module {name!r}: tensors have rank {r} but {METADATA_KEY} says {cfg_r}",
                                lazy.path)
        return alpha, bool(cfg.get("use_rslora"))
    return float(r), False


# ---------------------------------------------------------------- writing

def diffusers_name(name: str) -> str:
    """In-memory name -> ``<component>.<diffusers module path>``."""
    comp, path = naming.split_component(name)
    if comp is None:
        comp = naming.infer_component(path)
        if comp is None:
            raise UnsupportedError(f"module {name!r} belongs to no pipeline component (unet/transformer/"
                                   "text_encoder); the diffusers layout needs one")
        if path.split(".", 1)[0] in naming.SGM_ROOTS:
            path = naming.sgm_to_diffusers(path)
    if comp == "transformer" and naming.is_bfl_flux(path):
        raise UnsupportedError(f"module {name!r} uses Flux's original (BFL) names with fused qkv; diffusers' "
                               "transformer splits them, which this converter does not do (write kohya instead)")
    return f"{comp}.{path}"


def write(adapter: Adapter, dest: Path) -> None:
    """Write ``pytorch_lora_weights.safetensors`` (into `dest` when it is a directory)."""
    check_no_passthrough(adapter, NAME)
    file = dest / WEIGHTS_FILE if dest.is_dir() else dest
    ranks, folded = {}, 0
    with StreamingWriter(file) as writer:
        for m in adapter.modules():
            check_kernel_known(adapter, m)
            if m.kind == "embedding":
                raise UnsupportedError(f"module {m.name!r} is an embedding; diffusers LoRA files hold none")
            name = diffusers_name(m.name)
            if name in ranks:
                raise UnsupportedError(f"two modules map to the diffusers name {name!r}")
            up, down = fold_scale(m.up, m.down, m.scale)
            folded += m.scale != 1.0
            if m.kind == "conv":
                down = down.reshape([m.rank, *m.kernel["down_shape"][1:]])
                up = up.reshape([m.out_features, m.rank, *m.kernel["up_shape"][2:]])
            writer.add(f"{name}.lora_A.weight", down.contiguous())
            writer.add(f"{name}.lora_B.weight", up.contiguous())
            ranks[name] = m.rank
        writer.finish(_metadata(adapter, ranks, folded))


def _metadata(adapter: Adapter, ranks: dict, folded: int) -> dict:
    """Per-component LoraConfig with alpha = r everywhere (the scale now lives in the factors)."""
    flat = {}
    for comp in sorted({naming.split_component(n)[0] for n in ranks}):
        mine = {naming.split_component(n)[1]: r for n, r in ranks.items() if naming.split_component(n)[0] == comp}
        r = most_common(mine.values())
        pattern = {re.escape(p): v for p, v in mine.items() if v != r}
        cfg = {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
               "target_modules": sorted(mine), "use_rslora": False, "use_dora": False}
        flat.update({f"{comp}.{k}": v for k, v in cfg.items()})
    meta = {}
    if adapter.format == NAME:  # keep the source's own notes (training info ...), not its stale config
        meta.update({k: v for k, v in adapter.metadata.items() if k != METADATA_KEY})
    meta.update({"format": "pt", METADATA_KEY: json.dumps(flat, indent=2, sort_keys=True),
                 "lora_convert": json.dumps({"scale_folded_into_factors": True, "modules_rescaled": folded,
                                             "note": "each module's alpha/r scale is multiplied into lora_A "
                                                     "and lora_B (sqrt on each); alpha = r"}, sort_keys=True)})
    return meta
