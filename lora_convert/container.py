"""The LoRA-Mini container: one safetensors file (docs/CONTAINER.md is the spec).

Tensors: ``<module>.X`` (a×k), ``<module>.Y`` (k×b), and for stored outers
``<module>.U`` (out×a), ``<module>.V`` (b×in); passthrough tensors under
``__passthrough__.<original key>``. The ``__metadata__`` holds ``format``
("lora-mini"), ``format_version`` and ``lora_mini``: a JSON document with the
source format and config, per-module specs and a SHA-256 of every tensor.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import __version__, outer
from .adapter import LazyModules, lora_scale
from .atomic import atomic_output
from .errors import BadInputError, IntegrityError, UnsupportedError
from .report import FidelityReport, ModuleFidelity
from .st import LazyTensors, StreamingWriter, peek, tensor_buffer

FORMAT_NAME = "lora-mini"
FORMAT_VERSION = 1
FILE_NAME = "lora_mini.safetensors"
CONFIG_NAME = "lora_mini_config.json"
PASSTHROUGH = "__passthrough__."
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FACTOR_DTYPES = ("F32", "F16", "BF16")  # what X, Y, U, V may be stored as (docs/CONTAINER.md)
KINDS = ("linear", "conv", "embedding")
# No single matrix a reader materialises from metadata alone (regenerated outers, factors
# zero-padded back to the original rank) may exceed this many elements: a hostile file
# must not be able to make a tiny file allocate terabytes.
MAX_MATRIX_ELEMENTS = 1 << 28  # 268M: 1 GiB as float32; raise with LORA_CONVERT_MAX_ELEMENTS


def max_matrix_elements() -> int:
    try:
        return int(os.environ.get("LORA_CONVERT_MAX_ELEMENTS", MAX_MATRIX_ELEMENTS))
    except ValueError:
        return MAX_MATRIX_ELEMENTS


@dataclass
class MiniModule:
    """One module in LoRA-Mini form: ΔW = scale · U @ X @ Y @ V."""

    name: str
    kind: str
    kernel: dict
    rank: int  # the original LoRA rank (reconstruction restores it)
    alpha: float
    use_rslora: bool
    dtype: str  # original factor dtype, e.g. "float16"
    outer: dict
    U: torch.Tensor
    V: torch.Tensor
    X: torch.Tensor
    Y: torch.Tensor
    fidelity: dict = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.use_rslora)

    @property
    def inner_rank(self) -> int:
        return int(self.X.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.U.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.V.shape[1])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A') = (U @ X, Y @ V) in float64: a rank-k LoRA pair with the same scale."""
        f = torch.float64
        return self.U.to(f) @ self.X.to(f), self.Y.to(f) @ self.V.to(f)

    def spec(self) -> dict:
        return {"kind": self.kind, "kernel": self.kernel, "rank": self.rank, "alpha": self.alpha,
                "use_rslora": self.use_rslora, "dtype": self.dtype, "out_features": self.out_features,
                "in_features": self.in_features, "inner_rank": self.inner_rank, "outer": self.outer,
                "fidelity": self.fidelity}

    def fidelity_row(self) -> ModuleFidelity:
        return ModuleFidelity(self.name, (self.out_features, self.in_features), self.rank, self.inner_rank,
                              self.outer["source"], int(self.outer["a"]), int(self.outer["b"]),
                              _number(self.fidelity.get("rel_error")), _number(self.fidelity.get("energy")) or 0.0,
                              recovered=self.recovered)

    @property
    def recovered(self) -> bool:
        """Whether `lora-convert recover` re-fitted X, Y (it records its step count in the fidelity)."""
        return "recovery_steps" in self.fidelity


@dataclass
class MiniAdapter(LazyModules):
    """A LoRA-Mini adapter, lazy: modules are computed (compress) or loaded (file) on demand."""

    source_format: str
    module_names: list[str]
    load_module: Callable[[str], MiniModule]
    source_config: dict = field(default_factory=dict)
    source_metadata: dict = field(default_factory=dict)
    passthrough_names: list[str] = field(default_factory=list)
    load_passthrough: Callable[[str], torch.Tensor] | None = None
    original_bytes: int | None = None
    source: str = ""
    workers: int = 1  # windows of modules computed or loaded concurrently while iterating
    load_window: Callable[[list[str]], list[MiniModule]] | None = None  # several modules at once (compress)
    window: int = 1  # modules per load_window call


