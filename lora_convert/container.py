"""The LoRA-Mini container: one safetensors file (docs/CONTAINER.md is the spec).

Tensors: ``<module>.X`` (a×k), ``<module>.Y`` (k×b), and for stored outers
``<module>.U`` (out×a), ``<module>.V`` (b×in); or, for a quantized module (format version 2),
one ``<module>.q`` byte tensor holding its stored factors (lora_convert/quant.py);
passthrough tensors under ``__passthrough__.<original key>``. The ``__metadata__`` holds ``format``
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

from . import __version__, outer, quant
from .outer import random as random_outer
from .adapter import LazyModules, lora_scale
from .atomic import atomic_output
from .errors import BadInputError, IntegrityError, UnsupportedError
from .report import FidelityReport, ModuleFidelity
from .st import TORCH_DTYPE, LazyTensors, StreamingWriter, peek, tensor_buffer

FORMAT_NAME = "lora-mini"
FORMAT_VERSION = 2  # the newest this build reads and writes
READ_VERSIONS = ("1", "2")
# Files without quantized modules are written as version 1, which older readers still read.
PLAIN_VERSION = 1
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
# ... nor all of them together: thousands of modules, each under the cap above, would still buy
# hours of generation from a few kilobytes of header (docs/SECURITY.md).
MAX_TOTAL_ELEMENTS = 1 << 33  # 8.6G: far above a 70B-shaped adapter; LORA_CONVERT_MAX_TOTAL_ELEMENTS


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def max_matrix_elements() -> int:
    return _env_int("LORA_CONVERT_MAX_ELEMENTS", MAX_MATRIX_ELEMENTS)


def max_total_elements() -> int:
    return _env_int("LORA_CONVERT_MAX_TOTAL_ELEMENTS", MAX_TOTAL_ELEMENTS)


def module_spec(kind, kernel, rank, alpha, use_rslora, dtype, out_features, in_features, inner_rank, outer_spec,
                fidelity, quant_spec=None) -> dict:
    """A module's entry in the ``modules`` document (docs/CONTAINER.md)."""
    return {"kind": kind, "kernel": kernel, "rank": rank, "alpha": alpha, "use_rslora": use_rslora, "dtype": dtype,
            "out_features": out_features, "in_features": in_features, "inner_rank": inner_rank,
            "outer": outer_spec, "fidelity": fidelity, **({"quant": quant_spec} if quant_spec else {})}


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
    # {"bits": b, "group": g} when the stored factors are quantized (one ``<name>.q`` tensor);
    # empty: X, Y (and stored U, V) are float tensors of their own
    quant: dict = field(default_factory=dict)

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
        return module_spec(self.kind, self.kernel, self.rank, self.alpha, self.use_rslora, self.dtype,
                           self.out_features, self.in_features, self.inner_rank, self.outer, self.fidelity,
                           self.quant)

    @property
    def bits(self) -> float:
        """Stored bits per value of the factors written for this module (scales included)."""
        if not self.quant:
            return float(8 * self.X.element_size())
        shapes = quantized_shapes(self.outer["source"], self.out_features, self.in_features,
                                  int(self.outer["a"]), int(self.outer["b"]), self.inner_rank)
        return quant.bits_per_value(shapes, self.quant["bits"], self.quant["group"])

    def fidelity_row(self) -> ModuleFidelity:
        return ModuleFidelity(self.name, (self.out_features, self.in_features), self.rank, self.inner_rank,
                              self.outer["source"], int(self.outer["a"]), int(self.outer["b"]),
                              _number(self.fidelity.get("rel_error")), _number(self.fidelity.get("energy")) or 0.0,
                              recovered=self.recovered, bits=self.bits,
                              calibrated_rel_error=_number(self.fidelity.get("calibrated_rel_error")))

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
    max_bytes: int | None = None  # save refuses an output larger than this (compress --target-size)
    format_version: int | None = None  # of the file it was loaded from


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


