"""PEFT LoRA adapters: a directory with adapter_config.json and adapter_model.safetensors.

Key naming follows PEFT's saved state dict: ``base_model.model.<module>.lora_A.weight`` /
``lora_B.weight`` (Linear and Conv), ``<module>.lora_embedding_A`` / ``_B`` (Embedding),
modules_to_save tensors stored under their original names. Per-module rank and alpha
follow PEFT's own ``rank_pattern`` / ``alpha_pattern`` matching rule.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import signal
import threading
import warnings
import zipfile
from collections import Counter
from pathlib import Path

from ..adapter import Adapter, LoraModule
from ..errors import BadInputError, UnsupportedError
from ..st import DTYPE_NAMES, FLOAT_DTYPES, LazyTensors, StreamingWriter, dtype_name, require_finite
from ._util import check_kernel_known, read_json_config
from .base import AdapterHeader, FunctionFormat, ModuleHeader, register

NAME = "peft"
LABEL = "PEFT LoRA"
OUTPUT_IS_DIR = True
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<mod>.+)\.(?P<kind>lora_A|lora_B)\.weight$|"
                     r"^(?P<emod>.+)\.(?P<ekind>lora_embedding_A|lora_embedding_B)$")
_DORA = re.compile(r"\.lora_magnitude_vector(\.weight)?$")
log = logging.getLogger(__name__)


def detect(path: Path) -> bool:
    # The weights file name alone is PEFT's; a missing config is then reported by read().
    if path.is_file() and path.name in (WEIGHTS_FILE, PICKLE_FILE, CONFIG_FILE):
        path = path.parent
    return path.is_dir() and ((path / WEIGHTS_FILE).is_file() or (path / PICKLE_FILE).is_file())


def pattern_key(patterns, module: str) -> str | None:
    """PEFT's get_pattern_key: the first pattern p with re.match(rf"(.*\\.)?({p})$", module)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def load_config(path: Path) -> dict:
    cfg, cfg_path = read_json_config(path, CONFIG_FILE)
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedError(f"peft_type {peft_type} is not supported yet (only LORA)", cfg_path)
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    if type(r) is not int or r <= 0:
        raise BadInputError(f"r must be a positive integer, got {r!r}", cfg_path)
    if not _finite_number(alpha):
        raise BadInputError(f"lora_alpha must be a finite number, got {alpha!r}", cfg_path)
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise BadInputError(f"{key} must be an object", cfg_path)
        for pattern in cfg.get(key) or {}:
            try:
                re.compile(pattern)
            except (re.error, RecursionError, OverflowError) as exc:
                raise BadInputError(f"{key} entry {pattern!r} is not a valid regular expression ({exc})",
                                    cfg_path) from None
    for mod, rr in (cfg.get("rank_pattern") or {}).items():
        if type(rr) is not int or rr <= 0:
            raise BadInputError(f"rank_pattern[{mod!r}] must be a positive integer, got {rr!r}", cfg_path)
    for mod, aa in (cfg.get("alpha_pattern") or {}).items():
        if not _finite_number(aa):
            raise BadInputError(f"alpha_pattern[{mod!r}] must be a finite number, got {aa!r}", cfg_path)
    mts = cfg.get("modules_to_save")
    if mts is not None and (not isinstance(mts, list) or not all(isinstance(m, str) for m in mts)):
        raise BadInputError(f"modules_to_save must be a list of module names or null, got {mts!r}", cfg_path)
    return cfg


def _finite_number(x) -> bool:
    return type(x) in (int, float) and math.isfinite(x)


PATTERN_TIME_LIMIT_S = 5.0  # all rank/alpha pattern matching of one adapter together


