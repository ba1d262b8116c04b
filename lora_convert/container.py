"""The LoRA-Mini container: one safetensors file (docs/CONTAINER.md is the spec).

Tensors: ``<module>.X`` (a×k), ``<module>.Y`` (k×b), and for stored outers
``<module>.U`` (out×a), ``<module>.V`` (b×in); quantized modules' stored factors
(lora_convert/quant.py) packed back to back into a few ``__packed__.<i>`` byte tensors (format
version 3; version 2 gave each its own ``<module>.q`` tensor); passthrough tensors under
``__passthrough__.<original key>``. The ``__metadata__`` holds ``format`` ("lora-mini"),
``format_version`` and ``lora_mini``: a JSON document with the source format and config,
per-module specs and a SHA-256 of every tensor.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import __version__, outer, quant
from .outer import random as random_outer
from .adapter import LazyModules, lora_scale
from .atomic import atomic_output
from .errors import BadInputError, IntegrityError, OverBudgetError, UnsupportedError
from .lru import BytesLRU
from .report import FidelityReport, ModuleFidelity
from .st import TORCH_DTYPE, LazyTensors, StreamingWriter, peek, tensor_buffer

FORMAT_NAME = "lora-mini"
FORMAT_VERSION = 3  # the newest this build reads and writes
READ_VERSIONS = ("1", "2", "3")
# Files without quantized modules are written as version 1, which older readers still read.
PLAIN_VERSION = 1
FILE_NAME = "lora_mini.safetensors"
CONFIG_NAME = "lora_mini_config.json"
PASSTHROUGH = "__passthrough__."
PACKED = "__packed__."  # version 3: quantized modules' bytes, back to back, in a few tensors
# A writer starts a new packed tensor once the current one holds this many bytes: a reader
# checksums a whole packed tensor before it decodes a module from it (bounded work per module)
# and a writer holds one in memory.
CHUNK_BYTES = 1 << 20
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
                              recovered=self.recovered, bits=self.bits, quantized=bool(self.quant),
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
         max_bytes: int | None = None, format_version: int | None = None) -> FidelityReport:
    """Write `mini` atomically to `path` (a directory, or a single ``.safetensors`` file).

    Modules are produced and written one at a time; returns the fidelity report. With
    `max_bytes`, an output (all its files) larger than that is refused before it is published.
    `format_version` 2 writes quantized modules in the older layout (one tensor each), for
    readers that predate version 3; by default the file gets the oldest version that holds it.
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
            packer = _Packer(writer, hashes) if format_version != 2 else None
            for m in modules:
                shapes = _add_module(writer, m, hashes, packer)
                specs[m.name] = m.spec()
                _check_own_spec(m, specs[m.name], shapes, path)
                report.add(m.fidelity_row())
                if progress:
                    progress(m)
            if packer:
                packer.flush()
            for name, tensor in mini.passthrough():
                key = PASSTHROUGH + name
                hashes[key] = writer.add(key, tensor, digest=True)
            quantized = any("quant" in sp for sp in specs.values())
            version = (format_version or FORMAT_VERSION) if quantized else PLAIN_VERSION
            meta = _metadata(mini, version, specs, hashes)
            meta[METADATA_SHA256] = metadata_digest(meta, writer.layout())
            writer.finish(meta)
        report.compressed_bytes = file.stat().st_size
        if _is_dir_target(path):
            summary = summary_config(mini, version, {s["outer"]["source"] for s in specs.values()}, report.summary())
            (tmp / CONFIG_NAME).write_text(summary, encoding="utf-8")
        if max_bytes is not None:
            written = sum(f.stat().st_size for f in (tmp.iterdir() if _is_dir_target(path) else [tmp]))
            if written > max_bytes:  # raised inside atomic_output: nothing is published
                raise OverBudgetError(f"the output would be {written:,} bytes, over the budget of {max_bytes:,}",
                                      path)
            report.compressed_bytes = written
    return report


def _document(mini: MiniAdapter, version: int, specs: dict[str, dict], hashes: dict) -> dict:
    """The ``lora_mini`` document of a file of `version` holding modules with these specs."""
    if version >= 3:
        defaults, entries = v3_entries(specs)
        modules = {"modules": entries, **({"module_defaults": defaults} if defaults else {})}
    elif version == 2:
        defaults, stored = compact_specs(specs)
        modules = {"modules": stored, **({"module_defaults": defaults} if defaults else {})}
    else:
        modules = {"modules": specs}
    return {"source_format": mini.source_format, "source_config": mini.source_config,
            "source_metadata": mini.source_metadata, **modules,
            "passthrough": list(mini.passthrough_names), "tensor_sha256": hashes,
            "original_bytes": mini.original_bytes, "created_by": f"lora_convert {__version__}"}


