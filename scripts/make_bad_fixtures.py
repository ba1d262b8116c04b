"""Generate the hostile-input corpus in fixtures/bad/.

    python scripts/make_bad_fixtures.py            # rewrites fixtures/bad/
    python scripts/make_bad_fixtures.py --out DIR  # somewhere else (tests compare with the committed copy)

Every case is a tiny directory or file that `lora-convert` must refuse with exit code 2 and
one line naming the file and the problem, without tracebacks, output files or executed code.
fixtures/bad/manifest.json lists, per case: the path, the command to run on it, extra
arguments, the words the error line must contain, and the file it must name.

Layers:
  st_*      the safetensors container itself (exercised through a PEFT directory)
  peft_*    PEFT semantics: config, ranks, factors, keys, pickles
  mini_*    the LoRA-Mini container: versions, seeds, fingerprints, checksums, tampering
  <fmt>_*   generic cases for every other format module registered in lora_convert.formats
            (kohya, lycoris, diffusers, mlx ... as they land): the same minimal adapter is
            written with the format's own writer, then broken in format-independent ways.
            Add format-specific cases with @case(..., fmt="kohya") in a section at the end.

Deterministic: running it twice gives byte-identical files on one machine; across CPUs and
BLAS builds the svd outers and the error figures of the svd files may differ in their last
bits (tests/test_bad_inputs.py checks that the committed corpus is up to date, allowing
exactly that).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safetensors.torch import save as st_save  # noqa: E402

import lora_convert as lc  # noqa: E402
from lora_convert import container, formats  # noqa: E402
from lora_convert.adapter import LoraModule, from_modules  # noqa: E402

MARKER = "LORA_CONVERT_PWNED"  # relative: created in the cwd of whoever unpickles the payload
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
PREFIX = "base_model.model."
CASES: dict[str, dict] = {}


def case(name: str, command: str, expect: list[str], *, file: str | None = None, args: list[str] = (),
         fmt: str = "peft", path: str | None = None, note: str = "", known_bug: str | None = None):
    """Register a case builder: fn(dest: Path) writes the case into fixtures/bad/<name>.

    `file`: the file (relative to the case) the error line must name; default: the case path.
    `path`: what the command is run on, relative to fixtures/bad (default: the case directory).
    `known_bug`: the case still fails for this (open) reason; the test marks it xfail.
    """
    def register(fn):
        CASES[name] = {"build": fn, "command": command, "expect": list(expect), "args": list(args),
                       "file": file, "format": fmt, "path": path, "note": note or (fn.__doc__ or "").strip(),
                       "known_bug": known_bug}
        return fn
    return register


# ---------------------------------------------------------------- raw byte helpers

def st_bytes(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file from a header (dict or raw bytes) and data; `length` overrides N."""
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def st_split(blob: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def tensors_file(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    """safetensors bytes, deterministic (the Rust writer orders __metadata__ keys at random)."""
    header, data = st_split(st_save({k: v.contiguous() for k, v in tensors.items()},
                                    metadata=metadata or {"format": "pt"}))
    meta = dict(sorted(header.pop("__metadata__", {}).items()))
    return st_bytes({"__metadata__": meta, **header}, data)


# ---------------------------------------------------------------- the valid base adapter

def base_modules(names=MODULES, dtype=torch.float32) -> list[LoraModule]:
    g = torch.Generator().manual_seed(1234)
    mods = []
    for name in names:
        down = (torch.randn(2, 8, generator=g) * 0.5).to(dtype)
        up = (torch.randn(8, 2, generator=g) * 0.5).to(dtype)
        mods.append(LoraModule(name=name, down=down, up=up, alpha=4.0))
    return mods


def base_adapter(names=MODULES) -> lc.Adapter:
    return from_modules("peft", base_modules(names), config=base_config())


def base_config(**over) -> dict:
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
           "task_type": "CAUSAL_LM", "base_model_name_or_path": None}
    cfg.update(over)
    return cfg


def base_tensors() -> dict[str, torch.Tensor]:
    out = {}
    for m in base_modules():
        out[f"{PREFIX}{m.name}.lora_A.weight"] = m.down
        out[f"{PREFIX}{m.name}.lora_B.weight"] = m.up
    return out


def write_peft(dest: Path, tensors: dict | bytes | None = None, config: dict | str | bytes | None = None) -> None:
    """A PEFT directory; tensors as a dict or raw file bytes, config as a dict or raw text."""
    dest.mkdir(parents=True, exist_ok=True)
    blob = tensors_file(base_tensors() if tensors is None else tensors) if not isinstance(tensors, bytes) else tensors
    (dest / "adapter_model.safetensors").write_bytes(blob)
    cfg = base_config() if config is None else config
    if isinstance(cfg, dict):
        cfg = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    if cfg is not False:
        (dest / "adapter_config.json").write_bytes(cfg.encode() if isinstance(cfg, str) else cfg)


def peft_with_st(dest: Path, blob: bytes) -> None:
    write_peft(dest, blob)


# ---------------------------------------------------------------- LoRA-Mini helpers

def mini_bytes(outer: str = "random", version: int | None = None, **opts) -> bytes:
    outer_dim = opts.pop("outer_dim", 4) if outer in ("random", "select") else None
    mini = lc.compress(base_adapter(), outer, seed=7, outer_dim=outer_dim, rank=2, **opts)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.safetensors"
        container.save(mini, out, format_version=version)
        return out.read_bytes()


def mini_parts(blob: bytes):
    header, data = st_split(blob)
    meta = header.pop("__metadata__")
    return header, meta, json.loads(meta["lora_mini"]), data


def mini_assemble(header: dict, meta: dict, doc: dict | None, data: bytes, resign: bool = True) -> bytes:
    meta = dict(meta)
    if doc is not None:
        meta["lora_mini"] = json.dumps(doc, sort_keys=True)
    if resign:
        layout = {k: (v["dtype"], v["shape"]) for k, v in header.items()}
        meta[container.METADATA_SHA256] = container.metadata_digest(meta, layout)
    return st_bytes({"__metadata__": meta, **header}, data)


def edit_mini(blob: bytes, edit, resign: bool = True) -> bytes:
    """Apply edit(doc, header) -> data|None to a LoRA-Mini file; re-sign the metadata checksum
    (so the check under test is the one that fires) unless resign=False."""
    header, meta, doc, data = mini_parts(blob)
    new_data = edit(doc, header, meta)
    return mini_assemble(header, meta, doc, data if new_data is None else new_data, resign)


def data_span(blob: bytes, key: str) -> tuple[int, int]:
    """Absolute byte range of tensor `key` in the file."""
    n = struct.unpack("<Q", blob[:8])[0]
    s, e = st_split(blob)[0][key]["data_offsets"]
    return 8 + n + s, 8 + n + e


MOD0 = MODULES[0]


# ================================================================ st_*: the safetensors layer

@case("st_empty_file", "compress", ["truncated"], file="adapter_model.safetensors")
def _(d):
    """adapter_model.safetensors is empty"""
    peft_with_st(d, b"")


@case("st_truncated_length", "compress", ["truncated"], file="adapter_model.safetensors")
def _(d):
    """fewer than the 8 bytes of the header length"""
    peft_with_st(d, b"\x10\x00\x00")


@case("st_truncated_data", "compress", ["past the end"], file="adapter_model.safetensors")
def _(d):
    """a valid file cut in the middle of its data buffer"""
    blob = tensors_file(base_tensors())
    peft_with_st(d, blob[:len(blob) - 40])


@case("st_truncated_header", "inspect", ["exceeds the file size"], file="adapter_model.safetensors")
def _(d):
    """a valid file cut in the middle of its JSON header"""
    peft_with_st(d, tensors_file(base_tensors())[:60])


@case("st_header_length_too_big", "compress", ["exceeds the file size"], file="adapter_model.safetensors")
def _(d):
    """declared header length (1 MB) larger than the whole file"""
    peft_with_st(d, st_bytes({}, length=1 << 20))


@case("st_header_length_huge", "inspect", ["invalid safetensors header length"], file="adapter_model.safetensors")
def _(d):
    """declared header length 2**64-1 (an allocation attempt)"""
    peft_with_st(d, st_bytes({"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}, b"\0" * 4,
                             length=2**64 - 1))


@case("st_header_length_zero", "inspect", ["invalid safetensors header length 0"], file="adapter_model.safetensors")
def _(d):
    """header length 0"""
    peft_with_st(d, struct.pack("<Q", 0) + b"{}" + b" " * 6)


@case("st_header_invalid_json", "compress", ["invalid safetensors header JSON"], file="adapter_model.safetensors")
def _(d):
    """header is not JSON"""
    peft_with_st(d, st_bytes(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'))


@case("st_header_not_utf8", "inspect", ["invalid safetensors header JSON"], file="adapter_model.safetensors")
def _(d):
    """header bytes are not UTF-8"""
    peft_with_st(d, st_bytes(b'{"\xff\xfe": 1}'))


@case("st_header_duplicate_key", "compress", ["duplicate key"], file="adapter_model.safetensors")
def _(d):
    """the same tensor name twice in the header: which one would a loader use?"""
    a = f"{PREFIX}{MOD0}.lora_A.weight"
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    peft_with_st(d, st_bytes(f'{{"{a}":{entry},"{a}":{entry}}}'.encode(), b"\0" * 4))


@case("st_header_not_object", "inspect", ["not a JSON object"], file="adapter_model.safetensors")
def _(d):
    """header is a JSON list"""
    peft_with_st(d, st_bytes(b"[1, 2, 3]"))


@case("st_header_deep_nesting", "inspect", ["invalid safetensors header"], file="adapter_model.safetensors")
def _(d):
    """header nests 10 000 JSON arrays (a recursion-limit attack on the parser)"""
    peft_with_st(d, st_bytes(b"[" * 10_000 + b"]" * 10_000))


@case("st_metadata_not_strings", "inspect", ["__metadata__"], file="adapter_model.safetensors")
def _(d):
    """__metadata__ values must be strings"""
    header, data = st_split(tensors_file(base_tensors()))
    header["__metadata__"] = {"format": 1}
    peft_with_st(d, st_bytes(header, data))


@case("st_offsets_overlap", "compress", ["overlap"], file="adapter_model.safetensors")
def _(d):
    """two tensors share bytes of the data buffer"""
    header, data = st_split(tensors_file(base_tensors()))
    keys = sorted(header, key=lambda k: header[k].get("data_offsets", [0])[0] if k != "__metadata__" else -1)
    first, second = keys[1], keys[2]
    s, e = header[first]["data_offsets"]
    header[second]["data_offsets"] = [s, e]  # same size (all 2x8 / 8x2 fp32)
    peft_with_st(d, st_bytes(header, data))


@case("st_offsets_outside", "inspect", ["past the end"], file="adapter_model.safetensors")
def _(d):
    """a tensor's data_offsets point beyond the end of the file"""
    header, data = st_split(tensors_file(base_tensors()))
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    s, e = header[last]["data_offsets"]
    header[last]["data_offsets"] = [s + 1_000_000, e + 1_000_000]
    peft_with_st(d, st_bytes(header, data))


@case("st_offsets_gap", "inspect", ["gap"], file="adapter_model.safetensors")
def _(d):
    """unreferenced bytes between two tensors (room for a hidden payload)"""
    header, data = st_split(tensors_file(base_tensors()))
    first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    for k in header:
        if k != "__metadata__" and k != first:
            header[k]["data_offsets"] = [o + 8 for o in header[k]["data_offsets"]]
    s, e = header[first]["data_offsets"]
    peft_with_st(d, st_bytes(header, data[:e] + b"\0" * 8 + data[e:]))


@case("st_trailing_bytes", "inspect", ["trailing bytes"], file="adapter_model.safetensors")
def _(d):
    """data buffer longer than the tensors in the header"""
    peft_with_st(d, tensors_file(base_tensors()) + b"PAYLOAD!")


@case("st_offsets_reversed", "inspect", ["invalid data_offsets"], file="adapter_model.safetensors")
def _(d):
    """data_offsets [end, start]"""
    header, data = st_split(tensors_file(base_tensors()))
    k = next(k for k in header if k != "__metadata__")
    header[k]["data_offsets"] = header[k]["data_offsets"][::-1]
    peft_with_st(d, st_bytes(header, data))


@case("st_dtype_shape_mismatch", "compress", ["need", "bytes"], file="adapter_model.safetensors")
def _(d):
    """shape × itemsize disagrees with the byte length (F32 [2, 8] declared as F64)"""
    header, data = st_split(tensors_file(base_tensors()))
    k = next(k for k in header if k != "__metadata__")
    header[k]["dtype"] = "F64"
    peft_with_st(d, st_bytes(header, data))


@case("st_unknown_dtype", "inspect", ["unknown dtype"], file="adapter_model.safetensors")
def _(d):
    """dtype "F128" """
    header, data = st_split(tensors_file(base_tensors()))
    k = next(k for k in header if k != "__metadata__")
    header[k]["dtype"] = "F128"
    peft_with_st(d, st_bytes(header, data))


@case("st_negative_shape", "inspect", ["invalid shape"], file="adapter_model.safetensors")
def _(d):
    """a negative dimension"""
    header, data = st_split(tensors_file(base_tensors()))
    k = next(k for k in header if k != "__metadata__")
    header[k]["shape"] = [-2, -8]
    peft_with_st(d, st_bytes(header, data))


@case("st_absurd_shape", "compress", ["need", "bytes"], file="adapter_model.safetensors")
def _(d):
    """shape [2**40, 2**40] declared for 64 bytes: a memory-exhaustion attempt"""
    header, data = st_split(tensors_file(base_tensors()))
    k = next(k for k in header if k != "__metadata__")
    header[k]["shape"] = [2**40, 2**40]
    peft_with_st(d, st_bytes(header, data))


@case("st_absurd_shape_overflow", "inspect", ["need", "bytes"], file="adapter_model.safetensors")
def _(d):
    """shape whose element count overflows 64 bits (2**32 × 2**32 × 2**32 × 2**32) while
    an overflowing product could wrap to the real byte length"""
    header, data = st_split(tensors_file(base_tensors()))
    k = next(k for k in header if k != "__metadata__")
    header[k]["shape"] = [2**32, 2**32, 2**32, 2**32 // 4 * 4 + 16]
    peft_with_st(d, st_bytes(header, data))


# ================================================================ peft_*: PEFT semantics

@case("peft_missing_config", "compress", ["missing adapter_config.json"])
def _(d):
    """adapter_model.safetensors without adapter_config.json"""
    write_peft(d, config=False)


@case("peft_config_invalid_json", "compress", ["invalid JSON"], file="adapter_config.json")
def _(d):
    """adapter_config.json is not JSON"""
    write_peft(d, config='{"r": 2, "lora_alpha": ')


@case("peft_config_not_object", "inspect", ["not a JSON object"], file="adapter_config.json")
def _(d):
    """adapter_config.json holds a list"""
    write_peft(d, config="[2, 4]\n")


@case("peft_config_deep_nesting", "inspect", ["invalid JSON"], file="adapter_config.json")
def _(d):
    """adapter_config.json nests 10 000 arrays"""
    write_peft(d, config="[" * 10_000 + "]" * 10_000)


@case("peft_config_nan_alpha", "compress", ["lora_alpha"], file="adapter_config.json")
def _(d):
    """lora_alpha: NaN (a JSON extension Python accepts) would poison every scale"""
    write_peft(d, config=json.dumps(base_config(lora_alpha=float("nan"))))


@case("peft_rank_zero", "compress", ["r must be a positive integer"], file="adapter_config.json")
def _(d):
    """config r = 0"""
    write_peft(d, config=base_config(r=0))


@case("peft_rank_negative", "compress", ["r must be a positive integer"], file="adapter_config.json")
def _(d):
    """config r = -1"""
    write_peft(d, config=base_config(r=-1))


@case("peft_rank_pattern_zero", "inspect", ["rank_pattern"], file="adapter_config.json")
def _(d):
    """rank_pattern gives a module rank 0"""
    write_peft(d, config=base_config(rank_pattern={"q_proj": 0}))


@case("peft_rank_pattern_bad_regex", "compress", ["rank_pattern", "regular expression"],
      file="adapter_config.json")
def _(d):
    """rank_pattern key is not a valid regular expression"""
    write_peft(d, config=base_config(rank_pattern={"q_proj(": 2}))


@case("peft_rank_pattern_redos", "inspect", ["rank_pattern", "too long"], file="adapter_config.json")
def _(d):
    """a catastrophic-backtracking rank_pattern against a long module name (a hang attempt)"""
    name = "a" * 40
    t = {f"{PREFIX}{name}.lora_A.weight": torch.zeros(2, 8), f"{PREFIX}{name}.lora_B.weight": torch.zeros(8, 2)}
    write_peft(d, t, base_config(rank_pattern={"(a*)*b": 2}))


@case("peft_modules_to_save_not_list", "inspect", ["modules_to_save"], file="adapter_config.json")
def _(d):
    """modules_to_save is a number"""
    write_peft(d, config=base_config(modules_to_save=5))


@case("peft_zero_row_factor", "compress", ["rank 0"], file="adapter_model.safetensors")
def _(d):
    """lora_A with 0 rows and lora_B with 0 columns (rank 0)"""
    t = base_tensors()
    t[f"{PREFIX}{MOD0}.lora_A.weight"] = torch.zeros(0, 8)
    t[f"{PREFIX}{MOD0}.lora_B.weight"] = torch.zeros(8, 0)
    write_peft(d, t)


@case("peft_empty_dims_absurd_rank", "compress", ["empty"], file="adapter_model.safetensors")
def _(d):
    """zero-size factors of rank 2**40 ([2**40, 0] and [0, 2**40]): valid bytes, absurd rank"""
    t = base_tensors()
    t[f"{PREFIX}{MOD0}.lora_A.weight"] = torch.zeros(0, 0)
    t[f"{PREFIX}{MOD0}.lora_B.weight"] = torch.zeros(0, 0)
    blob = tensors_file(t)
    header, data = st_split(blob)
    header[f"{PREFIX}{MOD0}.lora_A.weight"]["shape"] = [2**40, 0]
    header[f"{PREFIX}{MOD0}.lora_B.weight"]["shape"] = [0, 2**40]
    write_peft(d, st_bytes(header, data), base_config(rank_pattern={"q_proj": 2**40}))


@case("peft_rank_mismatch", "compress", ["rank mismatch"], file="adapter_model.safetensors")
def _(d):
    """lora_A has rank 2, lora_B rank 3"""
    t = base_tensors()
    t[f"{PREFIX}{MOD0}.lora_B.weight"] = torch.ones(8, 3)
    write_peft(d, t)


@case("peft_rank_disagrees_with_config", "compress", ["rank 2", "says 4"], file="adapter_model.safetensors")
def _(d):
    """tensors have rank 2, config r = 4 (the scale would be wrong)"""
    write_peft(d, config=base_config(r=4))


@case("peft_only_lora_A", "compress", ["only one factor", "lora_B"], file="adapter_model.safetensors")
def _(d):
    """a module with lora_A but no lora_B"""
    t = base_tensors()
    del t[f"{PREFIX}{MOD0}.lora_B.weight"]
    write_peft(d, t)


@case("peft_only_lora_B", "inspect", ["only one factor", "lora_A"], file="adapter_model.safetensors")
def _(d):
    """a module with lora_B but no lora_A"""
    t = base_tensors()
    del t[f"{PREFIX}{MOD0}.lora_A.weight"]
    write_peft(d, t)


@case("peft_unknown_keys", "compress", ["unknown keys"], file="adapter_model.safetensors")
def _(d):
    """a tensor that is neither a LoRA factor nor modules_to_save"""
    t = base_tensors()
    t["base_model.model.model.layers.0.mlp.hidden_payload"] = torch.zeros(4)
    write_peft(d, t)


@case("peft_no_modules", "inspect", ["no LoRA modules"], file="adapter_model.safetensors")
def _(d):
    """a safetensors file with no tensors at all"""
    write_peft(d, {})


@case("peft_nan_factor", "compress", ["NaN or Inf"], file="adapter_model.safetensors")
def _(d):
    """a NaN in lora_A"""
    t = base_tensors()
    t[f"{PREFIX}{MOD0}.lora_A.weight"][0, 3] = float("nan")
    write_peft(d, t)


@case("peft_inf_factor", "compress", ["NaN or Inf"], file="adapter_model.safetensors")
def _(d):
    """an Inf in lora_B (fp16)"""
    t = {k: v.half() for k, v in base_tensors().items()}
    t[f"{PREFIX}{MOD0}.lora_B.weight"][1, 1] = float("inf")
    write_peft(d, t)


@case("peft_integer_factor", "compress", ["floating"], file="adapter_model.safetensors")
def _(d):
    """lora_A stored as int64"""
    t = base_tensors()
    t[f"{PREFIX}{MOD0}.lora_A.weight"] = torch.ones(2, 8, dtype=torch.int64)
    write_peft(d, t)


@case("peft_scalar_factor", "inspect", ["low-rank pair"], file="adapter_model.safetensors")
def _(d):
    """0-d lora_A"""
    t = base_tensors()
    t[f"{PREFIX}{MOD0}.lora_A.weight"] = torch.tensor(1.0)
    write_peft(d, t)


@case("peft_conv_big_kernel", "compress", ["module", "kernel", "not supported"], file="adapter_model.safetensors")
def _(d):
    """conv lora_B with a 3x3 kernel (unsupported, must still name the file)"""
    t = base_tensors()
    t[f"{PREFIX}{MOD0}.lora_A.weight"] = torch.ones(2, 8, 1, 1)
    t[f"{PREFIX}{MOD0}.lora_B.weight"] = torch.ones(8, 2, 3, 3)
    write_peft(d, t)


@case("peft_dora", "compress", ["DoRA"], file="adapter_model.safetensors")
def _(d):
    """DoRA magnitude vectors (unsupported)"""
    t = base_tensors()
    t[f"{PREFIX}{MOD0}.lora_magnitude_vector"] = torch.ones(8)
    write_peft(d, t)


# ---------------------------------------------------------------- pickles that try to run code

class _System:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


class _Open:
    def __reduce__(self):
        return (open, (MARKER, "w"))


def _pickle_dir(d: Path, blob: bytes) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps(base_config(), indent=2, sort_keys=True) + "\n")
    (d / "adapter_model.bin").write_bytes(blob)


def _torch_zip_pickle(obj) -> bytes:
    """torch.save's zip format, made deterministic (torch writes a random serialization_id)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    src, out = zipfile.ZipFile(io.BytesIO(buf.getvalue())), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("serialization_id"):
                data = b"0" * len(data)
            z.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return out.getvalue()


_PICKLES = {
    "peft_pickle_os_system": lambda: pickle.dumps({"x": _System()}, protocol=2),
    "peft_pickle_open": lambda: pickle.dumps({"x": _Open()}, protocol=2),
    "peft_pickle_proto5_os_system": lambda: pickle.dumps({"x": _System()}, protocol=5),
    "peft_pickle_zip_os_system": lambda: _torch_zip_pickle({"x": _System()}),
}
for _name, _make in _PICKLES.items():
    def _build(d, _make=_make):
        """adapter_model.bin whose __reduce__ tries to create a marker file"""
        _pickle_dir(d, _make())
    case(_name, "compress", ["pickle", "--allow-pickle"], file="adapter_model.bin",
         note=f"pickle whose __reduce__ tries to create ./{MARKER}; refused without --allow-pickle")(_build)
    case(_name + "+allow", "compress", ["refused to load pickle"], file="adapter_model.bin", path=_name,
         args=["--allow-pickle"],
         note=f"same payload with --allow-pickle: torch.load(weights_only=True) must refuse it")(lambda d: None)


def _zip_bomb() -> bytes:
    """A torch.save archive whose 16 MiB tensor is deflate-compressed to a few KiB."""
    n = 1 << 22
    src = zipfile.ZipFile(io.BytesIO(_torch_zip_pickle({"x": torch.zeros(4)})))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"cpuq\x06K\x04t", b"cpuq\x06J" + struct.pack("<i", n) + b"t")
                data = data.replace(b"K\x00K\x04\x85", b"K\x00J" + struct.pack("<i", n) + b"\x85")
            elif info.filename.endswith("/data/0"):
                data = bytes(4 * n)
            z.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), data,
                       compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return out.getvalue()


@case("peft_pickle_zip_bomb", "compress", ["zip bomb"], file="adapter_model.bin", args=["--allow-pickle"])
def _(d):
    """with --allow-pickle: a torch.save archive whose entries are deflate-compressed (16 MiB from
    a few KiB; the same trick makes gigabytes from megabytes)"""
    _pickle_dir(d, _zip_bomb())


# ================================================================ mini_*: the LoRA-Mini container

_MINI = {}


def mini(outer: str = "random") -> bytes:
    if outer not in _MINI:
        _MINI[outer] = mini_bytes(outer)
    return _MINI[outer]


def write_mini(d: Path, blob: bytes, as_dir: bool = False) -> None:
    if as_dir:
        d.mkdir(parents=True, exist_ok=True)
        (d / container.FILE_NAME).write_bytes(blob)
    else:
        d.parent.mkdir(parents=True, exist_ok=True)
        d.write_bytes(blob)


def write_spec_edit(f, value, *keys, resign=True):
    """Write the valid LoRA-Mini file with the first module's spec[keys...] set to `value`, its
    metadata checksum re-signed unless `resign` is False."""
    def edit(doc, header, meta):
        target = doc["modules"][MOD0]
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    write_mini(f, edit_mini(mini(), edit, resign=resign))


def mini_case(name, command, expect, **kw):
    """A LoRA-Mini case stored as a single file fixtures/bad/<name>.safetensors."""
    def register(fn):
        def build(d):
            fn(d.parent / (d.name + ".safetensors"))
        build.__doc__ = fn.__doc__
        return case(name, command, expect, path=name + ".safetensors", fmt="lora-mini", **kw)(build)
    return register


@mini_case("mini_wrong_generator_version", "verify", ["generator", "version 2", "not supported"])
def _(f):
    """random outer generator_version 2 (re-signed)"""
    write_spec_edit(f, 2, "outer", "generator_version")


@mini_case("mini_wrong_generator_name", "reconstruct", ["generator", "not supported"])
def _(f):
    """unknown random outer generator (re-signed)"""
    write_spec_edit(f, "mt19937", "outer", "generator")


@mini_case("mini_wrong_seed", "verify", ["fingerprint"])
def _(f):
    """seed 7 changed to 8 with the metadata checksum re-signed: the outer fingerprint catches it"""
    def edit(doc, header, meta):
        for spec in doc["modules"].values():
            spec["outer"]["seed"] = 8
    write_mini(f, edit_mini(mini(), edit))


@mini_case("mini_select_wrong_seed", "verify", ["fingerprint", "regenerated outer"])
def _(f):
    """subset (select) outers, seed 7 changed to 8 and re-signed: the fingerprint catches it"""
    def edit(doc, header, meta):
        for spec in doc["modules"].values():
            spec["outer"]["seed"] = 8
    write_mini(f, edit_mini(mini_bytes("select"), edit))


@mini_case("mini_random_relabelled_select", "verify", ["fingerprint", "regenerated outer"])
def _(f):
    """random outers relabelled as select outers (re-signed): the subsets do not match the
    random outers' fingerprints, so the other source is never applied"""
    def edit(doc, header, meta):
        for spec in doc["modules"].values():
            spec["outer"]["source"] = "select"
    write_mini(f, edit_mini(mini(), edit))


@mini_case("mini_wrong_seed_unsigned", "verify", ["lora_mini_sha256", "checksum"])
def _(f):
    """seed changed, metadata checksum left as it was"""
    write_spec_edit(f, 8, "outer", "seed", resign=False)


@mini_case("mini_changed_alpha_unsigned", "reconstruct", ["lora_mini_sha256", "checksum"])
def _(f):
    """alpha 4 -> 40 in a module spec (a silently 10x stronger adapter without the checksum)"""
    write_spec_edit(f, 40.0, "alpha", resign=False)


@mini_case("mini_missing_checksum", "verify", ["no lora_mini_sha256"])
def _(f):
    """metadata without lora_mini_sha256"""
    header, meta, doc, data = mini_parts(mini())
    del meta[container.METADATA_SHA256]
    write_mini(f, st_bytes({"__metadata__": meta, **header}, data))


@mini_case("mini_tampered_inner", "verify", ["SHA-256 checksum", ".X"])
def _(f):
    """inner tensor X of one module overwritten with other values"""
    blob = bytearray(mini())
    s, e = data_span(bytes(blob), f"{MOD0}.X")
    blob[s:e] = torch.full(((e - s) // 4,), 0.25).numpy().tobytes()
    write_mini(f, bytes(blob))


@mini_case("mini_flipped_byte", "verify", ["SHA-256 checksum"])
def _(f):
    """one byte flipped (XOR 0x01) in the last inner tensor's data"""
    blob = bytearray(mini())
    blob[-3] ^= 0x01
    write_mini(f, bytes(blob))


@mini_case("mini_tampered_svd_outer", "reconstruct", ["SHA-256 checksum", ".U"])
def _(f):
    """stored svd outer U overwritten"""
    blob = bytearray(mini("svd"))
    s, e = data_span(bytes(blob), f"{MOD0}.U")
    blob[s:s + 4] = b"\x00\x00\x80\x3f"
    write_mini(f, bytes(blob))


@mini_case("mini_nan_inner_resigned", "verify", ["non-finite"])
def _(f):
    """a NaN in X with its tensor checksum and metadata checksum recomputed"""
    blob = bytearray(mini())
    key = f"{MOD0}.X"
    s, e = data_span(bytes(blob), key)
    blob[s:s + 4] = struct.pack("<f", float("nan"))
    def edit(doc, header, meta):
        doc["tensor_sha256"][key] = hashlib.sha256(bytes(blob[s:e])).hexdigest()
    write_mini(f, edit_mini(bytes(blob), edit))


@mini_case("mini_format_version_4", "verify", ["format version", "not supported"])
def _(f):
    """format_version "4" (re-signed)"""
    header, meta, doc, data = mini_parts(mini())
    meta["format_version"] = "4"
    write_mini(f, mini_assemble(header, meta, None, data))


@mini_case("mini_regeneration_bomb", "verify", ["in total", "LORA_CONVERT_MAX_TOTAL_ELEMENTS"])
def _(f):
    """a few kilobytes declaring 40 modules of 16384x16384 at rank 16384, each with its own outer
    stream: every matrix is within the per-matrix cap, together they are 2**34.3 elements"""
    header, meta, doc, data = mini_parts(mini())
    template = doc["modules"][MOD0]
    n, side = 40, 1 << 14
    specs, tensors, hashes, blob = {}, {}, {}, b""
    one = struct.pack("<f", 0.5)
    for i in range(n):
        name = f"model.layers.{i}.self_attn.q_proj"
        spec = json.loads(json.dumps(template))
        spec.update(rank=side, out_features=side, in_features=side, inner_rank=1)
        spec["outer"].update(a=1, b=1, stream=name)
        specs[name] = spec
        for role in ("X", "Y"):
            tensors[f"{name}.{role}"] = {"dtype": "F32", "shape": [1, 1], "data_offsets": [len(blob), len(blob) + 4]}
            hashes[f"{name}.{role}"] = hashlib.sha256(one).hexdigest()
            blob += one
    doc.update(modules=specs, tensor_sha256=hashes)
    write_mini(f, mini_assemble(tensors, meta, doc, blob))


@mini_case("mini_quant_tampered_scale", "verify", ["SHA-256 checksum", ".q"])
def _(f):
    """version 2: the first fp16 scale of a quantized module's packed tensor doubled"""
    blob = bytearray(mini_bytes("svd", version=2, bits=4))
    s, e = data_span(bytes(blob), f"{MOD0}.q")
    blob[s + 1] ^= 0x04  # exponent bit of the first (little-endian) fp16 scale
    write_mini(f, bytes(blob))


@mini_case("mini_quant_unknown_bits", "verify", ["malformed spec", "bits"])
def _(f):
    """version 2: quant bits 5 in a module spec (re-signed)"""
    def edit(doc, header, meta):
        doc["modules"][MOD0]["quant"]["bits"] = 5
    write_mini(f, edit_mini(mini_bytes("svd", version=2, bits=4), edit))


@mini_case("mini_packed_tampered_scale", "verify", ["SHA-256 checksum", "__packed__.0", MOD0])
def _(f):
    """version 3: the first fp16 scale of the packed tensor (the first module's) doubled"""
    blob = bytearray(mini_bytes("svd", bits=4))
    s, e = data_span(bytes(blob), "__packed__.0")
    blob[s + 1] ^= 0x04
    write_mini(f, bytes(blob))


@mini_case("mini_packed_unknown_bits", "verify", ["malformed spec", "bits"])
def _(f):
    """version 3: bits 5 in the first module's entry (re-signed)"""
    def edit(doc, header, meta):
        doc["modules"][0][4] = 5
    write_mini(f, edit_mini(mini_bytes("svd", bits=4), edit))


@mini_case("mini_packed_unknown_codebook", "verify", ["malformed spec", "bits", "'nf3'"])
def _(f):
    """version 3: an NF4 file whose first entry names the codebook "nf3", which does not exist (re-signed)"""
    def edit(doc, header, meta):
        doc["modules"][0][4] = "nf3"
    write_mini(f, edit_mini(mini_bytes("svd", bits="nf4"), edit))


@mini_case("mini_quant_unknown_codebook", "verify", ["malformed spec", "bits", "'fp4'"])
def _(f):
    """version 2: an NF4 file whose first module names the codebook "fp4", which does not exist (re-signed)"""
    def edit(doc, header, meta):
        doc["modules"][MOD0]["quant"]["bits"] = "fp4"
    write_mini(f, edit_mini(mini_bytes("svd", version=2, bits="nf4"), edit))


@mini_case("mini_packed_length_mismatch", "verify", ["packed", "do not account"])
def _(f):
    """version 3: the first module's entry says inner rank 1 where its packed bytes hold 2 (re-signed):
    the packed tensor then holds bytes no module accounts for"""
    def edit(doc, header, meta):
        doc["modules"][0][3] = 1
    write_mini(f, edit_mini(mini_bytes("svd", bits=4), edit))


@mini_case("mini_packed_entry_malformed", "verify", ["module entry"])
def _(f):
    """version 3: a module entry that is an object, not a list (re-signed)"""
    def edit(doc, header, meta):
        doc["modules"][0] = {"name": doc["modules"][0][0]}
    write_mini(f, edit_mini(mini_bytes("svd", bits=4), edit))


@mini_case("mini_not_lora_mini", "verify", ["not a LoRA-Mini file"])
def _(f):
    """a plain safetensors file given to verify"""
    write_mini(f, tensors_file(base_tensors()))


@mini_case("mini_invalid_metadata_json", "verify", ["invalid lora_mini metadata"])
def _(f):
    """the lora_mini document is not JSON (re-signed)"""
    header, meta, doc, data = mini_parts(mini())
    meta["lora_mini"] = meta["lora_mini"][:-5]
    write_mini(f, mini_assemble(header, meta, None, data))


@mini_case("mini_missing_tensor", "verify", ["missing tensors"])
def _(f):
    """a module's Y tensor removed from the file (re-signed)"""
    header, meta, doc, data = mini_parts(mini())
    key = f"{MOD0}.Y"
    s, e = header.pop(key)["data_offsets"]
    for v in header.values():
        if v["data_offsets"][0] >= e:
            v["data_offsets"] = [o - (e - s) for o in v["data_offsets"]]
    write_mini(f, mini_assemble(header, meta, doc, data[:s] + data[e:]))


@mini_case("mini_extra_tensor", "verify", ["unexpected tensors"])
def _(f):
    """an extra tensor the metadata does not mention (re-signed)"""
    header, meta, doc, data = mini_parts(mini())
    header["payload"] = {"dtype": "U8", "shape": [8], "data_offsets": [len(data), len(data) + 8]}
    write_mini(f, mini_assemble(header, meta, doc, data + b"PAYLOAD!"))


@mini_case("mini_truncated", "verify", ["past the end"])
def _(f):
    """a LoRA-Mini file cut short"""
    write_mini(f, mini()[:-16])


@mini_case("mini_integer_inner", "verify", ["must be 2-D"])
def _(f):
    """X declared I32 instead of F32: same bytes, same checksum, different numbers (re-signed)"""
    def edit(doc, header, meta):
        header[f"{MOD0}.X"]["dtype"] = "I32"
    write_mini(f, edit_mini(mini(), edit))


@mini_case("mini_malformed_spec", "verify", ["malformed spec", "rank"])
def _(f):
    """module rank is a string (re-signed)"""
    write_spec_edit(f, "two", "rank")


@mini_case("mini_inner_rank_exceeds_rank", "verify", ["malformed spec", "inner rank"])
def _(f):
    """inner rank k larger than the original rank (re-signed)"""
    write_spec_edit(f, 1, "rank")


@mini_case("mini_absurd_outer_size", "verify", ["over the limit"])
def _(f):
    """out_features 2**40: regenerating U would need 2**42 floats (re-signed)"""
    write_spec_edit(f, 2**40, "out_features")


@mini_case("mini_absurd_rank", "reconstruct", ["over the limit"])
def _(f):
    """rank 2**40: padding the factors back to it would need terabytes (re-signed)"""
    write_spec_edit(f, 2**40, "rank")


@mini_case("mini_unknown_kind", "reconstruct", ["malformed spec", "kind"])
def _(f):
    """module kind "attention" (re-signed)"""
    write_spec_edit(f, "attention", "kind")


@mini_case("mini_conv_without_kernel", "reconstruct", ["malformed spec", "kernel"])
def _(f):
    """kind conv with no kernel shapes: the PEFT writer could not reshape (re-signed)"""
    write_spec_edit(f, "conv", "kind")


@mini_case("mini_bad_dtype_name", "reconstruct", ["malformed spec", "dtype"])
def _(f):
    """original dtype "manual_seed" (a torch attribute that is not a dtype; re-signed)"""
    write_spec_edit(f, "manual_seed", "dtype")


@case("mini_dir_truncated", "inspect", ["past the end"], file=container.FILE_NAME, fmt="lora-mini")
def _(d):
    """a LoRA-Mini directory whose lora_mini.safetensors is cut short (inspect must say so,
    not 'not a recognised layout')"""
    write_mini(d, mini()[:-16], as_dir=True)


# ================================================================ other formats (generic)

# Module-name sets to try, in order, for the generic base adapter of a format: the first one
# the format's writer accepts and its reader reads back is used (LLM formats want model.*,
# diffusion formats a pipeline component).
BASE_NAMES = [
    MODULES,
    ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"],
    ["text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
     "text_encoder.text_model.encoder.layers.0.self_attn.v_proj"],
]
GENERIC: dict[str, dict] = {}  # format -> {"names": [...], "target": relative input path}


def _format_base(fmt: str, mod) -> dict | None:
    """Find a base adapter `fmt` can write and read back; None when there is none."""
    for names in BASE_NAMES:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / ("adapter" if mod.output_is_dir else "adapter.safetensors")
            try:
                formats.write(base_adapter(names), target, fmt)
                back = formats.read(target, fmt)
                for _m in back.modules():
                    pass
            except lc.LoraConvertError as exc:
                print(f"  {fmt}: base {names[0].split('.')[0]}.* not usable ({exc})", file=sys.stderr)
                continue
            return {"names": names, "target": target.name}
    return None


def _write_format_base(d: Path, fmt: str) -> tuple[Path, Path]:
    """Write the format's base adapter into `d`; (input path, its largest .safetensors file)."""
    d.mkdir(parents=True, exist_ok=True)
    target = d / GENERIC[fmt]["target"]
    formats.write(base_adapter(GENERIC[fmt]["names"]), target, fmt)
    files = [target] if target.is_file() else sorted(target.rglob("*.safetensors"))
    return target, max(files, key=lambda p: (p.stat().st_size, p.name))


def _reload(p: Path):
    from safetensors.torch import load_file
    return load_file(p), st_split(p.read_bytes())[0].get("__metadata__")


def _g_truncate(p):
    p.write_bytes(p.read_bytes()[:-16])


def _g_huge_len(p):
    p.write_bytes(struct.pack("<Q", 1 << 40) + p.read_bytes()[8:])


def _g_dup_key(p):
    header, data = st_split(p.read_bytes())
    raw = json.dumps(header, separators=(",", ":"))
    k = next(k for k in header if k != "__metadata__")
    entry = json.dumps({k: header[k]}, separators=(",", ":"))[1:-1]
    p.write_bytes(st_bytes(("{" + entry + "," + raw[1:]).encode(), data))


def _g_absurd(p):
    header, data = st_split(p.read_bytes())
    k = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[k]["shape"] = [2**40, 2**40]
    p.write_bytes(st_bytes(header, data))


def _g_overlap(p):
    header, data = st_split(p.read_bytes())
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    s, e = header[last]["data_offsets"]
    header[last]["data_offsets"] = [s - 4, e - 4]
    p.write_bytes(st_bytes(header, data[:-4]))


def _g_nan(p):
    t, meta = _reload(p)
    k = max(k for k in t if t[k].is_floating_point() and t[k].dim() >= 2)
    t[k].view(-1)[0] = float("nan")
    p.write_bytes(tensors_file(t, meta))


def _g_drop_factor(p):
    t, meta = _reload(p)
    del t[min(k for k in t if t[k].dim() >= 2)]
    p.write_bytes(tensors_file(t, meta))


def _g_unknown_key(p):
    t, meta = _reload(p)
    t["zz_hidden_payload.weight"] = torch.zeros(3, 5)
    p.write_bytes(tensors_file(t, meta))


def _g_rank_mismatch(p):
    t, meta = _reload(p)
    k = min(k for k in t if t[k].dim() >= 2 and 2 in t[k].shape)
    t[k] = torch.ones([3 if n == 2 else n for n in t[k].shape], dtype=t[k].dtype)
    p.write_bytes(tensors_file(t, meta))


def _g_zero_rank(p):
    t, meta = _reload(p)
    for k in [k for k in t if t[k].dim() >= 2]:
        t[k] = torch.zeros([0 if n == 2 else n for n in t[k].shape], dtype=t[k].dtype)
    p.write_bytes(tensors_file(t, meta))


# (suffix, words the line must contain, mutation of the largest tensors file, description)
GENERIC_VARIANTS = [
    ("truncated", ["past the end"], _g_truncate, "tensors file cut short"),
    ("header_length_huge", ["header length"], _g_huge_len, "header length 2**40"),
    ("duplicate_key", ["duplicate key"], _g_dup_key, "a tensor name twice in the header"),
    ("absurd_shape", ["need", "bytes"], _g_absurd, "shape [2**40, 2**40] declared for a few bytes"),
    ("overlap", ["overlap"], _g_overlap, "two tensors share bytes"),
    ("nan", [], _g_nan, "a NaN in a factor"),
    ("drop_factor", [], _g_drop_factor, "one factor of a module removed"),
    ("unknown_key", [], _g_unknown_key, "a tensor that is no LoRA factor"),
    ("rank_mismatch", [], _g_rank_mismatch, "one factor's rank changed from 2 to 3"),
    ("zero_rank", [], _g_zero_rank, "every factor with rank 0"),
]


def register_generic_cases(fmts: list[str]) -> list[str]:
    """Add the generic cases of every format in `fmts` (other than peft); returns those covered.

    Each case runs `inspect --from <fmt>` and must exit 2 with one line naming the broken file;
    the safetensors-level variants also require the words lora_convert.st uses."""
    covered = []
    for fmt in fmts:
        mod = formats.REGISTRY.get(fmt)
        if fmt == "peft" or mod is None:
            continue
        base = _format_base(fmt, mod)
        if base is None:
            print(f"warning: no base adapter for format {fmt!r}; its cases are skipped", file=sys.stderr)
            continue
        GENERIC[fmt] = base
        covered.append(fmt)
        register_specific_cases(fmt)
        CONTROLS[fmt] = {"path": f"_valid/{fmt}/{base['target']}", "command": "inspect", "args": ["--from", fmt]}
        for suffix, expect, mutate, doc in GENERIC_VARIANTS:
            name = f"{fmt}_{suffix}"

            def build(d, name=name, fmt=fmt, mutate=mutate):
                target, st = _write_format_base(d, fmt)
                mutate(st)
                CASES[name]["path"] = str(Path(name) / target.relative_to(d))
                CASES[name]["file"] = str(st.relative_to(target)) if target.is_dir() else None

            build.__doc__ = doc
            case(name, "inspect", expect, args=["--from", fmt], fmt=fmt)(build)
    return covered


# ---------------------------------------------------------------- format-specific cases
# Built from the real per-format fixtures in fixtures/formats/ (made by each format's owner).
# Register more with specific("<fmt>", ...); they are added when the format is covered.

SPECIFIC: dict[str, list] = {}
FORMAT_FIXTURES = ROOT / "fixtures" / "formats"
BASE = "<base>"  # source: the tiny generic base adapter written by the format's own writer


def specific(fmt: str, name: str, command: str, expect: list[str], source: str, known_bug: str | None = None):
    """A case made by editing fixtures/formats/<source> (a file or a directory) or, with
    source=BASE, the format's generic base adapter; edit(path) gets the copy's path."""
    def register(edit):
        SPECIFIC.setdefault(fmt, []).append((name, command, expect, source, edit, known_bug))
        return edit
    return register


def _st_edit(p: Path, fn) -> None:
    """Load a safetensors file, let fn(tensors) edit the dict, write it back (metadata kept)."""
    from safetensors.torch import load_file
    meta = st_split(p.read_bytes())[0].get("__metadata__")
    tensors = load_file(p)
    fn(tensors)
    p.write_bytes(tensors_file(tensors, meta))


def _first(tensors, suffix):
    return sorted(k for k in tensors if k.endswith(suffix))[0]


@specific("kohya", "kohya_alpha_nan", "compress", ["NaN or Inf"], BASE)
def _(p):
    """a module's .alpha is NaN"""
    _st_edit(p, lambda t: t.__setitem__(_first(t, ".alpha"), torch.tensor(float("nan"))))


@specific("kohya", "kohya_alpha_vector", "inspect", ["alpha"], BASE)
def _(p):
    """a module's .alpha is a 2-vector: which one is the scale?"""
    _st_edit(p, lambda t: t.__setitem__(_first(t, ".alpha"), torch.tensor([1.0, 2.0])))


@specific("kohya", "kohya_locon_tucker_overflow", "compress", ["NaN or Inf"], "kohya-locon.safetensors")
def _(p):
    """a LoCon (Tucker) module whose lora_mid and lora_down are 1e30: finite, but the fold overflows"""
    def edit(t):
        stem = _first(t, "lora_mid.weight")[:-len("lora_mid.weight")]
        for f in ("lora_mid.weight", "lora_down.weight"):
            t[stem + f] = torch.full_like(t[stem + f], 1e30)
    _st_edit(p, edit)


@specific("lycoris", "lycoris_loha_missing_factor", "compress", ["incomplete"], "lycoris-loha.safetensors")
def _(p):
    """a LoHa module without hada_w2_b"""
    _st_edit(p, lambda t: t.pop(_first(t, "hada_w2_b")))


@specific("lycoris", "lycoris_loha_bad_shape", "inspect", ["do not fit"], "lycoris-loha.safetensors")
def _(p):
    """a LoHa hada_w2_b whose shape cannot pair with w1"""
    _st_edit(p, lambda t: t.__setitem__(_first(t, "hada_w2_b"), torch.ones(5, 5)))


@specific("lycoris", "lycoris_lokr_missing_w1", "inspect", ["incomplete"], "lycoris-lokr.safetensors")
def _(p):
    """a LoKr module without lokr_w1"""
    _st_edit(p, lambda t: t.pop(_first(t, ".lokr_w1")))


@specific("lycoris", "lycoris_loha_overflow", "compress", [], "lycoris-loha.safetensors")
def _(p):
    """every factor of one LoHa module is 1e30: finite, but the product overflows"""
    def edit(t):
        stem = _first(t, "hada_w1_b")[:-len("hada_w1_b")]
        for f in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            t[stem + f] = torch.full_like(t[stem + f], 1e30)
    _st_edit(p, edit)


@specific("mlx", "mlx_no_lora_parameters", "inspect", ["lora_parameters"], BASE)
def _(d):
    """adapter_config.json without lora_parameters"""
    cfg = json.loads((d / "adapter_config.json").read_text())
    del cfg["lora_parameters"]
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


@specific("mlx", "mlx_scale_nan", "inspect", ["scale"], BASE)
def _(d):
    """lora_parameters.scale is NaN"""
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["lora_parameters"]["scale"] = float("nan")
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


@specific("mlx", "mlx_nan_factor", "compress", ["NaN or Inf"], BASE)
def _(d):
    """a NaN in a lora_a"""
    def edit(t):
        t[_first(t, "lora_a")].view(-1)[0] = float("nan")
    _st_edit(d / "adapters.safetensors", edit)


@specific("diffusers", "diffusers_only_down", "inspect", [], BASE)
def _(d):
    """a module with its down factor but no up factor"""
    def edit(t):
        up = sorted(k for k in t if "lora_B" in k or "lora.up" in k or "lora_up" in k)[0]
        del t[up]
    _st_edit(d, edit)


@specific("diffusers", "diffusers_conv_big_kernel", "compress", ["module", "kernel", "not supported"], BASE)
def _(d):
    """a conv module whose up factor has a 3x3 kernel (unsupported; must name the module and file)"""
    def edit(t):
        up = sorted(k for k in t if "lora_B" in k or "lora.up" in k or "lora_up" in k)[0]
        down = up.replace("lora_B", "lora_A").replace("lora.up", "lora.down").replace("lora_up", "lora_down")
        r = t[up].shape[1]
        t[down] = torch.ones(r, t[down].shape[1], 1, 1)
        t[up] = torch.ones(t[up].shape[0], r, 3, 3)
    _st_edit(d, edit)


@specific("lycoris", "lycoris_mixed_prefixes", "inspect", ["mixes", "lycoris_"], "lycoris-loha.safetensors")
def _(p):
    """one module under LyCORIS's own lycoris_ prefix, the others under kohya's lora_unet_/lora_te_"""
    def edit(t):
        stem = _first(t, "hada_w1_a")[:-len("hada_w1_a")]
        for k in [k for k in t if k.startswith(stem)]:
            t["lycoris_" + k.split("_", 2)[2]] = t.pop(k)
    _st_edit(p, edit)


@specific("kohya", "kohya_comfyui_both_factor_names", "inspect", ["both", "lora_A"], "kohya-flux.safetensors")
def _(p):
    """a ComfyUI-named module (diffusion_model.<path>) with lora_down and lora_A both present"""
    def edit(t):
        stem = "lora_unet_double_blocks_0_img_attn_qkv"
        for k in [k for k in t if k.startswith(stem + ".")]:
            t["diffusion_model.double_blocks.0.img_attn.qkv" + k[len(stem):]] = t.pop(k)
        t["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"] = \
            t["diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"].clone()
    _st_edit(p, edit)


@specific("diffusers", "diffusers_model_level_only_down", "inspect", ["incomplete"], "diffusers-sdxl.safetensors")
def _(p):
    """a model-level file (save_lora_adapter: no unet. prefix) with a module missing lora_B"""
    def edit(t):
        for k in list(t):
            v = t.pop(k)
            if k.startswith("unet."):
                t[k[len("unet."):]] = v
        del t[_first(t, "lora_B.weight")]
    _st_edit(p, edit)


def register_specific_cases(fmt: str) -> None:
    for name, command, expect, source, edit, known_bug in SPECIFIC.get(fmt, []):
        src = FORMAT_FIXTURES / source
        if source != BASE and not src.exists():
            print(f"warning: {src} missing; case {name} skipped", file=sys.stderr)
            continue

        def build(d, src=src, edit=edit, name=name, source=source, fmt=fmt):
            d.mkdir(parents=True, exist_ok=True)
            if source == BASE:
                dest, _ = _write_format_base(d, fmt)
            else:
                dest = d / src.name
                (shutil.copytree if src.is_dir() else shutil.copy)(src, dest)
            edit(dest)
            CASES[name]["path"] = f"{name}/{dest.name}"

        build.__doc__ = edit.__doc__
        case(name, command, expect, fmt=fmt, known_bug=known_bug)(build)


# ---------------------------------------------------------------- controls (must succeed)

CONTROLS = {
    "peft": {"path": "_valid/peft", "command": "compress", "args": []},
    "peft-pickle": {"path": "_valid/peft-pickle", "command": "compress", "args": ["--allow-pickle"]},
    "mini-random": {"path": "_valid/mini_random.safetensors", "command": "verify", "args": []},
    "mini-svd": {"path": "_valid/mini_svd.safetensors", "command": "reconstruct", "args": []},
}


def build_controls(out: Path) -> None:
    write_peft(out / "_valid" / "peft")
    _pickle_dir(out / "_valid" / "peft-pickle", _torch_zip_pickle(base_tensors()))
    (out / "_valid" / "mini_random.safetensors").write_bytes(mini("random"))
    (out / "_valid" / "mini_svd.safetensors").write_bytes(mini("svd"))
    for fmt in GENERIC:
        _write_format_base(out / "_valid" / fmt, fmt)


# ---------------------------------------------------------------- main

def generate(out: Path, fmts: list[str] | None = None) -> dict:
    """Write the corpus into `out`; `fmts`: the formats to add generic cases for (default: all
    registered). The manifest records them so a check can regenerate the same corpus."""
    covered = register_generic_cases(sorted(formats.REGISTRY) if fmts is None else fmts)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    build_controls(out)
    manifest = {"marker": MARKER, "formats": covered, "controls": CONTROLS, "cases": {}}
    for name, spec in CASES.items():
        spec["build"](out / name)
        path = spec["path"] or name
        manifest["cases"][name] = {"path": path, "command": spec["command"], "args": spec["args"],
                                   "expect": spec["expect"], "file": spec["file"], "format": spec["format"],
                                   "note": " ".join(spec["note"].split())}
        if spec.get("known_bug"):
            manifest["cases"][name]["known_bug"] = spec["known_bug"]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "fixtures" / "bad")
    ap.add_argument("--formats", default=None,
                    help="comma-separated formats to add generic cases for (default: every registered one)")
    args = ap.parse_args()
    fmts = None if args.formats is None else [f for f in args.formats.split(",") if f]
    manifest = generate(args.out, fmts)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {len(manifest['cases'])} cases to {args.out} ({size:,} bytes; formats: "
          f"{', '.join(sorted({c['format'] for c in manifest['cases'].values()}))})")


if __name__ == "__main__":
    main()