def save(mini: MiniAdapter, path: str | os.PathLike, progress: Callable[[MiniModule], None] | None = None,
         max_bytes: int | None = None) -> FidelityReport:
    """Write `mini` atomically to `path` (a directory, or a single ``.safetensors`` file).

    Modules are produced and written one at a time; returns the fidelity report. With
    `max_bytes`, an output (all its files) larger than that is refused before it is published.
    """
    path = Path(path)
    max_bytes = mini.max_bytes if max_bytes is None else max_bytes
    report = FidelityReport(original_bytes=mini.original_bytes)
    with atomic_output(path, _is_dir_target(path)) as tmp:
        file = tmp / FILE_NAME if _is_dir_target(path) else tmp
        specs, hashes = {}, {}
        first, modules = peek(mini.modules())
        # a budgeted file gets no header room: its padding would count against the budget
        reserve = 0 if max_bytes is not None else _header_room(mini, first)
        with StreamingWriter(file, reserve=reserve) as writer:
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
            version = FORMAT_VERSION if any("quant" in sp for sp in specs.values()) else PLAIN_VERSION
            defaults, stored_specs = compact_specs(specs) if version >= 2 else ({}, specs)
            doc = {"source_format": mini.source_format, "source_config": mini.source_config,
                   "source_metadata": mini.source_metadata, "modules": stored_specs,
                   **({"module_defaults": defaults} if defaults else {}),
                   "passthrough": list(mini.passthrough_names), "tensor_sha256": hashes,
                   "original_bytes": mini.original_bytes, "created_by": f"lora_convert {__version__}"}
            meta = {"format": FORMAT_NAME, "format_version": str(version),
                    "lora_mini": json.dumps(doc, sort_keys=True, allow_nan=False)}
            meta[METADATA_SHA256] = metadata_digest(meta, writer.layout())
            writer.finish(meta)
        report.compressed_bytes = file.stat().st_size
        if _is_dir_target(path):
            summary = summary_config(mini, version, {s["outer"]["source"] for s in specs.values()}, report.summary())
            (tmp / CONFIG_NAME).write_text(summary, encoding="utf-8")
        if max_bytes is not None:
            written = sum(f.stat().st_size for f in (tmp.iterdir() if _is_dir_target(path) else [tmp]))
            if written > max_bytes:  # raised inside atomic_output: nothing is published
                raise BadInputError(f"the output would be {written:,} bytes, over the budget of {max_bytes:,}",
                                    path)
            report.compressed_bytes = written
    return report


# Spec entries fixed by the source adapter (not by compression choices) that version 2 files
# state once in "module_defaults" when every module has the same value: headers of budgeted
# files are a large share of their bytes.
DEFAULT_KEYS = ("kind", "kernel", "rank", "alpha", "use_rslora", "dtype")


def compact_specs(specs: dict[str, dict]) -> tuple[dict, dict[str, dict]]:
    """(module_defaults, specs without them): the DEFAULT_KEYS whose value all modules share."""
    if not specs:
        return {}, specs
    first = next(iter(specs.values()))
    defaults = {k: first[k] for k in DEFAULT_KEYS
                if k in first and all(k in sp and json.dumps(sp[k]) == json.dumps(first[k]) for sp in specs.values())}
    return defaults, {n: {k: v for k, v in sp.items() if k not in defaults} for n, sp in specs.items()}


def summary_config(mini: MiniAdapter, version: int, outer_sources, fidelity: dict) -> str:
    """The text of ``lora_mini_config.json``, the directory layout's informational summary."""
    summary = {"format": FORMAT_NAME, "format_version": version, "file": FILE_NAME,
               "source_format": mini.source_format,
               "base_model_name_or_path": mini.source_config.get("base_model_name_or_path"),
               "outer_sources": sorted(outer_sources), "fidelity": fidelity}
    return json.dumps(summary, indent=2) + "\n"


# Longest JSON forms of what size_bound cannot know before the fit: a float, a hex digest.
_WORST_FLOAT = -1.2345678901234567e-300
FIDELITY_DIGITS = 6  # significant digits of the (informational) fidelity figures of quantized modules
_WORST_HEX = "f" * 64


