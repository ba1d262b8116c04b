"""What an adapter layout provides, and the registry of layouts.

A layout is one module of this package that subclasses :class:`AdapterFormat` and calls
:func:`register` with an instance; ``formats`` finds it by its module name (which must equal its
``name``), so detection, reading, writing and the CLI's ``--from`` / ``--to`` choices pick it up
with no edit elsewhere. This module imports neither torch nor the layouts (CLI start-up).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from ..adapter import Adapter


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

    def describe(self, adapter: Adapter) -> str:
        """The label with the detected variant, e.g. "kohya (SDXL)"."""
        return self.label

    def writes_dir(self, dest) -> bool:
        """Whether writing to `dest` produces a directory (some layouts let the destination decide)."""
        return self.output_is_dir


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
