"""The LoRA-Mini container: one safetensors file (docs/FORMAT.md is the spec).

Tensors: ``<module>.X`` (a×k), ``<module>.Y`` (k×b), and for stored outers
``<module>.U`` (out×a), ``<module>.V`` (b×in); passthrough tensors under
``__passthrough__.<original key>``. The ``__metadata__`` holds ``format``
("lora-mini"), ``format_version`` and ``lora_mini``: a JSON document with the
source format and config, per-module specs and a SHA-256 of every tensor.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import __version__, outer
from .adapter import lora_scale
from .atomic import atomic_output
from .errors import BadInputError, IntegrityError, UnsupportedError
from .report import FidelityReport, ModuleFidelity
from .st import LazyTensors, StreamingWriter, tensor_bytes

FORMAT_NAME = "lora-mini"
FORMAT_VERSION = 1
FILE_NAME = "lora_mini.safetensors"
CONFIG_NAME = "lora_mini_config.json"
PASSTHROUGH = "__passthrough__."
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


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
                              float(self.fidelity.get("rel_error", float("nan"))),
                              float(self.fidelity.get("energy", 0.0)))


@dataclass
class MiniAdapter:
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

    def __len__(self) -> int:
        return len(self.module_names)

    def module(self, name: str) -> MiniModule:
        return self.load_module(name)

    def modules(self) -> Iterator[MiniModule]:
        for name in self.module_names:
            yield self.load_module(name)

    def passthrough(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.passthrough_names:
            yield name, self.load_passthrough(name)


def sha256_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


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
        with StreamingWriter(file) as writer:
            for m in mini.modules():
                _add_module(writer, m, hashes)
                specs[m.name] = m.spec()
                report.add(m.fidelity_row())
                if progress:
                    progress(m)
            for name, tensor in mini.passthrough():
                key = PASSTHROUGH + name
                writer.add(key, tensor)
                hashes[key] = sha256_tensor(tensor)
            doc = {"source_format": mini.source_format, "source_config": mini.source_config,
                   "source_metadata": mini.source_metadata, "modules": specs,
                   "passthrough": list(mini.passthrough_names), "tensor_sha256": hashes,
                   "original_bytes": mini.original_bytes, "created_by": f"lora_convert {__version__}"}
            writer.finish({"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                           "lora_mini": json.dumps(doc, sort_keys=True, allow_nan=False)})
        report.compressed_bytes = file.stat().st_size
        if _is_dir_target(path):
            summary = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "file": FILE_NAME,
                       "source_format": mini.source_format,
                       "base_model_name_or_path": mini.source_config.get("base_model_name_or_path"),
                       "outer_sources": sorted({s["outer"]["source"] for s in specs.values()}),
                       "fidelity": report.summary()}
            (tmp / CONFIG_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return report


def _add_module(writer: StreamingWriter, m: MiniModule, hashes: dict) -> None:
    tensors = {"X": m.X, "Y": m.Y}
    if outer.get(m.outer["source"]).STORED:
        tensors.update(U=m.U, V=m.V)
    for role, t in tensors.items():
        key = f"{m.name}.{role}"
        writer.add(key, t.contiguous())
        hashes[key] = sha256_tensor(t)


def resolve_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise BadInputError(f"no LoRA-Mini file ({FILE_NAME}) found", path.parent if path.name == FILE_NAME else path)
    return path


def is_mini(path: str | os.PathLike) -> bool:
    """True when `path` is (or is a directory holding) a LoRA-Mini file."""
    try:
        return LazyTensors(resolve_file(path)).metadata.get("format") == FORMAT_NAME
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
        if sha256_tensor(t) != hashes.get(key):
            raise IntegrityError(f"tensor {key!r} does not match its SHA-256 checksum (corrupt or tampered)", file)
        return t

    def load_module(name: str) -> MiniModule:
        return _module_from_spec(name, specs[name], checked, file)

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
    try:
        doc = json.loads(meta["lora_mini"])
    except (KeyError, ValueError) as exc:
        raise BadInputError(f"invalid lora_mini metadata ({exc})", file) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("modules"), dict) or not isinstance(
            doc.get("tensor_sha256"), dict) or not isinstance(doc.get("source_format"), str):
        raise BadInputError("lora_mini metadata lacks modules, tensor_sha256 or source_format", file)
    return doc


def _check_tensor_set(lazy: LazyTensors, specs: dict, passthrough: list, hashes: dict) -> None:
    expected = {PASSTHROUGH + n for n in passthrough}
    for name, spec in specs.items():
        roles = ["X", "Y"] + (["U", "V"] if spec.get("outer", {}).get("source") == "svd" else [])
        expected.update(f"{name}.{r}" for r in roles)
    present = set(lazy.keys())
    if present != expected:
        extra, missing = sorted(present - expected), sorted(expected - present)
        what = f"unexpected tensors {extra[:3]}" if extra else f"missing tensors {missing[:3]}"
        raise BadInputError(f"tensor set does not match the metadata: {what}", lazy.path)
    if set(hashes) != expected:
        raise BadInputError("tensor_sha256 does not list exactly the file's tensors", lazy.path)


def _module_from_spec(name: str, spec: dict, checked, file: Path) -> MiniModule:
    try:
        o = spec["outer"]
        src = outer.get(o["source"])
        out_f, in_f = int(spec["out_features"]), int(spec["in_features"])
        stored = {r: checked(f"{name}.{r}") for r in ("U", "V")} if src.STORED else {}
        U, V = src.restore(name, o, out_f, in_f, stored, file)
        X, Y = checked(f"{name}.X"), checked(f"{name}.Y")
        m = MiniModule(name=name, kind=spec["kind"], kernel=spec.get("kernel") or {}, rank=int(spec["rank"]),
                       alpha=float(spec["alpha"]), use_rslora=bool(spec["use_rslora"]), dtype=spec["dtype"],
                       outer=o, U=U, V=V, X=X, Y=Y, fidelity=spec.get("fidelity") or {})
    except (KeyError, TypeError, ValueError) as exc:
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