def size_bound(mini: MiniAdapter, specs: dict[str, dict], tensors: dict[str, tuple[str, int]], digits: int = 15) -> int:
    """An upper bound on the bytes save() writes for `mini` with these module specs (fidelity
    figures may be placeholders) and tensors (name -> (safetensors dtype, dimensions)) besides
    the passthrough ones, excluding their data: the header is built as save builds it, with every
    number save learns later at its longest, plus the passthrough tensors and the directory
    layout's summary file."""
    big = int("9" * digits)
    short = -1.2345678901234567e-300 if not any("quant" in sp for sp in specs.values()) else \
        float(f"{-1.2345678901234567e-300:.{FIDELITY_DIGITS - 1}e}")
    specs = {n: {**sp, "fidelity": {k: short for k in ("rel_error", "energy")}} for n, sp in specs.items()}
    entries, hashes, data = {}, {}, 0
    tensors = dict(tensors)
    for name, tensor in mini.passthrough():
        tensors[PASSTHROUGH + name] = (TORCH_DTYPE[tensor.dtype], tensor.dim())
        data += tensor.numel() * tensor.element_size()
    for key, (dtype, ndim) in tensors.items():
        entries[key] = {"dtype": dtype, "shape": [big] * ndim, "data_offsets": [big, big]}
        hashes[key] = _WORST_HEX
    defaults, specs = compact_specs(specs) if any("quant" in sp for sp in specs.values()) else ({}, specs)
    doc = {"source_format": mini.source_format, "source_config": mini.source_config,
           "source_metadata": mini.source_metadata, "modules": specs, "passthrough": list(mini.passthrough_names),
           **({"module_defaults": defaults} if defaults else {}),
           "tensor_sha256": hashes, "original_bytes": mini.original_bytes,
           "created_by": f"lora_convert {__version__}"}
    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
            "lora_mini": json.dumps(doc, sort_keys=True, allow_nan=False), METADATA_SHA256: _WORST_HEX}
    header = len(json.dumps({"__metadata__": meta, **entries}, separators=(",", ":")).encode("utf-8"))
    summary = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "file": FILE_NAME,
               "source_format": mini.source_format,
               "base_model_name_or_path": mini.source_config.get("base_model_name_or_path"),
               "outer_sources": sorted(outer.names()),
               "fidelity": {"modules": big, "rel_error": _WORST_FLOAT, "retained_energy": _WORST_FLOAT,
                            "worst_module": max(specs, key=len, default=""), "worst_rel_error": _WORST_FLOAT,
                            "modules_without_fidelity": big, "low_energy": False, "recovered": False,
                            "original_bytes": big, "compressed_bytes": big, "ratio": _WORST_FLOAT}}
    return 8 + header + 7 + data + len(json.dumps(summary, indent=2)) + 1


def _header_room(mini: MiniAdapter, first: MiniModule | None) -> int:
    """Bytes to keep for the header ahead of the data (StreamingWriter's `reserve`): a generous
    guess from the first module's spec (the writer gives the room up where the data turns out
    too small for the padding to be worth it)."""
    if first is None:
        return 0
    per_module = 2 * len(json.dumps(first.spec())) + 1024  # doubled: the document is escaped into a string
    return len(mini) * per_module + 4 * len(json.dumps(mini.source_config)) + (16 << 10)


def quantized_shapes(source: str, out_f: int, in_f: int, a: int, b: int, k: int) -> list[tuple[int, int]]:
    """Shapes of the factors a quantized module's ``.q`` tensor holds, in order: stored outers
    hold U (out×k) and V (k×in) with the inner matrices folded in (X = Y = I, a = b = k);
    regenerated outers leave X (a×k) and Y (k×b) to store."""
    return [(out_f, k), (k, in_f)] if outer.get(source).stored else [(a, k), (k, b)]


