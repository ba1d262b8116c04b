"""The LoRA-Mini container: one safetensors file (docs/CONTAINER.md is the spec), as tensors.

Tensors: ``<module>.X`` (a×k), ``<module>.Y`` (k×b), and for stored outers
``<module>.U`` (out×a), ``<module>.V`` (b×in); quantized modules' stored factors
(lora_convert/quant.py) packed back to back into a few ``__packed__.<i>`` byte tensors (format
version 3; version 2 gave each its own ``<module>.q`` tensor); passthrough tensors under
``__passthrough__.<original key>``. The ``__metadata__`` holds ``format`` ("lora-mini"),
``format_version`` and ``lora_mini``: a JSON document with the source format and config,
per-module specs and a SHA-256 of every tensor. Its header (constants, the document, every
check a reader makes) is `containerspec`, which imports no torch; this module makes the tensors.
"""
from __future__ import annotations

import functools
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
from .adapter import LazyModules, lora_scale
from .atomic import atomic_output
from .containerspec import (CHUNK_BYTES, CONFIG_NAME, FILE_NAME, FORMAT_NAME, FORMAT_VERSION, METADATA_SHA256,
                            NONFINITE_INNER, PACKED, PASSTHROUGH, PLAIN_VERSION, PLAN_DEFAULT_KEYS, V3_FIELDS, MiniFile,
                            compact_specs, metadata_digest, module_spec, open_mini, quantized_shapes, stored_bits,
                            v3_entries, validate_spec)
from .errors import BadInputError, OverBudgetError
from .report import FidelityReport, ModuleFidelity
from .st import TORCH_DTYPE, StreamingWriter, peek, tensor_buffer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
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
    # {"bits": b, "group": g} when the stored factors are quantized (b an integer width or a
    # codebook name, quant.WIDTHS; one ``<name>.q`` tensor);
    # empty: X, Y (and stored U, V) are float tensors of their own
    quant: dict = field(default_factory=dict)
    # the ``.q`` bytes of a quantized module as its fit or its file had them, with what they stand
    # for (remember_blob): save writes them instead of quantizing the same values again
    blob: tuple | None = field(default=None, repr=False, compare=False)

    def remember_blob(self, blob: bytes) -> MiniModule:
        """Record `blob` as the ``.q`` bytes of U, V, X, Y and the quant spec as they are now;
        quantized_blob returns it for as long as none of them is replaced or changed in place."""
        self.blob = (blob, self._state())
        return self

    def _state(self) -> tuple:
        # torch counts in-place changes of a tensor in its _version; identity catches replacement
        return (dict(self.quant),) + tuple((t, t._version) for t in (self.U, self.V, self.X, self.Y))

    def remembered_blob(self) -> bytes | None:
        """The blob remember_blob recorded, if it still stands for this module's tensors."""
        if self.blob is None:
            return None
        raw, (spec, *marks) = self.blob
        now = self._state()
        same = spec == now[0] and all(t is u and v == w for (t, v), (u, w) in zip(marks, now[1:]))
        return raw if same else None

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
        return stored_bits(self.outer["source"], self.out_features, self.in_features, int(self.outer["a"]),
                           int(self.outer["b"]), self.inner_rank, self.quant, self.X.element_size())

    def fidelity_row(self) -> ModuleFidelity:
        return ModuleFidelity(self.name, (self.out_features, self.in_features), self.rank, self.inner_rank,
                              self.outer["source"], int(self.outer["a"]), int(self.outer["b"]),
                              _number(self.fidelity.get("rel_error")), _number(self.fidelity.get("energy")) or 0.0,
                              recovered=self.recovered, bits=self.bits, quantized=bool(self.quant),
                              calibrated_rel_error=_number(self.fidelity.get("calibrated_rel_error")),
                              codebook=self.codebook)

    @property
    def codebook(self) -> str | None:
        """The codebook name of a module stored as codebook indices ("nf4"), else None."""
        bits = self.quant.get("bits")
        return bits if quant.is_codebook(bits) else None

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


