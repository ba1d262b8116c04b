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
import math
import re
from pathlib import Path

from ..adapter import Adapter, LoraModule
from ..errors import BadInputError, UnsupportedError
from ..st import DTYPE_NAMES, LazyTensors, StreamingWriter, require_finite
from . import flux, naming
from ._util import (check_kernel_known, check_no_passthrough, fold_scale, is_safetensors_file, most_common, safetensors_keys,
                    unknown_keys_error)
from .base import AdapterHeader, FunctionFormat, ModuleHeader, register
from .peft import factor_kind, module_rank_alpha

NAME = "diffusers"
LABEL = "diffusers LoRA"
OUTPUT_IS_DIR = False
WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
_COMP = r"(?P<comp>unet|transformer|text_encoder(?:_[23])?|prior)"
_KEY = re.compile(r"^" + _COMP + r"\.(?P<path>.+?)\.(?P<role>lora_A\.weight|lora_B\.weight|lora\.down\.weight|"
                  r"lora\.up\.weight|alpha)$")
# diffusers' model-level API (``model.save_lora_adapter()``, loaded by ``load_lora_adapter(...,
# prefix=None)``): PEFT keys relative to the model, no component, and a flat LoraConfig as metadata.
_MODEL_KEY = re.compile(r"^(?P<path>.+?)\.(?P<role>lora_A\.weight|lora_B\.weight)$")
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
    component-prefixed lora_A/lora_B (or lora.down/lora.up) factors; or model-level factors
    (``save_lora_adapter``) where the file's name or the module paths' roots (a diffusers UNet's
    or transformer's) say diffusers. Other unprefixed lora_A/lora_B files need ``--from diffusers``."""
    file = weights_path(Path(path))
    if file is None:
        return False
    keys = safetensors_keys(file)
    if any((m := _KEY.match(k)) and m.group("role") != "alpha" for k in keys):
        return True
    if not keys or not all(_MODEL_KEY.match(k) for k in keys) or any(k.startswith("base_model.") for k in keys):
        return False
    roots = {k.split(".", 1)[0] for k in keys}
    return file.name == WEIGHTS_FILE or roots <= naming.UNET_ROOTS | naming.TRANSFORMER_ROOTS


def label(adapter: Adapter) -> str:
    comps = sorted({naming.split_component(n)[0] or "model" for n in adapter.module_names})
    level = "model-level: " if adapter.config.get("model_level") else ""
    return f"diffusers LoRA ({level}{', '.join(comps)})"


def _model_level(keys) -> bool:
    """Whether the keys are model-level (no component; what save_lora_adapter writes)."""
    return bool(keys) and not any(_KEY.match(k) for k in keys) and all(_MODEL_KEY.match(k) for k in keys)


def model_level_name(path: str) -> str:
    """In-memory name of a model-level module: the component its root names (unet, transformer),
    else the bare path."""
    component = naming.infer_component(path)
    return f"{component}.{path}" if component in ("unet", "transformer") else path


def _index_model_level(lazy: LazyTensors):
    modules = {}
    for key in lazy.keys():
        m = _MODEL_KEY.match(key)
        modules.setdefault(model_level_name(m.group("path")), {"path": m.group("path")})[
            _FACTOR_ROLE[m.group("role")]] = key
    for name, entry in modules.items():
        if "A" not in entry or "B" not in entry:
            raise BadInputError(f"module {name!r} is incomplete (needs both lora_A and lora_B)", lazy.path)
    return modules


def _index(lazy: LazyTensors):
    if _model_level(lazy.keys()):
        return _index_model_level(lazy)
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


def _open(path: Path):
    """(tensors, module index, component configs, the Adapter's config)."""
    path = Path(path)
    file = weights_path(path)
    if file is None:
        raise BadInputError(f"no {WEIGHTS_FILE} (or .safetensors file) found", path)
    lazy = LazyTensors(file)
    modules = _index(lazy)
    if not modules:
        raise BadInputError("no LoRA modules found", file)
    model_level = _model_level(lazy.keys())
    configs = {None: _model_config(lazy.metadata, file)} if model_level else component_configs(lazy.metadata, file)
    config = {"components": {k: v for k, v in configs.items() if k is not None}}
    if model_level:
        config.update(model_level=True, model_config=configs[None])
    return lazy, modules, configs, config


def read(path: Path, **_) -> Adapter:
    lazy, modules, configs, config = _open(path)

    def load(name: str) -> LoraModule:
        return _load(lazy, name, modules[name], configs)

    return Adapter(format=NAME, module_names=sorted(modules), load_module=load, config=config,
                   metadata=dict(lazy.metadata), source=str(Path(path)))


def scan(path: Path, **_) -> AdapterHeader:
    """read() and loading every module, without making tensors."""
    lazy, modules, configs, config = _open(path)

    def scan_module(name: str) -> ModuleHeader:
        entry = modules[name]
        lazy.require_finite(entry["A"], f"module {name!r} lora_A")
        lazy.require_finite(entry["B"], f"module {name!r} lora_B")
        return module_header(name, entry, configs, lazy.shape(entry["A"]), lazy.shape(entry["B"]),
                             DTYPE_NAMES[lazy.dtype(entry["A"])], lazy.array, lazy.path)

    return AdapterHeader(format=NAME, module_names=sorted(modules), modules=map(scan_module, sorted(modules)),
                         config=config, metadata=dict(lazy.metadata), source=str(Path(path)))


def _model_config(metadata: dict, path) -> dict:
    """The flat LoraConfig that save_lora_adapter stores as lora_adapter_metadata ({} if none)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except ValueError as exc:
        raise BadInputError(f"invalid {METADATA_KEY} JSON ({exc})", path) from None
    if not isinstance(cfg, dict):
        raise BadInputError(f"{METADATA_KEY} is not a JSON object", path)
    return cfg


def _load(lazy: LazyTensors, name: str, entry: dict, configs: dict) -> LoraModule:
    A = require_finite(lazy.get(entry["A"]), f"module {name!r} lora_A", lazy.path)
    B = require_finite(lazy.get(entry["B"]), f"module {name!r} lora_B", lazy.path)
    h = module_header(name, entry, configs, tuple(A.shape), tuple(B.shape), "", lazy.get, lazy.path)
    return LoraModule(name=name, down=A.reshape(h.rank, -1), up=B.reshape(h.out_features, h.rank), alpha=h.alpha,
                      use_rslora=h.use_rslora, kind=h.kind, kernel=h.kernel)


def module_header(name: str, entry: dict, configs: dict, a_shape: tuple, b_shape: tuple, dtype: str, values,
                  path) -> ModuleHeader:
    """A module from its factors' shapes (the PEFT tensor layout: conv factors are 4-D, up is 1x1)
    and its scale (`values(key)`: a stored alpha's values)."""
    r = a_shape[0] if a_shape else 0
    if len(a_shape) < 2 or len(b_shape) != len(a_shape) or b_shape[1] != r or r == 0:
        raise BadInputError(f"module {name!r}: lora_A {a_shape} and lora_B {b_shape} do not form "
                            "a low-rank pair", path)
    kind, kernel = factor_kind(name, a_shape, b_shape, path)
    alpha, rslora = _alpha(name, entry, configs, r, values, path)
    return ModuleHeader(name=name, kind=kind, kernel=kernel, rank=r, out_features=b_shape[0],
                        in_features=math.prod(a_shape[1:]), alpha=alpha, use_rslora=rslora, dtype=dtype)


def _alpha(name, entry, configs, r, values, path) -> tuple[float, bool]:
    if None in configs:  # model-level: one flat config, patterns relative to the model
        comp, mpath, cfg = None, entry["path"], configs[None]
    else:
        comp, mpath = naming.split_component(name)
        cfg = configs.get(comp)
    if "alpha" in entry:
        return float(values(entry["alpha"]).reshape(-1)[0]), bool(cfg and cfg.get("use_rslora"))
    if cfg:
        try:
            cfg_r, alpha = module_rank_alpha(cfg, mpath)
        except (TypeError, ValueError, re.error, RecursionError) as exc:
            raise BadInputError(f"module {name!r}: {METADATA_KEY} r/lora_alpha/patterns are malformed ({exc})",
                                path) from None
        if cfg_r != r:
            raise BadInputError(f"module {name!r}: tensors have rank {r} but {METADATA_KEY} says {cfg_r}", path)
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
        raise UnsupportedError(f"module {name!r} uses Flux's original (BFL) names with no diffusers equivalent")
    return f"{comp}.{path}"


def model_level_paths(adapter: Adapter) -> dict[str, str] | None:
    """Module paths relative to the model when the adapter came from a model-level file
    (save_lora_adapter) and still fits one model: it is written back the same way."""
    if adapter.format != NAME or not adapter.config.get("model_level"):
        return None
    split = {n: naming.split_component(n) for n in adapter.module_names}
    if len({c for c, _ in split.values()}) > 1:
        return None
    return {n: p for n, (_, p) in split.items()}


def write(adapter: Adapter, dest: Path) -> None:
    """Write ``pytorch_lora_weights.safetensors`` (into `dest` when it is a directory): component-
    prefixed keys, or model-level keys for an adapter read from a model-level file."""
    check_no_passthrough(adapter, NAME)
    if flux.needs_split(adapter.module_names):
        adapter = flux.to_diffusers(adapter)  # BFL Flux names (kohya, ComfyUI): split fused qkv as diffusers does
    file = dest / WEIGHTS_FILE if dest.is_dir() else dest
    model_paths = model_level_paths(adapter)
    ranks, folded = {}, 0
    with StreamingWriter(file) as writer:
        for m in adapter.modules():
            check_kernel_known(adapter, m)
            if m.kind == "embedding":
                raise UnsupportedError(f"module {m.name!r} is an embedding; diffusers LoRA files hold none")
            name = model_paths[m.name] if model_paths is not None else diffusers_name(m.name)
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
        writer.finish(_metadata(adapter, ranks, folded, model_paths is not None))


def _lora_config(ranks: dict) -> dict:
    """A LoraConfig (as a dict) for modules path -> rank, alpha = r everywhere."""
    r = most_common(ranks.values())
    pattern = {re.escape(p): v for p, v in ranks.items() if v != r}
    return {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(ranks), "use_rslora": False, "use_dora": False}


def _metadata(adapter: Adapter, ranks: dict, folded: int, model_level: bool = False) -> dict:
    """Per-component LoraConfig (model level: one flat LoraConfig, as save_lora_adapter writes)
    with alpha = r everywhere (the scale now lives in the factors)."""
    flat = {}
    if model_level:
        flat = _lora_config(ranks)
    for comp in [] if model_level else sorted({naming.split_component(n)[0] for n in ranks}):
        mine = {naming.split_component(n)[1]: r for n, r in ranks.items() if naming.split_component(n)[0] == comp}
        flat.update({f"{comp}.{k}": v for k, v in _lora_config(mine).items()})
    meta = {}
    if adapter.format == NAME:  # keep the source's own notes (training info ...), not its stale config
        meta.update({k: v for k, v in adapter.metadata.items() if k != METADATA_KEY})
    meta.update({"format": "pt", METADATA_KEY: json.dumps(flat, indent=2, sort_keys=True),
                 "lora_convert": json.dumps({"scale_folded_into_factors": True, "modules_rescaled": folded,
                                             "note": "each module's alpha/r scale is multiplied into lora_A "
                                                     "and lora_B (sqrt on each); alpha = r"}, sort_keys=True)})
    return meta


register(FunctionFormat(NAME, LABEL, detect, read, write, scan=scan, describe=label, output_is_dir=output_is_dir))