class _PatternTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise _PatternTimeout in the block after `seconds` (CPython's regex engine checks signals,
    so this interrupts catastrophic backtracking). Only in the main thread, when no other
    interval timer is running and SIGALRM's handler is Python's to restore; elsewhere the block
    runs unlimited."""
    usable = (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
              and signal.getitimer(signal.ITIMER_REAL)[0] == 0
              and signal.getsignal(signal.SIGALRM) is not None)  # None: a C handler we could not restore
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise _PatternTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def resolve_patterns(cfg: dict, modules, cfg_path: Path) -> dict[str, tuple[int, float]]:
    """(r, alpha) of every module. Pattern entries that match no module are allowed, as PEFT
    allows them (a config shared by adapters with different targets).

    rank_pattern/alpha_pattern keys are regular expressions from an untrusted file, matched
    against module names from another: the matching runs under a time limit so that a
    catastrophic-backtracking pattern is an error, not a hang."""
    try:
        with _time_limit(PATTERN_TIME_LIMIT_S):
            table = {mod: module_rank_alpha(cfg, mod) for mod in modules}
    except _PatternTimeout:
        raise BadInputError(f"rank_pattern/alpha_pattern matching took too long (over {PATTERN_TIME_LIMIT_S:g} s; "
                            "a catastrophically backtracking regular expression?)", cfg_path) from None
    except RecursionError:
        raise BadInputError("rank_pattern/alpha_pattern regular expression is too complex", cfg_path) from None
    return table


class _Tensors:
    """safetensors (lazy) or, only when allowed, a weights_only torch pickle."""

    def __init__(self, path: Path, allow_pickle: bool):
        st = path / WEIGHTS_FILE
        if st.is_file():
            self.lazy, self.path = LazyTensors(st), st
            self.keys = self.lazy.keys()
            return
        self.path = path / PICKLE_FILE
        if not allow_pickle:
            raise BadInputError(f"{PICKLE_FILE} is a pickle; pass --allow-pickle to load it with "
                                "torch.load(weights_only=True)", self.path)
        self.lazy = None
        _check_pickle_archive(self.path)
        import torch

        try:
            with warnings.catch_warnings():  # torch warns on stderr about odd protocols: one line only
                warnings.simplefilter("ignore")
                state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError, EOFError ...
            raise BadInputError(f"refused to load pickle: torch.load(weights_only=True) rejected it "
                                f"({type(exc).__name__}: {_pickle_reason(exc)})", self.path) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise BadInputError("pickle does not hold a flat dict of tensors", self.path)
        self.state, self.keys = state, list(state)

    def get(self, key: str):
        return self.lazy.get(key) if self.lazy is not None else self.state[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.lazy.shape(key) if self.lazy is not None else tuple(self.state[key].shape)


def _check_pickle_archive(path: Path) -> None:
    """torch.save's zip archives store their entries uncompressed; a compressed one can inflate a
    small file into gigabytes (a zip bomb) before torch checks anything. Refuse those."""
    try:
        if not zipfile.is_zipfile(path):
            return  # the legacy format: tensor bytes are in the file itself
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except Exception as exc:  # zipfile raises BadZipFile, NotImplementedError, struct.error, ...
        raise BadInputError(f"refused to load pickle: unreadable zip archive ({type(exc).__name__}: {exc})",
                            path) from None
    if any(e.compress_type != zipfile.ZIP_STORED for e in entries) or sum(e.file_size for e in entries) > size:
        raise BadInputError("refused to load pickle: its zip archive has compressed or oversized entries "
                            "(a zip bomb?); torch.save writes them uncompressed", path)


def _pickle_reason(exc: Exception) -> str:
    """The informative sentence of torch's weights_only error (not its advice to disable the check)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line.split("WeightsUnpickler error:", 1)[-1].strip() for line in lines]
    for line in lines:
        if line and not line.startswith(("Weights only load failed", "Check the documentation", "Please file an issue",
                                         "(1)", "(2)")):
            return line.split(". ")[0].rstrip(".")[:200]
    return "invalid file"


def _is_passthrough(module_path: str, modules_to_save) -> bool:
    return any(module_path == m or module_path.endswith("." + m) or f".{m}." in f".{module_path}."
               for m in modules_to_save or [])


# PEFT's save_embedding_layers ("auto" when an embedding is a target) saves the targeted
# embedding's base weights beside its factors; loading puts them back into the model.
_BASE_LAYER = re.compile(r"^(?P<mod>.+)\.base_layer\.weight$")


def _index_keys(tensors: _Tensors, cfg: dict):
    """Map module name -> {'A': key, 'B': key, 'emb': bool}; list passthrough keys (modules_to_save,
    and base weights PEFT saved for a LoRA module, which pass through as they are)."""
    modules, passthrough, unknown, base_layers = {}, [], [], []
    for key in tensors.keys:
        if _DORA.search(key):
            mod = _strip(_DORA.sub("", key))
            raise UnsupportedError(f"module {mod!r} is DoRA (lora_magnitude_vector); DoRA is not supported yet",
                                   tensors.path)
        m = _FACTOR.match(key)
        if m:
            mod = _strip(m.group("mod") or m.group("emod"))
            kind = m.group("kind") or m.group("ekind")
            modules.setdefault(mod, {"emb": kind.startswith("lora_embedding")})[kind[-1]] = key
        elif _is_passthrough(_strip(key), cfg.get("modules_to_save")):
            passthrough.append(key)
        elif base := _BASE_LAYER.match(key):
            base_layers.append((key, _strip(base.group("mod"))))
        else:
            unknown.append(key)
    for key, mod in base_layers:  # only once every module is known
        (passthrough if mod in modules else unknown).append(key)
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else "")
        raise BadInputError(f"unknown keys, not LoRA factors or modules_to_save: {shown}", tensors.path)
    for mod, entry in modules.items():
        missing = [f for f in "AB" if f not in entry]
        if missing:
            raise BadInputError(f"module {mod!r} has only one factor (missing lora_{missing[0]})", tensors.path)
    return modules, passthrough


