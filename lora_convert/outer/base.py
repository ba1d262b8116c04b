"""What a source of outer matrices provides, and the registry of sources.

A source is one module of this package that subclasses :class:`OuterSource` and calls
:func:`register` with an instance; ``outer`` finds it by its module name (which must equal its
``name``), so compress, load and the CLI's ``--outer`` choices pick it up with no edit elsewhere.
This module imports neither torch nor numpy (CLI start-up).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar


class OuterSource(ABC):
    """The fixed outers U (out×a) and V (b×in) of LoRA-Mini modules."""

    name: ClassVar[str]  # recorded as each module's outer "source"
    stored: ClassVar[bool]  # whether U and V are written into the file (else regenerated on load)

    @abstractmethod
    def make_stack(self, modules, options: dict, updates, scratch=None):
        """(U, V, specs) for a stack of same-shaped modules (updates: their mathcore.Updates).
        U, V are 2-D when every module shares them (out×a, b×in), else stacked per module
        (n×out×a, n×b×in), float64, written into scratch(role, shape) tensors when given;
        specs are JSON-able, one per module."""

    @abstractmethod
    def restore(self, name: str, spec: dict, out_features: int, in_features: int, tensors, path=None):
        """(U, V) of a module when loading (`tensors`: its stored U and V, for a stored source);
        raises IntegrityError when a regenerated matrix does not match its fingerprint."""

    def check(self, name: str, spec: dict, out_features: int, in_features: int, path=None) -> None:
        """restore's checks without making tensors (`inspect`, torch-free): raises what restore
        would raise. A stored source has none of its own (its tensors carry checksums)."""

    def make(self, module, options: dict):
        """(U, V, spec) for one module, without its update: the outers a source regenerates
        (budget planning fits each module against them); stored sources have none."""
        raise NotImplementedError(f"{self.name} outers are fitted to each update, not made without it")

    def inner_stack(self, updates, ks: list[int]):
        """Closed-form least-squares inners (X, Y) for these outers (compress asks a stored source)."""
        raise NotImplementedError(f"{self.name} outers have no closed-form inner matrices")

    def stack_size(self, options: dict) -> int | None:
        """Most modules per stack (stacks share one pair of outers), or None for no limit."""
        return None


_REGISTERED: dict[str, OuterSource] = {}


def register(source: OuterSource) -> OuterSource:
    """Add an outer source (an OuterSource instance); a source of the same name is replaced."""
    if not isinstance(source, OuterSource):
        raise TypeError(f"register() takes an OuterSource instance, got {type(source).__name__}")
    _REGISTERED[source.name] = source
    return source


def registered() -> dict[str, OuterSource]:
    """The sources registered so far (by the modules imported so far)."""
    return dict(_REGISTERED)