def quantized_blob(m: MiniModule) -> bytes:
    """The ``.q`` bytes of a quantized module, encoded from its tensors as they are now (a
    module whose inner matrices were changed, e.g. by recover, is folded and re-quantized; the
    values that came from a file encode back to the same bytes)."""
    f = torch.float64
    if outer.get(m.outer["source"]).stored:
        k = m.inner_rank
        eye = torch.eye(k, dtype=f)
        same = (m.X.shape == (k, k) and m.Y.shape == (k, k)
                and torch.equal(m.X.to(f), eye) and torch.equal(m.Y.to(f), eye))
        mats = [m.U.to(f), m.V.to(f)] if same else [m.U.to(f) @ m.X.to(f), m.Y.to(f) @ m.V.to(f)]
    else:
        mats = [m.X.to(f), m.Y.to(f)]
    raw, _ = quant.encode_many([t.numpy() for t in mats], m.quant["bits"], m.quant["group"])
    return raw


def _add_module(writer: StreamingWriter, m: MiniModule, hashes: dict) -> list[str]:
    if m.quant:
        key = f"{m.name}.q"
        blob = torch.frombuffer(bytearray(quantized_blob(m)), dtype=torch.uint8)
        hashes[key] = writer.add(key, blob, digest=True)
        return [key]
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
    _check_total_work(specs, file)

    def load_module(name: str) -> MiniModule:
        return _module_from_spec(name, specs[name], checked, file, shapes)

    return MiniAdapter(source_format=doc["source_format"], module_names=list(specs), load_module=load_module,
                       source_config=doc.get("source_config") or {}, source_metadata=doc.get("source_metadata") or {},
                       passthrough_names=list(doc.get("passthrough", [])),
                       load_passthrough=lambda n: checked(PASSTHROUGH + n),
                       original_bytes=doc.get("original_bytes"), source=str(file),
                       format_version=int(lazy.metadata["format_version"]))


def _check_total_work(specs: dict, file: Path) -> None:
    """Refuse, before any module is touched, a file whose modules together make a reader
    generate or materialise more than max_total_elements() elements: regenerated outers (each
    distinct one once) plus the factors padded back to each module's rank. Malformed specs are
    skipped here; loading the module refuses them."""
    total, seen = 0, set()
    for name, spec in specs.items():
        o = spec.get("outer") if isinstance(spec, dict) else None
        try:
            out_f, in_f, rank, a, b = (max(int(v), 0) for v in (spec["out_features"], spec["in_features"],
                                                                   spec["rank"], o["a"], o["b"]))
        except (KeyError, TypeError, ValueError):
            continue
        total += (out_f + in_f) * max(rank, 0)
        if o.get("source") == random_outer.NAME:
            stream = random_outer.stream_of(name, o)
            for key, size in (((repr(o.get("seed")), repr(stream), "U", out_f, a), out_f * a),
                              ((repr(o.get("seed")), repr(stream), "V", b, in_f), b * in_f)):
                if key not in seen:
                    seen.add(key)
                    total += size
        if total > max_total_elements():
            raise BadInputError(f"the modules would regenerate and expand to {total:,} elements or more, over the "
                                f"limit of {max_total_elements():,} elements in total ({len(specs):,} modules; "
                                "LORA_CONVERT_MAX_TOTAL_ELEMENTS raises it)", file)


def _parse_metadata(lazy: LazyTensors) -> dict:
    meta, file = lazy.metadata, lazy.path
    if meta.get("format") != FORMAT_NAME:
        raise BadInputError("not a LoRA-Mini file (metadata format is not 'lora-mini')", file)
    if meta.get("format_version") not in READ_VERSIONS:
        raise UnsupportedError(f"LoRA-Mini format version {meta.get('format_version')!r} is not supported "
                               f"(this build reads versions {', '.join(READ_VERSIONS)})", file)
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
    if meta["format_version"] == "1" and ("module_defaults" in doc or any("quant" in spec for spec in
                                                                          doc["modules"].values())):
        raise BadInputError("quantized modules and module_defaults need format version 2, the file says 1", file)
    defaults = doc.get("module_defaults", {})
    if not isinstance(defaults, dict) or not set(defaults) <= set(DEFAULT_KEYS):
        raise BadInputError(f"lora_mini metadata: module_defaults may only hold {', '.join(DEFAULT_KEYS)}", file)
    if any(set(defaults) & set(spec) for spec in doc["modules"].values()):
        raise BadInputError("lora_mini metadata: a module repeats a key of module_defaults", file)
    doc["modules"] = {name: {**defaults, **spec} for name, spec in doc["modules"].items()}
    ob = doc.get("original_bytes")
    if ob is not None and (type(ob) is not int or ob < 0):
        raise BadInputError("lora_mini metadata: original_bytes must be a non-negative integer", file)
    return doc