def _metadata(mini: MiniAdapter, version: int, specs: dict[str, dict], hashes: dict) -> dict:
    """``__metadata__`` without its digest. Version 3 documents have no spaces: in a budgeted
    file every header byte is taken from the factors."""
    doc = _document(mini, version, specs, hashes)
    seps = (",", ":") if version >= 3 else None
    return {"format": FORMAT_NAME, "format_version": str(version),
            "lora_mini": json.dumps(doc, sort_keys=True, allow_nan=False, separators=seps)}


class _Packer:
    """Version 3: quantized modules' bytes appended to ``__packed__.<i>`` tensors, a new one
    started once the current one holds CHUNK_BYTES (a module never spans two)."""

    def __init__(self, writer: StreamingWriter, hashes: dict):
        self.writer, self.hashes, self.buf, self.count = writer, hashes, bytearray(), 0

    def add(self, blob: bytes) -> None:
        if len(self.buf) >= CHUNK_BYTES:
            self.flush()
        self.buf += blob

    def flush(self) -> None:
        if self.buf:
            key = f"{PACKED}{self.count}"
            self.hashes[key] = self.writer.add(key, torch.frombuffer(self.buf, dtype=torch.uint8), digest=True)
            self.buf, self.count = bytearray(), self.count + 1


# Spec entries fixed by the source adapter (not by compression choices) that version 2 files
# state once in "module_defaults" when every module has the same value: headers of budgeted
# files are a large share of their bytes.
DEFAULT_KEYS = ("kind", "kernel", "rank", "alpha", "use_rslora", "dtype")
# Version 3 also states the outer spec (svd: {"source": "svd"}, its a = b = k implied), the
# quantization group and the fidelity object besides rel_error and energy (recover's
# {"recovery_steps": N}) there, when all modules share them.
V3_DEFAULT_KEYS = DEFAULT_KEYS + ("outer", "group", "fidelity")
# SizePlan's modules share a placeholder fidelity figure that the written ones do not: it counts
# that object in every entry (never fewer bytes than the file takes).
PLAN_DEFAULT_KEYS = DEFAULT_KEYS + ("outer", "group")
# A version 3 module entry: [name, out_features, in_features, inner_rank, bits or null,
# rel_error or null, energy or null] and optionally an object of further spec keys.
V3_FIELDS = 7


def compact_specs(specs: dict[str, dict]) -> tuple[dict, dict[str, dict]]:
    """(module_defaults, specs without them): the DEFAULT_KEYS whose value all modules share."""
    if not specs:
        return {}, specs
    first = next(iter(specs.values()))
    defaults = {k: first[k] for k in DEFAULT_KEYS
                if k in first and all(k in sp and json.dumps(sp[k]) == json.dumps(first[k]) for sp in specs.values())}
    return defaults, {n: {k: v for k, v in sp.items() if k not in defaults} for n, sp in specs.items()}


def _v3_split(spec: dict) -> tuple[list, dict]:
    """A full module spec as (the positional fields of its version 3 entry, its other keys)."""
    rest = dict(spec)
    out_f, in_f, k = rest.pop("out_features"), rest.pop("in_features"), rest.pop("inner_rank")
    q = rest.pop("quant", None)
    fid = dict(rest.pop("fidelity", None) or {})
    o = dict(rest.pop("outer"))
    if q and o.get("source") in outer.names() and outer.get(o["source"]).stored and o.get("a") == o.get("b") == k:
        del o["a"], o["b"]  # quantized stored outers fold the inner matrices in: a = b = k
    rest["outer"] = o
    if q:
        rest["group"] = q["group"]
    rel, energy = fid.pop("rel_error", None), fid.pop("energy", None)
    if fid:
        rest["fidelity"] = fid
    return [out_f, in_f, k, q["bits"] if q else None, rel, energy], rest


