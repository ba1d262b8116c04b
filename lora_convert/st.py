"""Strict safetensors access: header validation before any tensor is touched,
lazy per-tensor loading, and a streaming writer whose memory does not grow with
the file.

The header is validated here (not left to the Rust loader) so that every
malformed file gets the same one-line BadInputError naming the file.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .errors import BadInputError

if TYPE_CHECKING:
    import numpy
    import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors reference limit
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
            "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4,
            "U64": 8}
# safetensors dtype -> torch's name for it (dtype_name's form): what `inspect` reports from a
# header alone. This module imports torch only where tensors are made (`inspect` runs without it).
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
               "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
               "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32",
               "U64": "uint64"}
# Floating-point dtypes: (unsigned integer view, mask of the bits that are all set exactly in
# NaN and Inf). float8_e4m3fn has no Inf and one NaN pattern per sign (S.1111.111).
_NONFINITE_BITS = {"F64": ("<u8", 0x7FF0000000000000, 0x7FF0000000000000), "F32": ("<u4", 0x7F800000, 0x7F800000),
                   "F16": ("<u2", 0x7C00, 0x7C00), "BF16": ("<u2", 0x7F80, 0x7F80),
                   "F8_E4M3": ("u1", 0x7F, 0x7F), "F8_E5M2": ("u1", 0x7C, 0x7C)}
FLOAT_DTYPES = tuple(_NONFINITE_BITS)


@functools.lru_cache(maxsize=None)
def _torch_dtypes() -> dict:
    import torch

    table = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
             torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
             torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
    for name, code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                       ("uint32", "U32"), ("uint64", "U64")):
        if hasattr(torch, name):  # every dtype read_header accepts can be written back
            table[getattr(torch, name)] = code
    return table


def __getattr__(name: str):
    # TORCH_DTYPE (torch dtype -> safetensors dtype) is built on first use: it needs torch
    if name == "TORCH_DTYPE":
        return _torch_dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as files and reports name it: torch's own name without the module ("float16"),
    which getattr(torch, name) resolves."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int = 0  # file offset of the data buffer: 8 + header length


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r} in header")
        seen[key] = value
    return seen


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate a safetensors header; raise BadInputError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise BadInputError("truncated safetensors file (no header length)", path)
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER_BYTES:
                raise BadInputError(f"invalid safetensors header length {n} (file size {size})", path)
            if n > size - 8:
                raise BadInputError(f"safetensors header length {n} exceeds the file size {size}", path)
            raw = fh.read(n)
    except OSError as exc:
        raise BadInputError(f"cannot read file ({exc.strerror})", path) from None
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadInputError(f"invalid safetensors header JSON ({type(exc).__name__}: {exc})", path) from None
    if not isinstance(obj, dict):
        raise BadInputError("safetensors header is not a JSON object", path)
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise BadInputError("safetensors __metadata__ must map strings to strings", path)
    tensors = {name: _tensor_info(path, name, info) for name, info in obj.items()}
    _check_layout(path, tensors, size - 8 - n)
    return Header(path, tensors, metadata, 8 + n)


def _tensor_info(path: Path, name: str, info) -> TensorInfo:
    if not isinstance(info, dict):
        raise BadInputError(f"tensor {name!r}: header entry is not an object", path)
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise BadInputError(f"tensor {name!r}: unknown dtype {dtype!r}", path)
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise BadInputError(f"tensor {name!r}: invalid shape {shape!r}", path)
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise BadInputError(f"tensor {name!r}: invalid data_offsets {offsets!r}", path)
    numel = 1
    for d in shape:
        numel *= d
    if numel * ITEMSIZE[dtype] != offsets[1] - offsets[0]:
        raise BadInputError(
            f"tensor {name!r}: dtype {dtype} and shape {shape} need {numel * ITEMSIZE[dtype]} bytes "
            f"but data_offsets span {offsets[1] - offsets[0]}", path)
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_len: int) -> None:
    cursor = 0
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.end > data_len:
            raise BadInputError(f"tensor {name!r}: data_offsets run past the end of the file "
                                f"(truncated or corrupt)", path)
        if info.start != cursor:
            what = "overlap" if info.start < cursor else "leave a gap"
            raise BadInputError(f"tensor {name!r}: data_offsets {what} in the data buffer", path)
        cursor = info.end
    if cursor != data_len:
        raise BadInputError(f"data buffer has {data_len - cursor} unaccounted trailing bytes", path)


class LazyTensors:
    """Validated, lazily loaded tensors of one safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.header = read_header(path)
        self.path = self.header.path

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def shape(self, key: str) -> tuple[int, ...]:
        return self.header.tensors[key].shape

    def dtype(self, key: str) -> str:
        """The tensor's safetensors dtype ("F16", ...)."""
        return self.header.tensors[key].dtype

    def get(self, key: str) -> torch.Tensor:
        info = self.header.tensors.get(key)
        if info is None:
            raise BadInputError(f"missing tensor {key!r}", self.path)
        dtype = _native().get(info.dtype)
        if dtype is not None and sys.byteorder == "little":
            return self._read(key, info, dtype)
        from safetensors import safe_open

        try:
            with safe_open(self.path, framework="pt") as fh:
                return fh.get_tensor(key)
        except Exception as exc:  # safetensors raises several untyped errors
            raise BadInputError(f"cannot load tensor {key!r} ({exc})", self.path) from None

    def raw(self, key: str) -> bytearray:
        """The tensor's data bytes (little-endian, row-major) without torch."""
        info = self.header.tensors.get(key)
        if info is None:
            raise BadInputError(f"missing tensor {key!r}", self.path)
        buf = bytearray(info.end - info.start)
        try:
            got = _read_into(self.path, memoryview(buf), self.header.data_start + info.start)
        except OSError as exc:
            raise BadInputError(f"cannot read tensor {key!r} ({exc.strerror})", self.path) from None
        if got != len(buf):
            raise BadInputError(f"tensor {key!r}: file ends inside its data (changed while reading?)", self.path)
        return buf

    def require_finite(self, key: str, what: str, raw: bytes | bytearray | None = None) -> None:
        """require_finite on the stored values, without torch: NaN and Inf are the bit patterns
        whose exponent bits are all set (numpy on an integer view of the raw bytes; `raw`: as
        in array())."""
        view = _NONFINITE_BITS.get(self.dtype(key))
        if view is None or not self.header.tensors[key].end - self.header.tensors[key].start:
            return
        import numpy as np

        bits = np.frombuffer(self.raw(key) if raw is None else raw, dtype=view[0])
        if bool(((bits & view[1]) == view[2]).any()):
            raise BadInputError(f"{what} contains NaN or Inf values", self.path)

    def array(self, key: str, raw: bytes | bytearray | None = None) -> numpy.ndarray:
        """The tensor's values as a float64 numpy array of its shape (for scalars such as alpha);
        `raw`: its data bytes where the caller has read them already (raw())."""
        import numpy as np

        info = self.header.tensors[key]
        raw = self.raw(key) if raw is None else raw
        if info.dtype == "BF16":  # numpy has no bfloat16: its bits are a float32's upper half
            values = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view("<f4")
        elif info.dtype in ("F8_E4M3", "F8_E5M2"):
            values = _float8_table(info.dtype)[np.frombuffer(raw, "u1")]
        else:
            values = np.frombuffer(raw, _NUMPY_DTYPES[info.dtype])
        with np.errstate(invalid="ignore"):  # NaN payloads widen as NaN
            return values.astype(np.float64).reshape(info.shape)

    def _read(self, key: str, info: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
        """One positioned read into an uninitialised tensor: no mmap left mapped (file pages
        would count in RSS as the adapter is streamed), no per-tensor safe_open (~0.5 ms each)
        and no zero-filled bytearray (calloc'd buffers page-fault on every read, and threads
        reading at once then contend for the process's page tables)."""
        import torch

        size = info.end - info.start
        out = torch.empty(size // dtype.itemsize, dtype=dtype)
        try:
            got = _read_into(self.path, memoryview(out.view(torch.uint8).numpy()), self.header.data_start + info.start)
        except OSError as exc:
            raise BadInputError(f"cannot read tensor {key!r} ({exc.strerror})", self.path) from None
        if got != size:
            raise BadInputError(f"tensor {key!r}: file ends inside its data (changed while reading?)", self.path)
        return out.reshape(info.shape)


def _read_into(path: Path, buf: memoryview, offset: int) -> int:
    """Fill `buf` from `path` at `offset`; the number of bytes read (short only at end of file).
    One read call returns at most ~2 GiB on Linux, so larger tensors take several."""
    done = 0
    if not hasattr(os, "preadv"):  # not on every platform
        with open(path, "rb") as fh:
            fh.seek(offset)
            while done < len(buf) and (n := fh.readinto(buf[done:])):
                done += n
        return done
    fd = os.open(path, os.O_RDONLY)
    try:
        while done < len(buf) and (n := os.preadv(fd, [buf[done:]], offset + done)):
            done += n
    finally:
        os.close(fd)
    return done


def _append(src, dst, count: int, start: int = 0) -> None:
    """Copy `count` bytes from offset `start` of file `src` (to its end) to the position of file
    `dst`, inside the kernel where it can (copy_file_range, then sendfile), else 1 MiB at a
    time (larger chunks added ~30 MB to the peak RSS of every save)."""
    for call in (getattr(os, "copy_file_range", None), getattr(os, "sendfile", None)):
        if call is None:
            continue
        done = 0
        try:
            while done < count:
                n = (call(src.fileno(), dst.fileno(), count - done, start + done) if call is not os.sendfile
                     else os.sendfile(dst.fileno(), src.fileno(), start + done, count - done))
                if n == 0:
                    break
                done += n
        except OSError:
            if done == 0:
                continue  # not supported for these files: try the next way
            raise
        if done == count:
            dst.seek(0, os.SEEK_END)
            return
        raise OSError(f"short copy: {done} of {count} bytes")
    src.seek(start)
    shutil.copyfileobj(src, dst, 1 << 20)


_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
                 "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?"}


def _float8_table(dtype: str) -> numpy.ndarray:
    """float32 value of each of the 256 float8 codes (e4m3fn: bias 7, no Inf, S.1111.111 NaN;
    e5m2: bias 15, IEEE-style Inf/NaN)."""
    import numpy as np

    exp_bits, bias = (4, 7) if dtype == "F8_E4M3" else (5, 15)
    man_bits = 7 - exp_bits
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    e, m = (codes >> man_bits) & ((1 << exp_bits) - 1), codes & ((1 << man_bits) - 1)
    with np.errstate(over="ignore"):
        values = sign * np.where(e == 0, m / (1 << man_bits) * 2.0 ** (1 - bias),
                                 (1 + m / (1 << man_bits)) * 2.0 ** (e - bias))
    top = (1 << exp_bits) - 1
    if dtype == "F8_E4M3":
        values[(e == top) & (m == (1 << man_bits) - 1)] = np.nan
    else:
        values[(e == top) & (m == 0)] = sign[(e == top) & (m == 0)] * np.inf
        values[(e == top) & (m != 0)] = np.nan
    return values.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _native() -> dict:
    """safetensors dtype -> torch dtype read with one positioned read (safetensors data is
    little-endian; on such hosts)."""
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}


