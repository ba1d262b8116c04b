"""The public verbs: load_adapter, compress, save, load, reconstruct, save_adapter, verify."""
from __future__ import annotations

import os

from . import container, formats
from .adapter import Adapter
from .container import MiniAdapter
from .convert import compare, compress, reconstruct, stored_report
from .report import FidelityReport

__all__ = ["load_adapter", "compress", "save", "load", "reconstruct", "save_adapter", "verify"]


def load_adapter(path: str | os.PathLike, fmt: str | None = None, *, allow_pickle: bool = False) -> Adapter:
    """Open a LoRA adapter in any supported layout (detected unless `fmt` is given).

    >>> adapter = load_adapter("fixtures/peft-tiny-llama")          # doctest: +SKIP
    >>> adapter.format, len(adapter)
    ('peft', 14)
    """
    from .hub import local_path  # the Hub client loads when first needed, not with `import lora_convert`

    return formats.read(local_path(path), fmt, allow_pickle=allow_pickle)


def save(mini: MiniAdapter, path: str | os.PathLike, progress=None) -> FidelityReport:
    """Write a LoRA-Mini adapter (directory or ``.safetensors`` file) atomically; returns its fidelity."""
    return container.save(mini, path, progress)


def load(path: str | os.PathLike) -> MiniAdapter:
    """Open a LoRA-Mini file or directory; fingerprints and checksums are verified per module."""
    from .hub import local_path  # as in load_adapter

    return container.load(local_path(path, expect="lora-mini"))


def save_adapter(adapter: Adapter, path: str | os.PathLike, fmt: str | None = None) -> None:
    """Write a standard adapter atomically, by default in the layout it came from."""
    formats.write(adapter, path, fmt or adapter.format)


def verify(path: str | os.PathLike, against: str | os.PathLike | None = None, *, fmt: str | None = None,
           allow_pickle: bool = False, progress=None) -> FidelityReport:
    """Load every module (regenerating and checking outers and checksums); report fidelity.

    With `against`, the error is measured anew against that original adapter.
    """
    mini = load(path)
    if against is None:
        return stored_report(mini, progress)
    return compare(mini, load_adapter(against, fmt, allow_pickle=allow_pickle), progress)