def v3_entries(specs: dict[str, dict], keys: tuple[str, ...] = V3_DEFAULT_KEYS) -> tuple[dict, list[list]]:
    """(module_defaults, module entries) of a version 3 document, in the specs' order; `keys`: those
    that may go to module_defaults."""
    split = {name: _v3_split(sp) for name, sp in specs.items()}
    rests = [rest for _, rest in split.values()]
    defaults = {} if not rests else {
        k: rests[0][k] for k in keys
        if k in rests[0] and all(k in r and json.dumps(r[k]) == json.dumps(rests[0][k]) for r in rests)}
    entries = []
    for name, (fields, rest) in split.items():
        extra = {k: v for k, v in rest.items() if k not in defaults}
        entries.append([name, *fields, *([extra] if extra else [])])
    return defaults, entries


def v3_spec(entry, defaults: dict) -> tuple[str, dict]:
    """(name, full spec) of a version 3 module entry. Raises ValueError when it is malformed."""
    if not isinstance(entry, list) or len(entry) not in (V3_FIELDS, V3_FIELDS + 1) or not isinstance(entry[0], str):
        raise ValueError(f"a module entry must be [name, out_features, in_features, inner_rank, bits, rel_error, "
                         f"energy] and optionally an object, got {str(entry)[:80]}")
    name, out_f, in_f, k, bits, rel, energy = entry[:V3_FIELDS]
    extra = entry[V3_FIELDS] if len(entry) > V3_FIELDS else {}
    if not isinstance(extra, dict) or set(extra) & ({"out_features", "in_features", "inner_rank", "quant"}
                                                    | set(defaults)):
        raise ValueError(f"module {name!r}: its object may only hold spec keys that are neither positional nor "
                         "in module_defaults")
    spec = {**defaults, **extra}
    group = spec.pop("group", None)
    fid = spec.get("fidelity", {})
    if not isinstance(fid, dict):
        raise ValueError(f"module {name!r}: fidelity must be an object")
    fid = {**fid, **({"rel_error": rel} if rel is not None else {}), **({"energy": energy} if energy is not None else {})}
    spec.update(out_features=out_f, in_features=in_f, inner_rank=k, fidelity=fid)
    if bits is not None:
        spec["quant"] = {"bits": bits, "group": group}
        o = spec.get("outer")
        if isinstance(o, dict) and o.get("source") in outer.names() and outer.get(o["source"]).stored:
            spec["outer"] = {"a": k, "b": k, **o}
    elif group is not None:
        raise ValueError(f"module {name!r}: group without bits")
    return name, spec


def summary_config(mini: MiniAdapter, version: int, outer_sources, fidelity: dict) -> str:
    """The text of ``lora_mini_config.json``, the directory layout's informational summary."""
    summary = {"format": FORMAT_NAME, "format_version": version, "file": FILE_NAME,
               "source_format": mini.source_format,
               "base_model_name_or_path": mini.source_config.get("base_model_name_or_path"),
               "outer_sources": sorted(outer_sources), "fidelity": fidelity}
    return json.dumps(summary, indent=2) + "\n"


# Longest JSON form of a float the summary file may hold (its size is not known before the fit).
_WORST_FLOAT = -1.2345678901234567e-300
FIDELITY_DIGITS = 4  # significant digits of the (informational) fidelity figures of quantized modules


def short_figure(x: float, digits: int = FIDELITY_DIGITS) -> float:
    """A fidelity figure to `digits` significant digits: informational, and every byte of a
    budgeted file's header counts."""
    return float(f"{x:.{digits - 1}e}") if math.isfinite(x) else x
_WORST_HEX = "f" * 64


def _escaped_len(text: str) -> int:
    """Bytes `text` takes inside a JSON string of the safetensors header (escaping is per character)."""
    return len(json.dumps(text)) - 2


