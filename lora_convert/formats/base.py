"""What an adapter layout provides, and the registry of layouts.

A layout is one module of this package that calls :func:`register` with an
:class:`AdapterFormat`: a subclass instance, or a :class:`FunctionFormat` over the module's own
``detect`` / ``read`` / ``write`` (and optional ``scan`` / ``describe``) functions; ``formats`` finds it by its module name (which must equal its
``name``), so detection, reading, writing and the CLI's ``--from`` / ``--to`` choices pick it up
with no edit elsewhere. This module imports neither torch nor the layouts (CLI start-up).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Iterable

if TYPE_CHECKING:
    from ..adapter import Adapter


@dataclass(frozen=True)
class ModuleHeader:
    """A LoRA module as its file's header and config describe it, checked as a reader checks it
    (shapes, pairing, rank, alpha, finite values) but with no factor loaded. Readers build their
    LoraModule from it, so `inspect` (which stops here, without torch) and `read` agree."""

    name: str
    kind: str  # "linear" | "conv" | "embedding"
    kernel: dict
    rank: int
    out_features: int
    in_features: int
    alpha: float
    use_rslora: bool
    dtype: str  # the factors' dtype as torch names it ("float16"), as LoraModule.dtype would be
    conversion_error: float | None = None  # a module converted to a LoRA pair (LyCORIS): its relative error

    @property
    def scale(self) -> float:
        # PEFT's rule, as adapter.lora_scale
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank


@dataclass
class AdapterHeader:
    """An adapter as `AdapterFormat.scan` finds it: the fields of adapter.Adapter that describe
    it (so `describe` labels either) and every module's ModuleHeader, in module_names order
    (a layout's scan may give an iterator that checks each module as it goes; formats.scan
    makes it a list)."""

    format: str
    module_names: list[str]
    modules: Iterable[ModuleHeader]
    config: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    passthrough_names: list[str] = field(default_factory=list)
    source: str = ""


class AdapterFormat(ABC):
    """One on-disk LoRA layout."""

    name: ClassVar[str]  # registry key, also recorded in LoRA-Mini metadata
    label: ClassVar[str]  # human-readable name for `inspect`
    output_is_dir: ClassVar[bool] = False  # whether `write` produces a directory (see writes_dir)
    dir_files: ClassVar[tuple[str, ...]] = ()  # a directory layout's file names: its input is their folder

    @abstractmethod
    def detect(self, path: Path) -> bool:
        """Cheap check (file names, key patterns); no tensors loaded."""

    @abstractmethod
    def read(self, path: Path, **options) -> Adapter:
        """The adapter at `path`, lazily (factors load per module)."""

    @abstractmethod
    def write(self, adapter: Adapter, dest: Path) -> None:
        """Write into `dest`, a temporary path (directory or file, see writes_dir) published atomically."""

    def scan(self, path: Path, **options) -> AdapterHeader | None:
        """The adapter's description with every check `read` and loading each module make, from
        the header, configs and stored values without torch (`inspect`); None where this layout
        needs tensor arithmetic to describe a module (inspect then reads it)."""
        return None

    def describe(self, adapter: Adapter) -> str:
        """The label with the detected variant, e.g. "kohya (SDXL)"."""
        return self.label

    def writes_dir(self, dest) -> bool:
        """Whether writing to `dest` produces a directory (some layouts let the destination decide)."""
        return self.output_is_dir

    @property
    def module(self) -> str:
        """The module that implements this layout (the registry finds layouts by module name)."""
        return type(self).__module__


class FunctionFormat(AdapterFormat):
    """A layout written as plain functions, the way the built-in layouts are:

    >>> register(FunctionFormat(NAME, LABEL, detect, read, write, scan=scan, output_is_dir=True,
    ...                         dir_files=(CONFIG_FILE, WEIGHTS_FILE)))            # doctest: +SKIP

    `output_is_dir` is a bool, or a function of the destination for layouts that let it decide;
    `describe` (adapter -> label with the detected variant) and `scan` are optional.
    """

    def __init__(self, name: str, label: str, detect: Callable[[Path], bool], read: Callable[..., "Adapter"],
                 write: Callable[["Adapter", Path], None], *, scan: Callable[..., AdapterHeader | None] | None = None,
                 describe: Callable[["Adapter"], str] | None = None,
                 output_is_dir: bool | Callable[[object], bool] = False, dir_files: tuple[str, ...] = ()):
        self.name, self.label, self.dir_files = name, label, tuple(dir_files)
        self._fns = {"detect": detect, "read": read, "write": write, "scan": scan, "describe": describe}
        self._writes_dir = output_is_dir if callable(output_is_dir) else None
        self.output_is_dir = bool(output_is_dir) if not callable(output_is_dir) else False

    @property
    def module(self) -> str:
        return self._fns["read"].__module__

    def detect(self, path):
        return self._fns["detect"](path)

    def read(self, path, **options):
        return self._fns["read"](path, **options)

    def write(self, adapter, dest):
        self._fns["write"](adapter, dest)

    def scan(self, path, **options):
        return self._fns["scan"](path, **options) if self._fns["scan"] else None

    def describe(self, adapter):
        return self._fns["describe"](adapter) if self._fns["describe"] else self.label

    def writes_dir(self, dest):
        return self._writes_dir(dest) if self._writes_dir else self.output_is_dir


_REGISTERED: dict[str, AdapterFormat] = {}


def register(fmt: AdapterFormat) -> AdapterFormat:
    """Add a layout (an AdapterFormat instance); a layout of the same name is replaced."""
    if not isinstance(fmt, AdapterFormat):
        raise TypeError(f"register() takes an AdapterFormat instance, got {type(fmt).__name__}")
    _REGISTERED[fmt.name] = fmt
    return fmt


def registered() -> dict[str, AdapterFormat]:
    """The layouts registered so far (by the modules imported so far), in registration order."""
    return dict(_REGISTERED)