def require_finite(tensor: torch.Tensor, what: str, path) -> torch.Tensor:
    """Reject NaN/Inf in a factor: they would silently poison every fit."""
    import torch

    if not tensor.is_floating_point():
        return tensor
    isfinite_dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    probe = tensor if tensor.dtype in isfinite_dtypes else tensor.to(torch.float32)  # float8: no isfinite
    # A NaN or Inf anywhere makes the sum non-finite; the sum is ~30x cheaper than isfinite().all()
    # (in the tensor's own dtype: torch accumulates in float32 either way, and widening the result
    # costs 3x the sum). A finite tensor whose sum overflows gets the exact elementwise check.
    if not math.isfinite(float(probe.sum())) and not bool(torch.isfinite(probe).all()):
        raise BadInputError(f"{what} contains NaN or Inf values", path)
    return tensor


def peek(items: Iterator) -> tuple[object | None, Iterator]:
    """(the first item or None, an iterator over all the items again): writers size the room
    for their header from the first module before anything is written. The iterator drops its
    reference to the first item once it has handed it out."""
    first = next(items, None)
    box = [] if first is None else [first]

    def again():
        while box:
            yield box.pop()
        yield from items
    return first, again()


def tensor_buffer(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian bytes, row-major, without a copy when already contiguous."""
    import torch

    t = tensor.detach().to("cpu").contiguous()
    if not t.numel():
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


# Header room left unused may take at most this share of a file; past it (the room was sized
# for larger data than came), the data moves behind a compact header instead.
MAX_PADDING = 0.03


class StreamingWriter:
    """Write a safetensors file tensor by tensor without holding them all in memory.

    Data goes to a spool file beside the target; `finish` writes the header and appends the
    spool. With `reserve` bytes of room for the header, data goes straight into the target
    after that room instead, and `finish` pads the header into it (the format allows trailing
    spaces in the header): large files are then written once, not written and copied. A header
    that outgrew its room, or room that would pad more than MAX_PADDING of the file (the data
    was small), still costs the copy. Use inside atomic_file() so a failure leaves nothing.
    """

    def __init__(self, path: str | os.PathLike, reserve: int = 0):
        self.path = Path(path)
        self._reserve = -(-max(reserve, 0) // 8) * 8  # the data buffer starts 8-byte aligned
        self._spool_path = self.path if self._reserve else self.path.with_name(self.path.name + ".spool")
        self._spool = open(self._spool_path, "wb")
        if self._reserve:
            self._spool.seek(8 + self._reserve)
        self._entries: dict[str, dict] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor, digest: bool = False) -> str | None:
        """Append a tensor; with `digest`, return the SHA-256 hex of its data bytes."""
        if name in self._entries:
            raise ValueError(f"duplicate tensor name {name!r}")
        if tensor.dtype not in _torch_dtypes():
            raise ValueError(f"unsupported dtype {tensor.dtype} for {name!r}")
        data = tensor_buffer(tensor)
        self._spool.write(data)
        self._entries[name] = {"dtype": _torch_dtypes()[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [self._offset, self._offset + data.nbytes]}
        self._offset += data.nbytes
        return hashlib.sha256(data).hexdigest() if digest else None

    def layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name -> (dtype, shape) of every tensor added so far."""
        return {name: (e["dtype"], tuple(e["shape"])) for name, e in self._entries.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def finish(self, metadata: dict[str, str] | None = None) -> None:
        header = dict(self._entries)
        if metadata:
            header = {"__metadata__": metadata, **header}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)  # align the data buffer to 8 bytes
        spare = self._reserve - len(raw)
        if self._reserve and 0 <= spare <= MAX_PADDING * (8 + self._reserve + self._offset):
            self._spool.seek(0)
            self._spool.write(struct.pack("<Q", self._reserve) + raw + b" " * (self._reserve - len(raw)))
            self._spool.close()
            return
        self._spool.close()
        start = 0
        if self._reserve:  # the header outgrew its room (or would leave too much of it): the data moves
            self._spool_path, start = self.path.with_name(self.path.name + ".spool"), 8 + self._reserve
            os.replace(self.path, self._spool_path)
        try:
            with open(self.path, "wb") as out, open(self._spool_path, "rb") as spool:
                out.write(struct.pack("<Q", len(raw)))
                out.write(raw)
                out.flush()
                _append(spool, out, self._offset, start)
        finally:
            self._spool_path.unlink(missing_ok=True)

    def abort(self) -> None:
        self._spool.close()
        self._spool_path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.abort()