def _check_tensor_set(lazy: LazyTensors, specs: dict, passthrough: list, hashes: dict) -> None:
    expected = {PASSTHROUGH + n for n in passthrough}
    packed = set()
    for name, spec in specs.items():
        o = spec.get("outer")
        stored = isinstance(o, dict) and o.get("source") in outer.names() and outer.get(o["source"]).stored
        if "quant" in spec:
            packed.add(f"{name}.q")
        else:
            expected.update(f"{name}.{r}" for r in ["X", "Y"] + (["U", "V"] if stored else []))
    for key in expected - {PASSTHROUGH + n for n in passthrough}:
        info = lazy.header.tensors.get(key)
        if info is not None and (info.dtype not in FACTOR_DTYPES or len(info.shape) != 2):
            raise BadInputError(f"tensor {key!r} is {info.dtype} {list(info.shape)}; inner and outer tensors "
                                f"must be 2-D {', '.join(FACTOR_DTYPES)}", lazy.path)
    for key in packed:
        info = lazy.header.tensors.get(key)
        if info is not None and (info.dtype != "U8" or len(info.shape) != 1):
            raise BadInputError(f"tensor {key!r} is {info.dtype} {list(info.shape)}; quantized factors "
                                "must be a 1-D U8 tensor", lazy.path)
    expected |= packed
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
    if "quant" in spec:
        q = spec["quant"]
        if not isinstance(q, dict) or set(q) != {"bits", "group"}:
            raise ValueError(f"quant must be an object with bits and group, got {q!r}")
        quant.check_bits(q["bits"])
        quant.check_group(q["group"])
        if src.stored and not a == b == k:
            raise ValueError(f"quantized {src.name} outers fold the inner matrices in: a = b = inner_rank, got "
                             f"a={a} b={b} k={k}")
        need = sum(quant.nbytes(s, q["bits"], q["group"]) for s in quantized_shapes(src.name, out_f, in_f, a, b, k))
        got, want = {"q": tuple(shapes[f"{name}.q"])}, {"q": (need,)}
    else:
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
        if "quant" in spec:
            q, k = spec["quant"], spec["inner_rank"]
            shapes_q = quantized_shapes(src.name, out_f, in_f, int(o["a"]), int(o["b"]), k)
            blob = checked(f"{name}.q").numpy().tobytes()
            first, second = (torch.from_numpy(t) for t in quant.decode_many(blob, shapes_q, q["bits"], q["group"]))
            if src.stored:
                stored, X, Y = {"U": first, "V": second}, torch.eye(k), torch.eye(k)
            else:
                stored, X, Y = {}, first, second
        else:
            X, Y = checked(f"{name}.X"), checked(f"{name}.Y")
            stored = {r: checked(f"{name}.{r}") for r in ("U", "V")} if src.stored else {}
        U, V = src.restore(name, o, out_f, in_f, stored, file)
        m = MiniModule(name=name, kind=spec["kind"], kernel=spec.get("kernel") or {}, rank=spec["rank"],
                       alpha=float(spec["alpha"]), use_rslora=spec["use_rslora"], dtype=spec["dtype"],
                       outer=o, U=U, V=V, X=X, Y=Y, fidelity=spec.get("fidelity") or {},
                       quant=dict(spec.get("quant") or {}))
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