class SizePlan:
    """The bytes save() writes for a version 3 file of quantized modules, as `fixed` plus, per
    module, entry_bytes(...) (its entry in the header) and its packed data bytes. Exact, except
    that numbers save learns while writing are counted at their longest: tensor offsets (up to
    `max_data`), the 8-byte alignment of the data, the number of packed tensors, and the floats
    of the directory layout's summary file (`directory`: it is written). `specs`: every module's
    spec at any (k, bits)."""

    def __init__(self, mini: MiniAdapter, specs: dict[str, dict], max_data: int, directory: bool = True):
        self.defaults, entries = v3_entries(specs, PLAN_DEFAULT_KEYS)
        self.entries = {e[0]: e for e in entries}
        self._heads: dict[str, int] = {}
        passthrough = [(PASSTHROUGH + name, t) for name, t in mini.passthrough()]
        data = sum(t.numel() * t.element_size() for _, t in passthrough)
        big = int("9" * len(str(max(max_data, 1) + data)))
        entries_st, hashes = {}, {}
        chunks = [f"{PACKED}{i}" for i in range(max(1, -(-max_data // CHUNK_BYTES)))] if specs else []
        for key in chunks:
            entries_st[key] = {"dtype": "U8", "shape": [big], "data_offsets": [big, big]}
            hashes[key] = _WORST_HEX
        for key, t in passthrough:
            entries_st[key] = {"dtype": TORCH_DTYPE[t.dtype], "shape": list(t.shape), "data_offsets": [big, big]}
            hashes[key] = _WORST_HEX
        doc = {"source_format": mini.source_format, "source_config": mini.source_config,
               "source_metadata": mini.source_metadata, "modules": [],
               **({"module_defaults": self.defaults} if self.defaults else {}),
               "passthrough": list(mini.passthrough_names), "tensor_sha256": hashes,
               "original_bytes": mini.original_bytes, "created_by": f"lora_convert {__version__}"}
        meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                "lora_mini": json.dumps(doc, sort_keys=True, allow_nan=False, separators=(",", ":")),
                METADATA_SHA256: _WORST_HEX}
        header = len(json.dumps({"__metadata__": meta, **entries_st}, separators=(",", ":")).encode("utf-8"))
        # "[]" -> "[e1,...,en]": entry_bytes counts one comma per entry, one too many
        self.fixed = 8 + header + 7 + data - (1 if specs else 0) + (self._summary(mini, specs) if directory else 0)

    def entry_bytes(self, name: str, k: int, bits: int, rel_error: float | None, energy: float | None) -> int:
        """Header bytes of module `name`'s entry at (k, bits) with these fidelity figures."""
        if name not in self._heads:  # the entry with one-character numbers, less those (numbers are not escaped)
            e = self.entries[name]
            entry = [name, e[1], e[2], 0, 0, 0, 0, *e[V3_FIELDS:]]
            self._heads[name] = _escaped_len(json.dumps(entry, sort_keys=True, allow_nan=False,
                                                        separators=(",", ":"))) + 1 - 4
        return self._heads[name] + sum(len("null" if v is None else repr(v)) for v in (k, bits, rel_error, energy))

    @staticmethod
    def _summary(mini: MiniAdapter, specs: dict) -> int:
        """Bytes of the directory layout's summary file at its longest."""
        big = 10**15 - 1
        summary = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "file": FILE_NAME,
                   "source_format": mini.source_format,
                   "base_model_name_or_path": mini.source_config.get("base_model_name_or_path"),
                   "outer_sources": sorted(outer.names()),
                   "fidelity": {"modules": big, "rel_error": _WORST_FLOAT, "retained_energy": _WORST_FLOAT,
                                "worst_module": max(specs, key=len, default=""), "worst_rel_error": _WORST_FLOAT,
                                "modules_without_fidelity": big, "low_energy": False, "recovered": False,
                                "original_bytes": big, "compressed_bytes": big, "ratio": _WORST_FLOAT}}
        return len(json.dumps(summary, indent=2)) + 1


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
    if outer.get(m.outer["source"]).stored:
        k = m.inner_rank
        X, Y = _f64(m.X), _f64(m.Y)
        eye = np.eye(k)
        same = X.shape == (k, k) and Y.shape == (k, k) and np.array_equal(X, eye) and np.array_equal(Y, eye)
        mats = [_f64(m.U), _f64(m.V)] if same else [_f64(m.U) @ X, Y @ _f64(m.V)]
    else:
        mats = [_f64(m.X), _f64(m.Y)]
    raw, _ = quant.encode_many(mats, m.quant["bits"], m.quant["group"])
    return raw


def _f64(t: torch.Tensor) -> np.ndarray:
    """A tensor as a float64 array. Through numpy where it can: save runs this on the caller's
    thread, where torch's thread pool makes every small conversion an OpenMP region."""
    if t.dtype in (torch.float32, torch.float16, torch.float64):
        return t.detach().numpy().astype(np.float64)
    return t.to(torch.float64).numpy()


def _add_module(writer: StreamingWriter, m: MiniModule, hashes: dict, packer: _Packer | None) -> dict:
    """Write one module's data; returns {tensor name: shape} as _validate_spec reads them (a
    packed module: ``<name>.q`` with its byte length)."""
    if m.quant:
        key, blob = f"{m.name}.q", quantized_blob(m)
        if packer is not None:
            packer.add(blob)
        else:
            hashes[key] = writer.add(key, torch.frombuffer(bytearray(blob), dtype=torch.uint8), digest=True)
        return {key: (len(blob),)}
    tensors = {"X": m.X, "Y": m.Y}
    if outer.get(m.outer["source"]).stored:
        tensors.update(U=m.U, V=m.V)
    for role, t in tensors.items():
        hashes[f"{m.name}.{role}"] = writer.add(f"{m.name}.{role}", t, digest=True)
    return {f"{m.name}.{role}": writer.shape(f"{m.name}.{role}") for role in tensors}


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
    _check_tensor_set(lazy, specs, doc.get("passthrough", []), hashes, lazy.metadata["format_version"] == "3")

    def checked(key: str, what: str = "") -> torch.Tensor:
        t = lazy.get(key)
        if not isinstance(hashes.get(key), str) or sha256_tensor(t) != hashes[key]:
            raise IntegrityError(f"tensor {key!r}{what} does not match its SHA-256 checksum (corrupt or tampered)",
                                 file)
        return t

    shapes = {key: info.shape for key, info in lazy.header.tensors.items()}
    _check_total_work(specs, file)
    if lazy.metadata["format_version"] == "3":
        spans = packed_spans(specs, {k: v[0] for k, v in shapes.items() if k.startswith(PACKED)}, file)
        shapes.update({f"{name}.q": (end - start,) for name, (_, start, end) in spans.items()})
        chunks = BytesLRU(2 * CHUNK_BYTES, size=len)  # checksummed once, while modules are decoded from them

        def packed(name: str) -> bytes:
            key, start, end = spans[name]
            users = [n for n, (k, _, _) in spans.items() if k == key]
            what = f" (quantized modules {users[0]!r} to {users[-1]!r})" if len(users) > 1 else \
                f" (quantized module {users[0]!r})"
            return chunks.get(key, lambda: checked(key, what).numpy().tobytes())[start:end]
    else:
        def packed(name: str) -> bytes:
            return checked(f"{name}.q").numpy().tobytes()

    def load_module(name: str) -> MiniModule:
        return _module_from_spec(name, specs[name], checked, packed, file, shapes)

    return MiniAdapter(source_format=doc["source_format"], module_names=list(specs), load_module=load_module,
                       source_config=doc.get("source_config") or {}, source_metadata=doc.get("source_metadata") or {},
                       passthrough_names=list(doc.get("passthrough", [])),
                       load_passthrough=lambda n: checked(PASSTHROUGH + n),
                       original_bytes=doc.get("original_bytes"), source=str(file),
                       format_version=int(lazy.metadata["format_version"]))


def packed_spans(specs: dict, chunk_sizes: dict[str, int], file: Path) -> dict[str, tuple[str, int, int]]:
    """Version 3: {module: (packed tensor, start, end)} of every quantized module. Modules fill
    ``__packed__.0``, ``__packed__.1``, ... in the order of the document, each within one tensor,
    moving to the next tensor exactly when the current one is full; every byte belongs to a module."""
    spans, index, at = {}, 0, 0
    for name, spec in specs.items():
        if "quant" not in spec:
            continue
        try:
            size = _packed_size(spec)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise BadInputError(f"module {name!r}: malformed spec ({type(exc).__name__}: {exc})", file) from None
        key = f"{PACKED}{index}"
        if key in chunk_sizes and at == chunk_sizes[key]:
            index, at = index + 1, 0
            key = f"{PACKED}{index}"
        if key not in chunk_sizes or at + size > chunk_sizes[key]:
            raise BadInputError(f"module {name!r}: its {size:,} packed bytes do not fit the packed tensors (the "
                                "document and the tensors disagree)", file)
        spans[name] = (key, at, at + size)
        at += size
    if len(chunk_sizes) != (index + 1 if spans else 0) or (spans and at != chunk_sizes[f"{PACKED}{index}"]):
        raise BadInputError(f"the packed tensors hold {sum(chunk_sizes.values()):,} bytes, which the quantized "
                            "modules of the document do not account for exactly", file)
    return spans


def _packed_size(spec: dict) -> int:
    """Bytes of a quantized module's factors, from its spec (validated as far as the size needs)."""
    q, o = spec["quant"], spec["outer"]
    if not isinstance(q, dict) or not isinstance(o, dict):
        raise ValueError("quant and outer must be objects")
    bits, group = quant.check_bits(q.get("bits")), quant.check_group(q.get("group"))
    dims = [_pos_int(spec, key) for key in ("out_features", "in_features")] + [_pos_int(o, "a"), _pos_int(o, "b"),
                                                                               _pos_int(spec, "inner_rank")]
    for d in dims:
        if d > max_matrix_elements():
            raise ValueError(f"dimension {d} is over the limit of {max_matrix_elements()} elements")
    return sum(quant.nbytes(s, bits, group) for s in quantized_shapes(outer.get(o.get("source")).name, *dims))


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
    if not isinstance(doc, dict) or "modules" not in doc or not isinstance(
            doc.get("tensor_sha256"), dict) or not isinstance(doc.get("source_format"), str):
        raise BadInputError("lora_mini metadata lacks modules, tensor_sha256 or source_format", file)
    if meta["format_version"] == "3":
        doc["modules"] = _v3_modules(doc, file)
    elif not isinstance(doc.get("modules"), dict):
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
    if meta["format_version"] == "3":
        return doc
    if meta["format_version"] == "1" and ("module_defaults" in doc or any("quant" in spec for spec in
                                                                          doc["modules"].values())):
        raise BadInputError("quantized modules and module_defaults need format version 2, the file says 1", file)
    defaults = doc.get("module_defaults", {})
    if not isinstance(defaults, dict) or not set(defaults) <= set(DEFAULT_KEYS):
        raise BadInputError(f"lora_mini metadata: module_defaults may only hold {', '.join(DEFAULT_KEYS)}", file)
    if any(set(defaults) & set(spec) for spec in doc["modules"].values()):
        raise BadInputError("lora_mini metadata: a module repeats a key of module_defaults", file)
    doc["modules"] = {name: {**defaults, **spec} for name, spec in doc["modules"].items()}
    return doc


def _v3_modules(doc: dict, file: Path) -> dict[str, dict]:
    """Version 3's module entries as full specs, in their order."""
    entries, defaults = doc.get("modules"), doc.get("module_defaults", {})
    if not isinstance(entries, list):
        raise BadInputError("lora_mini metadata: version 3 modules must be a list of entries", file)
    if not isinstance(defaults, dict) or not set(defaults) <= set(V3_DEFAULT_KEYS):
        raise BadInputError(f"lora_mini metadata: module_defaults may only hold {', '.join(V3_DEFAULT_KEYS)}", file)
    specs = {}
    for entry in entries:
        try:
            name, spec = v3_spec(entry, defaults)
        except ValueError as exc:
            raise BadInputError(f"lora_mini metadata: {exc}", file) from None
        if name in specs:
            raise BadInputError(f"lora_mini metadata: module {name!r} is listed twice", file)
        specs[name] = spec
    return specs


def _check_tensor_set(lazy: LazyTensors, specs: dict, passthrough: list, hashes: dict, chunked: bool) -> None:
    expected = {PASSTHROUGH + n for n in passthrough}
    packed = set()
    if chunked:  # version 3: __packed__.0, .1, ... (how many: _packed_spans checks against the modules)
        count = sum(1 for key in lazy.keys() if key.startswith(PACKED))
        packed = {f"{PACKED}{i}" for i in range(count)}
    for name, spec in specs.items():
        o = spec.get("outer")
        stored = isinstance(o, dict) and o.get("source") in outer.names() and outer.get(o["source"]).stored
        if "quant" in spec:
            if not chunked:
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
        if info is not None and (info.dtype != "U8" or len(info.shape) != 1 or info.shape[0] == 0):
            raise BadInputError(f"tensor {key!r} is {info.dtype} {list(info.shape)}; quantized factors "
                                "must be a non-empty 1-D U8 tensor", lazy.path)
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


def _module_from_spec(name: str, spec: dict, checked, packed, file: Path, shapes: dict) -> MiniModule:
    try:
        _validate_spec(name, spec, shapes)
        o = spec["outer"]
        src = outer.get(o["source"])
        out_f, in_f = spec["out_features"], spec["in_features"]
        if "quant" in spec:
            q, k = spec["quant"], spec["inner_rank"]
            shapes_q = quantized_shapes(src.name, out_f, in_f, int(o["a"]), int(o["b"]), k)
            blob = packed(name)
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