def _number(x) -> float | None:
    """A recorded fidelity figure, or None when absent or not a number (it is informational)."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def sha256_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(tensor_buffer(t)).hexdigest()


METADATA_SHA256 = "lora_mini_sha256"


def metadata_digest(meta: dict, layout: dict) -> str:
    """SHA-256 over everything in the header that is not tensor data (docs/CONTAINER.md).

    Covers ``format``, ``format_version``, the ``lora_mini`` document (module specs, seeds,
    outer fingerprints, tensor checksums) and every tensor's dtype and shape, so that no
    edit of the header can silently change the adapter; the data bytes are covered by
    ``tensor_sha256``. `layout` maps tensor name -> (dtype, shape).
    """
    canon = {"format": meta.get("format"), "format_version": meta.get("format_version"),
             "lora_mini": meta.get("lora_mini"),
             "tensors": {name: [dtype, [int(d) for d in shape]] for name, (dtype, shape) in layout.items()}}
    raw = json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(raw.encode("ascii")).hexdigest()


def _is_dir_target(path: Path) -> bool:
    return path.suffix != ".safetensors"


def save(mini: MiniAdapter, path: str | os.PathLike, progress: Callable[[MiniModule], None] | None = None
         ) -> FidelityReport:
    """Write `mini` atomically to `path` (a directory, or a single ``.safetensors`` file).

    Modules are produced and written one at a time; returns the fidelity report.
    """
    path = Path(path)
    report = FidelityReport(original_bytes=mini.original_bytes)
    with atomic_output(path, _is_dir_target(path)) as tmp:
        file = tmp / FILE_NAME if _is_dir_target(path) else tmp
        specs, hashes = {}, {}
        first, modules = peek(mini.modules())
        with StreamingWriter(file, reserve=_header_room(mini, first)) as writer:
            del first  # the loop holds each module only while it is written
            for m in modules:
                keys = _add_module(writer, m, hashes)
                specs[m.name] = m.spec()
                _check_own_spec(m, specs[m.name], {k: writer.shape(k) for k in keys}, path)
                report.add(m.fidelity_row())
                if progress:
                    progress(m)
            for name, tensor in mini.passthrough():
                key = PASSTHROUGH + name
                hashes[key] = writer.add(key, tensor, digest=True)
            doc = {"source_format": mini.source_format, "source_config": mini.source_config,
                   "source_metadata": mini.source_metadata, "modules": specs,
                   "passthrough": list(mini.passthrough_names), "tensor_sha256": hashes,
                   "original_bytes": mini.original_bytes, "created_by": f"lora_convert {__version__}"}
            meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                    "lora_mini": json.dumps(doc, sort_keys=True, allow_nan=False)}
            meta[METADATA_SHA256] = metadata_digest(meta, writer.layout())
            writer.finish(meta)
        report.compressed_bytes = file.stat().st_size
        if _is_dir_target(path):
            (tmp / CONFIG_NAME).write_text(summary_config(mini, report), encoding="utf-8")
    return report


def summary_config(mini: MiniAdapter, report: FidelityReport) -> str:
    """The text of ``lora_mini_config.json``, the human-readable summary next to the file.

    The same for a fresh save and for a loaded file with its stored fidelity (what push uploads).
    """
    summary = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "file": FILE_NAME,
               "source_format": mini.source_format,
               "base_model_name_or_path": mini.source_config.get("base_model_name_or_path"),
               "outer_sources": sorted({m.outer for m in report.modules}),
               "fidelity": report.summary()}
    return json.dumps(summary, indent=2) + "\n"


def _header_room(mini: MiniAdapter, first: MiniModule | None) -> int:
    """Bytes to keep for the header ahead of the data (StreamingWriter's `reserve`): a generous
    guess from the first module's spec (the writer gives the room up where the data turns out
    too small for the padding to be worth it)."""
    if first is None:
        return 0
    per_module = 2 * len(json.dumps(first.spec())) + 1024  # doubled: the document is escaped into a string
    return len(mini) * per_module + 4 * len(json.dumps(mini.source_config)) + (16 << 10)


def _add_module(writer: StreamingWriter, m: MiniModule, hashes: dict) -> list[str]:
    tensors = {"X": m.X, "Y": m.Y}
    if outer.get(m.outer["source"]).stored:
        tensors.update(U=m.U, V=m.V)
    for role, t in tensors.items():
        hashes[f"{m.name}.{role}"] = writer.add(f"{m.name}.{role}", t, digest=True)
    return [f"{m.name}.{role}" for role in tensors]


def resolve_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise BadInputError(f"no LoRA-Mini file ({FILE_NAME}) found", path.parent if path.name == FILE_NAME else path)
    return path


def is_mini(path: str | os.PathLike) -> bool:
    """True when `path` is (or is a directory holding) a LoRA-Mini file.

    A file named ``lora_mini.safetensors`` counts even when its header is broken, so that
    `load` reports the actual problem instead of "not a recognised layout".
    """
    try:
        file = resolve_file(path)
        return file.name == FILE_NAME or LazyTensors(file).metadata.get("format") == FORMAT_NAME
    except BadInputError:
        return False


def load(path: str | os.PathLike) -> MiniAdapter:
    """Open a LoRA-Mini file lazily; each module is checked when loaded (fingerprints, checksums)."""
    file = resolve_file(path)
    lazy = LazyTensors(file)
    doc = _parse_metadata(lazy)
    specs, hashes = doc["modules"], doc["tensor_sha256"]
    _check_tensor_set(lazy, specs, doc.get("passthrough", []), hashes)

    def checked(key: str) -> torch.Tensor:
        t = lazy.get(key)
        if not isinstance(hashes.get(key), str) or sha256_tensor(t) != hashes[key]:
            raise IntegrityError(f"tensor {key!r} does not match its SHA-256 checksum (corrupt or tampered)", file)
        return t

    shapes = {key: info.shape for key, info in lazy.header.tensors.items()}

    def load_module(name: str) -> MiniModule:
        return _module_from_spec(name, specs[name], checked, file, shapes)

    return MiniAdapter(source_format=doc["source_format"], module_names=list(specs), load_module=load_module,
                       source_config=doc.get("source_config") or {}, source_metadata=doc.get("source_metadata") or {},
                       passthrough_names=list(doc.get("passthrough", [])),
                       load_passthrough=lambda n: checked(PASSTHROUGH + n),
                       original_bytes=doc.get("original_bytes"), source=str(file))


def _parse_metadata(lazy: LazyTensors) -> dict:
    meta, file = lazy.metadata, lazy.path
    if meta.get("format") != FORMAT_NAME:
        raise BadInputError("not a LoRA-Mini file (metadata format is not 'lora-mini')", file)
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise UnsupportedError(f"LoRA-Mini format version {meta.get('format_version')!r} is not supported "
                               f"(this build reads version {FORMAT_VERSION})", file)
    if METADATA_SHA256 not in meta:
        raise IntegrityError(f"LoRA-Mini metadata has no {METADATA_SHA256} checksum", file)
    layout = {name: (info.dtype, info.shape) for name, info in lazy.header.tensors.items()}
    if metadata_digest(meta, layout) != meta[METADATA_SHA256]:
        raise IntegrityError(f"LoRA-Mini metadata does not match its {METADATA_SHA256} checksum (corrupt or "
                             "tampered: module specs, seeds, outer fingerprints, tensor dtypes and shapes "
                             "are all covered)", file)
    try:
        doc = json.loads(meta["lora_mini"])
    except (KeyError, ValueError, RecursionError) as exc:
        raise BadInputError(f"invalid lora_mini metadata ({type(exc).__name__}: {exc})", file) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("modules"), dict) or not isinstance(
            doc.get("tensor_sha256"), dict) or not isinstance(doc.get("source_format"), str):
        raise BadInputError("lora_mini metadata lacks modules, tensor_sha256 or source_format", file)
    if not all(isinstance(v, dict) for v in doc["modules"].values()):
        raise BadInputError("lora_mini metadata: every module spec must be an object", file)
    if not isinstance(doc.get("passthrough", []), list) or not all(isinstance(n, str) for n in doc.get("passthrough", [])):
        raise BadInputError("lora_mini metadata: passthrough must be a list of tensor names", file)
    for key in ("source_config", "source_metadata"):
        if not isinstance(doc.get(key) or {}, dict):
            raise BadInputError(f"lora_mini metadata: {key} must be an object", file)
    ob = doc.get("original_bytes")
    if ob is not None and (type(ob) is not int or ob < 0):
        raise BadInputError("lora_mini metadata: original_bytes must be a non-negative integer", file)
    return doc


def _check_tensor_set(lazy: LazyTensors, specs: dict, passthrough: list, hashes: dict) -> None:
    expected = {PASSTHROUGH + n for n in passthrough}
    for name, spec in specs.items():
        o = spec.get("outer")
        stored = isinstance(o, dict) and o.get("source") in outer.names() and outer.get(o["source"]).stored
        expected.update(f"{name}.{r}" for r in ["X", "Y"] + (["U", "V"] if stored else []))
    for key in expected - {PASSTHROUGH + n for n in passthrough}:
        info = lazy.header.tensors.get(key)
        if info is not None and (info.dtype not in FACTOR_DTYPES or len(info.shape) != 2):
            raise BadInputError(f"tensor {key!r} is {info.dtype} {list(info.shape)}; inner and outer tensors "
                                f"must be 2-D {', '.join(FACTOR_DTYPES)}", lazy.path)
    present = set(lazy.keys())
    if present != expected:
        extra, missing = sorted(present - expected), sorted(expected - present)
        what = f"unexpected tensors {extra[:3]}" if extra else f"missing tensors {missing[:3]}"
        raise BadInputError(f"tensor set does not match the metadata: {what}", lazy.path)
    if set(hashes) != expected or not all(isinstance(h, str) for h in hashes.values()):
        raise BadInputError("tensor_sha256 does not list exactly the file's tensors", lazy.path)


def _pos_int(spec: dict, key: str) -> int:
    v = spec.get(key)
    if type(v) is not int or v <= 0:
        raise ValueError(f"{key} must be a positive integer, got {v!r}")
    return v


def _validate_spec(name: str, spec: dict, shapes: dict) -> None:
    """Check a module spec against itself and the stored tensors' shapes, before anything is
    loaded or generated: every size a reader will allocate is then bounded."""
    if spec.get("kind") not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {spec.get('kind')!r}")
    rank, out_f, in_f, k = (_pos_int(spec, key) for key in ("rank", "out_features", "in_features", "inner_rank"))
    alpha = spec.get("alpha")
    if type(alpha) not in (int, float) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    if type(spec.get("use_rslora")) is not bool:
        raise ValueError(f"use_rslora must be true or false, got {spec.get('use_rslora')!r}")
    if not isinstance(getattr(torch, str(spec.get("dtype")), None), torch.dtype) or \
            not getattr(torch, spec["dtype"]).is_floating_point:
        raise ValueError(f"dtype must name a torch floating-point dtype, got {spec.get('dtype')!r}")
    fid = spec.get("fidelity") or {}
    if not isinstance(fid, dict) or not all(type(v) in (int, float) for v in fid.values()):
        raise ValueError("fidelity must map names to numbers")
    o = spec.get("outer")
    if not isinstance(o, dict):
        raise ValueError("outer must be an object")
    src = outer.get(o.get("source"))
    a, b = _pos_int(o, "a"), _pos_int(o, "b")
    if src.name == "random" and (type(o.get("seed")) is not int or not isinstance(o.get("u_sha256"), str)
                                 or not isinstance(o.get("v_sha256"), str)):
        raise ValueError("random outer needs an integer seed and u_sha256/v_sha256 fingerprints")
    if "stream" in o and not isinstance(o["stream"], str):
        raise ValueError(f"random outer stream must be a string, got {o['stream']!r}")
    want = {"X": (a, k), "Y": (k, b)}
    if src.stored:
        want.update(U=(out_f, a), V=(b, in_f))
    got = {role: tuple(shapes[f"{name}.{role}"]) for role in want}
    if got != want or k > rank:
        raise ValueError(f"shapes {got} do not match the spec (expected {want}, inner rank {k} <= rank {rank})")
    for what, rows, cols in (("U", out_f, a), ("V", b, in_f), ("B", out_f, rank), ("A", rank, in_f)):
        if rows * cols > max_matrix_elements():
            raise ValueError(f"{what} would be {rows}x{cols}, over the limit of {max_matrix_elements()} elements "
                             "(LORA_CONVERT_MAX_ELEMENTS)")
    kernel = spec.get("kernel") or {}
    if not isinstance(kernel, dict):
        raise ValueError("kernel must be an object")
    if spec["kind"] != "conv":
        if kernel:
            raise ValueError(f"kernel must be empty for a {spec['kind']} module")
        return
    down, up = kernel.get("down_shape"), kernel.get("up_shape")
    if not all(isinstance(s, list) and len(s) >= 3 and all(type(d) is int and d > 0 for d in s) for s in (down, up)):
        raise ValueError("conv kernel needs down_shape and up_shape lists of positive integers")
    if down[0] != rank or math.prod(down[1:]) != in_f or up[:2] != [out_f, rank] or math.prod(up[2:]) != 1:
        raise ValueError(f"conv kernel {kernel} does not match out={out_f} in={in_f} rank={rank}")


def _check_own_spec(m: MiniModule, spec: dict, shapes: dict, path: Path) -> None:
    """What save writes, load must accept: refuse (before publishing) a module the reader would."""
    try:
        _validate_spec(m.name, json.loads(json.dumps(spec)), shapes)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise BadInputError(f"module {m.name!r} cannot be stored: {exc}", path) from None


def _module_from_spec(name: str, spec: dict, checked, file: Path, shapes: dict) -> MiniModule:
    try:
        _validate_spec(name, spec, shapes)
        o = spec["outer"]
        src = outer.get(o["source"])
        out_f, in_f = spec["out_features"], spec["in_features"]
        X, Y = checked(f"{name}.X"), checked(f"{name}.Y")
        stored = {r: checked(f"{name}.{r}") for r in ("U", "V")} if src.stored else {}
        U, V = src.restore(name, o, out_f, in_f, stored, file)
        m = MiniModule(name=name, kind=spec["kind"], kernel=spec.get("kernel") or {}, rank=spec["rank"],
                       alpha=float(spec["alpha"]), use_rslora=spec["use_rslora"], dtype=spec["dtype"],
                       outer=o, U=U, V=V, X=X, Y=Y, fidelity=spec.get("fidelity") or {})
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise BadInputError(f"module {name!r}: malformed spec ({type(exc).__name__}: {exc})", file) from None
    _check_shapes(m, file)
    return m


def _check_shapes(m: MiniModule, file: Path) -> None:
    a, b = int(m.outer["a"]), int(m.outer["b"])
    k = m.inner_rank
    ok = (tuple(m.U.shape) == (m.out_features, a) and tuple(m.V.shape) == (b, m.in_features)
          and tuple(m.X.shape) == (a, k) and tuple(m.Y.shape) == (k, b) and 0 < k <= m.rank)
    if not ok:
        raise BadInputError(f"module {m.name!r}: inconsistent shapes U{tuple(m.U.shape)} X{tuple(m.X.shape)} "
                            f"Y{tuple(m.Y.shape)} V{tuple(m.V.shape)} for rank {m.rank}", file)
    if m.rank <= 0 or not all(bool(torch.isfinite(t).all()) for t in (m.X, m.Y)):
        raise BadInputError(f"module {m.name!r}: non-positive rank or non-finite inner values", file)
