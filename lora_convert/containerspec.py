"""The LoRA-Mini container's header, without torch: its constants, the ``lora_mini`` document
(module specs, version 3 entries), and everything a reader validates before and while it loads
a module (docs/CONTAINER.md is the spec).

`open_mini` reads a file's header and validates it in full; `MiniFile.check_module` makes every
check loading a module makes (checksums, quantized bytes, regenerated outers and their
fingerprints, finite inner values) on the stored bytes with numpy. `container` builds its
tensors on the same header; `inspect` stops here.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import outer, quant
from .errors import BadInputError, IntegrityError, UnsupportedError
from .lru import BytesLRU
from .outer import random as random_outer
from .st import ITEMSIZE, LazyTensors

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
FACTOR_DTYPES = ("F32", "F16", "BF16")  # what X, Y, U, V may be stored as (docs/CONTAINER.md)
KINDS = ("linear", "conv", "embedding")
# A module's "dtype" (its source factors' dtype) names a torch floating-point dtype; known here
# without importing torch (tests/test_container.py checks it against torch).
FLOAT_DTYPE_NAMES = ("bfloat16", "double", "float", "float16", "float32", "float4_e2m1fn_x2", "float64",
                     "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "half")
# No single matrix a reader materialises from metadata alone (regenerated outers, factors
# zero-padded back to the original rank) may exceed this many elements: a hostile file
# must not be able to make a tiny file allocate terabytes.
MAX_MATRIX_ELEMENTS = 1 << 28  # 268M: 1 GiB as float32; raise with LORA_CONVERT_MAX_ELEMENTS
# ... nor all of them together: thousands of modules, each under the cap above, would still buy
# hours of generation from a few kilobytes of header (docs/SECURITY.md).
MAX_TOTAL_ELEMENTS = 1 << 33  # 8.6G: far above a 70B-shaped adapter; LORA_CONVERT_MAX_TOTAL_ELEMENTS
METADATA_SHA256 = "lora_mini_sha256"
NONFINITE_INNER = "non-positive rank or non-finite inner values"


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


def _stored(source) -> bool:
    """Whether outers of this source are written into the file (False for an unknown source)."""
    return source in outer.names() and outer.get(source).stored


def _v3_split(spec: dict) -> tuple[list, dict]:
    """A full module spec as (the positional fields of its version 3 entry, its other keys)."""
    rest = dict(spec)
    out_f, in_f, k = rest.pop("out_features"), rest.pop("in_features"), rest.pop("inner_rank")
    q = rest.pop("quant", None)
    fid = dict(rest.pop("fidelity", None) or {})
    o = dict(rest.pop("outer"))
    if q and _stored(o.get("source")) and o.get("a") == o.get("b") == k:
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
        if isinstance(o, dict) and _stored(o.get("source")):
            spec["outer"] = {"a": k, "b": k, **o}
    elif group is not None:
        raise ValueError(f"module {name!r}: group without bits")
    return name, spec


def quantized_shapes(source: str, out_f: int, in_f: int, a: int, b: int, k: int) -> list[tuple[int, int]]:
    """Shapes of the factors a quantized module's ``.q`` tensor holds, in order: stored outers
    hold U (out×k) and V (k×in) with the inner matrices folded in (X = Y = I, a = b = k);
    regenerated outers leave X (a×k) and Y (k×b) to store."""
    return [(out_f, k), (k, in_f)] if outer.get(source).stored else [(a, k), (k, b)]


def stored_bits(source: str, out_f: int, in_f: int, a: int, b: int, k: int, quant_spec: dict, itemsize: int) -> float:
    """Stored bits per value of a module's factors (scales included): a quantized module's from
    its ``quant`` spec, else the width of its float tensors (`itemsize` bytes)."""
    if not quant_spec:
        return float(8 * itemsize)
    return quant.bits_per_value(quantized_shapes(source, out_f, in_f, a, b, k), quant_spec["bits"],
                                quant_spec["group"])


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


# ---------------------------------------------------------------- reading a file

@dataclass
class MiniFile:
    """A LoRA-Mini file with its header validated in full (open_mini): the document, every
    module's spec, the tensors' checksums and shapes, and where each quantized module's bytes
    are. Modules are checked one at a time, when asked for."""

    path: Path
    lazy: LazyTensors
    doc: dict
    specs: dict[str, dict]
    hashes: dict[str, str]
    shapes: dict[str, tuple]  # tensor name -> shape, and "<module>.q" -> (its packed byte count,)
    spans: dict[str, tuple[str, int, int]]  # version 3: module -> (packed tensor, start, end)
    version: int
    _chunks: BytesLRU = field(default_factory=lambda: BytesLRU(2 * CHUNK_BYTES, size=len), repr=False)

    def verify(self, key: str, data, what: str = ""):
        """`data` (the bytes of tensor `key`, as any buffer) checked against its SHA-256; returned."""
        if not isinstance(self.hashes.get(key), str) or hashlib.sha256(data).hexdigest() != self.hashes[key]:
            raise IntegrityError(f"tensor {key!r}{what} does not match its SHA-256 checksum (corrupt or tampered)",
                                 self.path)
        return data

    def checked_bytes(self, key: str, what: str = "") -> bytearray:
        return self.verify(key, self.lazy.raw(key), what)

    def packed(self, name: str) -> bytes:
        """A quantized module's stored bytes, checksummed (version 3: their whole packed tensor,
        once, while modules are decoded from it)."""
        if self.version != 3:
            return bytes(self.checked_bytes(f"{name}.q"))
        key, start, end = self.spans[name]
        users = [n for n, (k, _, _) in self.spans.items() if k == key]
        what = f" (quantized modules {users[0]!r} to {users[-1]!r})" if len(users) > 1 else \
            f" (quantized module {users[0]!r})"
        return self._chunks.get(key, lambda: bytes(self.checked_bytes(key, what)))[start:end]

    def malformed(self, name: str, exc: Exception) -> BadInputError:
        return BadInputError(f"module {name!r}: malformed spec ({type(exc).__name__}: {exc})", self.path)

    def check_module(self, name: str) -> dict:
        """Every check container.load makes while it loads module `name`, in the same order and
        with the same errors, on the stored bytes (numpy): the spec, the checksums, the quantized
        bytes, the outer source's own checks (random: regenerated outers against their
        fingerprints) and finite inner values. Returns the module's spec."""
        spec = self.specs[name]
        try:
            validate_spec(name, spec, self.shapes)
            o = spec["outer"]
            src = outer.get(o["source"])
            out_f, in_f, k = spec["out_features"], spec["in_features"], spec["inner_rank"]
            if "quant" in spec:
                q = spec["quant"]
                shapes_q = quantized_shapes(src.name, out_f, in_f, int(o["a"]), int(o["b"]), k)
                first, second = quant.decode_many(self.packed(name), shapes_q, q["bits"], q["group"])
                inner = [] if src.stored else [first, second]  # stored outers: X = Y = I
            else:
                raw = {role: self.checked_bytes(f"{name}.{role}") for role in ("X", "Y")}
                for role in ("U", "V") if src.stored else ():
                    self.checked_bytes(f"{name}.{role}")
                inner = [self.lazy.array(f"{name}.{role}", raw[role]) for role in ("X", "Y")]
            src.check(name, o, out_f, in_f, self.path)
            float(spec["alpha"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise self.malformed(name, exc) from None
        if not all(np.isfinite(m).all() for m in inner):
            raise BadInputError(f"module {name!r}: {NONFINITE_INNER}", self.path)
        return spec

    def check_all(self) -> None:
        """Every check loading the whole file makes: each module (check_module) and each
        passthrough tensor's checksum."""
        for name in self.specs:
            self.check_module(name)
        for name in self.doc.get("passthrough", []):
            self.checked_bytes(PASSTHROUGH + name)

    def itemsize(self, name: str) -> int:
        """Bytes per value of a module's float X tensor (0 for a quantized module)."""
        info = self.lazy.header.tensors.get(f"{name}.X")
        return ITEMSIZE[info.dtype] if info is not None else 0


def open_mini(path: str | os.PathLike) -> MiniFile:
    """Open a LoRA-Mini file and validate its header in full: format and version, the metadata
    checksum, the document, the tensor set, dtypes and shapes, the packed layout, the total
    work its modules may cause. Nothing of a module is read yet."""
    file = resolve_file(path)
    lazy = LazyTensors(file)
    doc = _parse_metadata(lazy)
    specs, hashes = doc["modules"], doc["tensor_sha256"]
    version = int(lazy.metadata["format_version"])
    _check_tensor_set(lazy, specs, doc.get("passthrough", []), hashes, version == 3)
    shapes = {key: info.shape for key, info in lazy.header.tensors.items()}
    _check_total_work(specs, file)
    spans = {}
    if version == 3:
        spans = packed_spans(specs, {k: v[0] for k, v in shapes.items() if k.startswith(PACKED)}, file)
        shapes.update({f"{name}.q": (end - start,) for name, (_, start, end) in spans.items()})
    return MiniFile(path=file, lazy=lazy, doc=doc, specs=specs, hashes=hashes, shapes=shapes, spans=spans,
                    version=version)


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
        if o.get("source") in outer.names() and not outer.get(o["source"]).stored:
            stream = random_outer.stream_of(name, o)
            for key, size in (((o["source"], repr(o.get("seed")), repr(stream), "U", out_f, a), out_f * a),
                              ((o["source"], repr(o.get("seed")), repr(stream), "V", b, in_f), b * in_f)):
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
    if chunked:  # version 3: __packed__.0, .1, ... (how many: packed_spans checks against the modules)
        count = sum(1 for key in lazy.keys() if key.startswith(PACKED))
        packed = {f"{PACKED}{i}" for i in range(count)}
    for name, spec in specs.items():
        o = spec.get("outer")
        stored = isinstance(o, dict) and _stored(o.get("source"))
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


def validate_spec(name: str, spec: dict, shapes: dict) -> None:
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
    if spec.get("dtype") not in FLOAT_DTYPE_NAMES:
        raise ValueError(f"dtype must name a torch floating-point dtype, got {spec.get('dtype')!r}")
    fid = spec.get("fidelity") or {}
    if not isinstance(fid, dict) or not all(type(v) in (int, float) for v in fid.values()):
        raise ValueError("fidelity must map names to numbers")
    o = spec.get("outer")
    if not isinstance(o, dict):
        raise ValueError("outer must be an object")
    src = outer.get(o.get("source"))
    a, b = _pos_int(o, "a"), _pos_int(o, "b")
    if not src.stored and (type(o.get("seed")) is not int or not isinstance(o.get("u_sha256"), str)
                           or not isinstance(o.get("v_sha256"), str)):
        raise ValueError(f"{src.name} outer needs an integer seed and u_sha256/v_sha256 fingerprints")
    if "stream" in o and not isinstance(o["stream"], str):
        raise ValueError(f"{src.name} outer stream must be a string, got {o['stream']!r}")
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