def quantized_parts(first: torch.Tensor, second: torch.Tensor, outers, source: str) -> tuple:
    """(U, V, X, Y, outer spec) of a module stored quantized from its two rounded factors: stored
    outers hold the factors themselves (X = Y = I_k); random outers (`outers` = (U, V, spec))
    keep theirs and the factors are the inner X, Y."""
    if outers is None:
        k = first.shape[1]
        return first, second, torch.eye(k), torch.eye(k), {"source": source, "a": k, "b": k}
    U, V, spec = outers
    return U, V, first, second, spec


_WORST_HEX = "f" * 64


def _escaped_len(text: str) -> int:
    """Bytes `text` takes inside a JSON string of the safetensors header (escaping is per character)."""
    return len(json.dumps(text)) - 2


@functools.lru_cache(maxsize=4096, typed=True)  # a plan asks for the same few values thousands of times
def entry_field_bytes(value) -> int:
    """Header bytes of one positional field of a version 3 entry (a number, null, or a codebook
    name, whose quotes are escaped inside the ``lora_mini`` string)."""
    return _escaped_len(json.dumps(value))


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

    def entry_bytes(self, name: str, k: int, bits: int | str, rel_error: float | None, energy: float | None) -> int:
        """Header bytes of module `name`'s entry at (k, bits) with these fidelity figures."""
        if name not in self._heads:  # the entry with one-character numbers, less those (numbers are not escaped)
            e = self.entries[name]
            entry = [name, e[1], e[2], 0, 0, 0, 0, *e[V3_FIELDS:]]
            self._heads[name] = _escaped_len(json.dumps(entry, sort_keys=True, allow_nan=False,
                                                        separators=(",", ":"))) + 1 - 4
        return self._heads[name] + sum(entry_field_bytes(v) for v in (k, bits, rel_error, energy))

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


def quantized_blob(m: MiniModule) -> bytes:
    """The ``.q`` bytes of a quantized module, encoded from its tensors as they are now (a
    module whose inner matrices were changed, e.g. by recover, is folded and re-quantized; the
    values that came from a file encode back to the same bytes)."""
    raw = m.remembered_blob()
    if raw is not None:
        return raw
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


def load(path: str | os.PathLike) -> MiniAdapter:
    """Open a LoRA-Mini file lazily; each module is checked when loaded (fingerprints, checksums)."""
    f = open_mini(path)

    def checked(key: str) -> torch.Tensor:
        t = f.lazy.get(key)
        f.verify(key, tensor_buffer(t))
        return t

    def load_module(name: str) -> MiniModule:
        return _module_from_spec(f, name, checked)

    doc = f.doc
    return MiniAdapter(source_format=doc["source_format"], module_names=list(f.specs), load_module=load_module,
                       source_config=doc.get("source_config") or {}, source_metadata=doc.get("source_metadata") or {},
                       passthrough_names=list(doc.get("passthrough", [])),
                       load_passthrough=lambda n: checked(PASSTHROUGH + n),
                       original_bytes=doc.get("original_bytes"), source=str(f.path), format_version=f.version)


def _check_own_spec(m: MiniModule, spec: dict, shapes: dict, path: Path) -> None:
    """What save writes, load must accept: refuse (before publishing) a module the reader would."""
    try:
        validate_spec(m.name, json.loads(json.dumps(spec)), shapes)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise BadInputError(f"module {m.name!r} cannot be stored: {exc}", path) from None


def _module_from_spec(f: MiniFile, name: str, checked) -> MiniModule:
    """Module `name` as tensors, with the checks of MiniFile.check_module (which makes them
    without torch, for `inspect`) in the same order."""
    spec, file = f.specs[name], f.path
    try:
        validate_spec(name, spec, f.shapes)
        o = spec["outer"]
        src = outer.get(o["source"])
        out_f, in_f = spec["out_features"], spec["in_features"]
        if "quant" in spec:
            q, k = spec["quant"], spec["inner_rank"]
            shapes_q = quantized_shapes(src.name, out_f, in_f, int(o["a"]), int(o["b"]), k)
            blob = f.packed(name)
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
        if "quant" in spec:
            m.remember_blob(bytes(blob))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise f.malformed(name, exc) from None
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
        raise BadInputError(f"module {m.name!r}: {NONFINITE_INNER}", file)