def _strip(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def module_rank_alpha(cfg: dict, module: str) -> tuple[int, float]:
    """r and lora_alpha for `module` under PEFT's pattern rules."""
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rk, ak = pattern_key(rp, module), pattern_key(ap, module)
    r = rp[rk] if rk is not None else cfg.get("r", 8)
    alpha = ap[ak] if ak is not None else cfg.get("lora_alpha", 8)
    return r, float(alpha)


def _open(path: Path, allow_pickle: bool):
    """(directory, config, tensors, module index, passthrough keys, (r, alpha) per module)."""
    path = Path(path)
    if path.is_file() and path.name in (WEIGHTS_FILE, PICKLE_FILE, CONFIG_FILE):
        path = path.parent
    cfg = load_config(path)
    tensors = _Tensors(path, allow_pickle)
    modules, passthrough = _index_keys(tensors, cfg)
    if not modules:
        raise BadInputError("no LoRA modules found", tensors.path)
    return path, cfg, tensors, modules, passthrough, resolve_patterns(cfg, modules, path / CONFIG_FILE)


def read(path: Path, allow_pickle: bool = False, **_) -> Adapter:
    """Read a PEFT LoRA directory lazily (factors load per module)."""
    path, cfg, tensors, modules, passthrough, rank_alpha = _open(path, allow_pickle)

    def load(name: str) -> LoraModule:
        return _load_module(tensors, cfg, name, modules[name], rank_alpha[name])

    return Adapter(format=NAME, module_names=sorted(modules), load_module=load, config=cfg,
                   passthrough_names=passthrough, load_passthrough=tensors.get, source=str(path))


def scan(path: Path, **_) -> AdapterHeader | None:
    """read() and loading every module, without making tensors (None for a pickle: torch reads it)."""
    path = Path(path)
    folder = path.parent if path.is_file() and path.name in (WEIGHTS_FILE, PICKLE_FILE, CONFIG_FILE) else path
    if not (folder / WEIGHTS_FILE).is_file():
        return None
    path, cfg, tensors, modules, passthrough, rank_alpha = _open(path, False)
    lazy = tensors.lazy

    def scan_module(name: str) -> ModuleHeader:
        entry = modules[name]
        for what, key in (("lora_A", entry["A"]), ("lora_B", entry["B"])):
            if lazy.dtype(key) not in FLOAT_DTYPES:
                _not_float(name, what, f"torch.{DTYPE_NAMES[lazy.dtype(key)]}", tensors.path)
            lazy.require_finite(key, f"module {name!r} {what}")
        return module_header(name, lazy.shape(entry["A"]), lazy.shape(entry["B"]), entry["emb"],
                             DTYPE_NAMES[lazy.dtype(entry["A"])], cfg, rank_alpha[name], tensors.path)

    return AdapterHeader(format=NAME, module_names=sorted(modules), modules=map(scan_module, sorted(modules)),
                         config=cfg, passthrough_names=passthrough, source=str(path))


def _not_float(name: str, what: str, dtype, path):
    raise BadInputError(f"module {name!r}: {what} has dtype {dtype}; LoRA factors must be floating point", path)


def _load_module(tensors: _Tensors, cfg: dict, name: str, entry: dict, rank_alpha=None) -> LoraModule:
    A, B = tensors.get(entry["A"]), tensors.get(entry["B"])
    for what, t in (("lora_A", A), ("lora_B", B)):
        if not t.is_floating_point():
            _not_float(name, what, t.dtype, tensors.path)
        require_finite(t, f"module {name!r} {what}", tensors.path)
    h = module_header(name, tuple(A.shape), tuple(B.shape), entry["emb"], dtype_name(A.dtype), cfg, rank_alpha,
                      tensors.path)
    return LoraModule(name=name, down=A.reshape(h.rank, h.in_features), up=B.reshape(h.out_features, h.rank),
                      alpha=h.alpha, use_rslora=h.use_rslora, kind=h.kind, kernel=h.kernel, checked_finite=True)


def module_header(name: str, a_shape: tuple, b_shape: tuple, emb: bool, dtype: str, cfg: dict, rank_alpha,
                  path) -> ModuleHeader:
    """A lora_A/lora_B pair of these shapes checked against each other and the config."""
    r, alpha = rank_alpha or module_rank_alpha(cfg, name)
    if len(a_shape) < 2 or len(b_shape) < 2:
        raise BadInputError(f"module {name!r}: lora_A {a_shape} and lora_B {b_shape} "
                            "do not form a low-rank pair (factors must be at least 2-D)", path)
    kind, kernel = ("embedding", {}) if emb else factor_kind(name, a_shape, b_shape, path)
    down = (a_shape[0], math.prod(a_shape[1:]))
    up = (b_shape[0], math.prod(b_shape[1:]))
    if up[1] != down[0]:
        raise BadInputError(f"module {name!r}: lora_A {a_shape} and lora_B {b_shape} "
                            "do not form a low-rank pair (rank mismatch)", path)
    if down[0] == 0:
        raise BadInputError(f"module {name!r}: rank 0", path)
    if down[1] == 0 or up[0] == 0:
        raise BadInputError(f"module {name!r}: empty factor (lora_A {a_shape}, lora_B {b_shape})", path)
    if down[0] != r:
        raise BadInputError(f"module {name!r}: tensors have rank {down[0]} but the config "
                            f"(r / rank_pattern) says {r}", path)
    return ModuleHeader(name=name, kind=kind, kernel=kernel, rank=down[0], out_features=up[0], in_features=down[1],
                        alpha=alpha, use_rslora=bool(cfg.get("use_rslora")), dtype=dtype)


def factor_kind(name: str, a_shape: tuple, b_shape: tuple, path=None):
    """(kind, kernel) of lora_A/lora_B shapes in PEFT's tensor layout: 2-D linear, or conv with a 1x1 up."""
    if len(a_shape) <= 2 and len(b_shape) <= 2:
        return "linear", {}
    if len(b_shape) > 2 and any(d != 1 for d in b_shape[2:]):
        raise UnsupportedError(f"module {name!r}: conv lora_B with a {tuple(b_shape[2:])} kernel is not supported "
                               "(expected 1x1)", path)
    return "conv", {"down_shape": list(a_shape), "up_shape": list(b_shape)}


# ---------------------------------------------------------------- writing

def build_config(adapter: Adapter, ranks: dict[str, int], alphas: dict[str, float], rslora: bool) -> dict:
    """adapter_config.json for the written modules, reproducing every module's scale exactly."""
    base = dict(adapter.config) if adapter.format == NAME else {}
    if base and all(module_rank_alpha(base, n) == (ranks[n], alphas[n]) for n in ranks) \
            and bool(base.get("use_rslora")) == rslora:
        return base  # the source's own r/alpha/patterns still describe every module exactly
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    cfg = {"peft_type": "LORA", "task_type": base.get("task_type"), "base_model_name_or_path":
           base.get("base_model_name_or_path"), "target_modules": sorted({n.rsplit(".", 1)[-1] for n in ranks}),
           "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False, "inference_mode": True,
           "modules_to_save": None, "init_lora_weights": True, "use_dora": False}
    cfg.update(base)
    cfg.update(r=_int_if_whole(r), lora_alpha=_int_if_whole(alpha), use_rslora=rslora)
    cfg["rank_pattern"] = {_exact(n): v for n, v in ranks.items() if v != r}
    cfg["alpha_pattern"] = {_exact(n): _int_if_whole(v) for n, v in alphas.items() if v != alpha}
    return cfg


def _exact(module: str) -> str:
    # PEFT treats pattern keys as regexes matched at a dot boundary; escaping pins one module.
    return re.escape(module)


def _int_if_whole(x):
    return int(x) if float(x).is_integer() else float(x)


def _write_factors(writer: StreamingWriter, m: LoraModule, path: str) -> None:
    key = PREFIX + path
    if m.kind == "embedding":
        writer.add(f"{key}.lora_embedding_A", m.down.contiguous())
        writer.add(f"{key}.lora_embedding_B", m.up.contiguous())
        return
    down, up = m.down, m.up
    if m.kind == "conv":
        down = down.reshape([m.rank, *m.kernel["down_shape"][1:]])
        up = up.reshape([m.out_features, m.rank, *m.kernel["up_shape"][2:]])
    writer.add(f"{key}.lora_A.weight", down.contiguous())
    writer.add(f"{key}.lora_B.weight", up.contiguous())


def module_paths(names) -> dict[str, str]:
    """PEFT module paths for in-memory names. A diffusion adapter of one component (all ``unet.``)
    drops the prefix so the directory loads onto that model, but only where the path's root names
    the component again on the way back (text_encoder_2 keeps it); nothing is lost."""
    from .naming import infer_component, split_component

    split = {n: split_component(n) for n in names}
    comps = {c for c, _ in split.values()}
    if len(comps) == 1 and None not in comps and all(infer_component(p) == c for c, p in split.values()):
        return {n: p for n, (_, p) in split.items()}
    return {n: n for n in names}


def _header_room(adapter: Adapter, paths: dict[str, str]) -> int:
    """StreamingWriter's `reserve`: room for every tensor's header entry (the writer gives it up
    where the factors turn out too small for the padding to be worth it)."""
    if not paths:
        return 0
    return (2 * len(adapter) + len(adapter.passthrough_names)) * (max(map(len, paths.values())) + 160) + 1024


def write(adapter: Adapter, dest: Path) -> None:
    """Write a PEFT directory into `dest` (a fresh temporary directory).

    Modules that mix rsLoRA and plain scaling (possible from diffusers files with several
    components) are all written plain, rsLoRA ones with alpha = scale·r: same scale exactly."""
    from .naming import split_component

    paths = module_paths(adapter.module_names)
    ranks, alphas, rslora, scales, kinds = {}, {}, {}, {}, {}
    with StreamingWriter(dest / WEIGHTS_FILE, reserve=_header_room(adapter, paths)) as writer:
        for m in adapter.modules():
            check_kernel_known(adapter, m)
            path = paths[m.name]
            _write_factors(writer, m, path)
            ranks[path], alphas[path], rslora[path], scales[path] = m.rank, m.alpha, m.use_rslora, m.scale
            kinds[path] = m.kind
        for name, tensor in adapter.passthrough():
            writer.add(name, tensor)
        writer.finish({"format": "pt"})
    mixed = len(set(rslora.values())) > 1
    if mixed:
        alphas = {p: scales[p] * ranks[p] if rslora[p] else a for p, a in alphas.items()}
    cfg = build_config(adapter, ranks, alphas, not mixed and any(rslora.values()))
    (dest / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if "conv" not in kinds.values() and all(split_component(n)[0] is None for n in paths):
        for line in client_warnings(cfg, ranks):  # language-model adapters: what llama.cpp / vLLM read
            log.warning(f"warning: {line}")


def client_warnings(cfg: dict, ranks: dict[str, int]) -> list[str]:
    """One line per client that would load an adapter with this config wrong: llama.cpp's
    convert_lora_to_gguf.py (one lora_alpha; scale alpha/rank-of-B per module; rsLoRA, r and both
    patterns ignored) and vLLM (one lora_alpha and r for every module, rsLoRA honoured, patterns
    ignored, modules_to_save refused). `ranks` maps each written module path to its rank."""
    lines = []
    alpha_pattern = cfg.get("alpha_pattern") or {}
    odd_alpha = next((n for n in ranks if pattern_key(alpha_pattern, n) is not None), None)
    if odd_alpha is not None or cfg.get("use_rslora"):
        why = (f"module {odd_alpha!r} has its own lora_alpha (alpha_pattern)" if odd_alpha is not None
               else "use_rslora is set (it divides by r, not sqrt(r))")
        lines.append(f"llama.cpp's convert_lora_to_gguf.py would scale this adapter wrong: {why}; for llama.cpp "
                     "reconstruct it with --one-alpha")
    r = cfg.get("r", 8)
    odd_rank = next((n for n, k in ranks.items() if k != r), None)
    if odd_alpha is not None or odd_rank is not None or cfg.get("modules_to_save"):
        why = (f"module {odd_rank!r} has rank {ranks[odd_rank]}, not r={r} (rank_pattern)" if odd_rank is not None
               else f"module {odd_alpha!r} has its own lora_alpha (alpha_pattern)" if odd_alpha is not None
               else f"modules_to_save {cfg['modules_to_save']} is set")
        fix = ("reconstruct without --trim-rank and with --one-alpha" if odd_rank is not None or odd_alpha
               is not None else "drop modules_to_save")
        lines.append(f"vLLM would not load this adapter correctly (one r and lora_alpha for every module, no "
                     f"modules_to_save): {why}; for vLLM {fix}")
    return lines


register(FunctionFormat(NAME, LABEL, detect, read, write, scan=scan, output_is_dir=OUTPUT_IS_DIR,
                           dir_files=(CONFIG_FILE, WEIGHTS_FILE, PICKLE_FILE)))
