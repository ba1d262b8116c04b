"""CompressConfig: every compress option in one validated, immutable object (as PEFT's LoraConfig).

Errors are ConfigError (a BadInputError, exit 2) naming the parameter; the CLI names the flag.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from . import outer, quant
from .outer import random as random_outer
from .errors import BadInputError

MAX_SEED = 2**63  # seeds are stored in JSON; keep them exact for 64-bit readers
STORAGE_DTYPES = ("auto", "fp32", "fp16", "bf16")
# Widths the budget allocator chooses from: not 2 (ternary codes lose about 70% of a factor's
# energy and were never chosen on the adapters measured in benchmarks/bench_budget.py), and NF4 in
# place of int4 (same bytes, 0.2-0.6 points more energy kept at every budget measured there; int4
# beside it changed the share by at most 0.004 points, for one more width to plan).
ALLOCATED_BITS = (3, quant.NF4, 8, 16)
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(x|b|kb|mb|gb|kib|mib|gib)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


class ConfigError(BadInputError):
    """A compress option is invalid; `param` names it (CLI: the flag --param-name)."""

    def __init__(self, param: str, problem: str):
        self.param, self.detail = param, problem
        super().__init__(f"{param} ({flag(param)}): {problem}")


def _is_width(bits) -> bool:
    try:
        quant.check_bits(bits)
    except ValueError:
        return False
    return True


def flag(param: str) -> str:
    return "--" + param.replace("_", "-")


def parse_size(value) -> tuple[str, float]:
    """("ratio", r) for "32x", ("bytes", n) for "600KB", "1.5MB", "600000" or an int."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 32x or 600KB, got {value!r}")
    if isinstance(value, (int, float)):
        return "bytes", float(value)
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"expected a size such as 32x or 600KB, got {value!r}")
    number, unit = float(m.group(1)), (m.group(2) or "").lower() or None
    return ("ratio", number) if unit == "x" else ("bytes", number * _UNITS[unit])


@dataclass(frozen=True)
class CompressConfig:
    """How to compress an adapter (lora_convert.compress; CLI `compress` flags of the same names).

    outer: "random" (outers regenerated from `seed`, not stored) or "svd" (stored).
    outer_dim: random outer sizes a or (a, b); outer_stream: "shared" or "module" (random only).
    rank / keep_energy: inner rank, or the smallest keeping that share of each update's energy.
    dtype: float storage of unquantized factors (auto keeps the adapter's).
    bits: store factors quantized (2, 3, 4, 8; "nf4": QLoRA's NormalFloat4 codebook; 16 = float16
    in the packed layout), group_size values per fp16 scale. target_size ("32x": ratio to the input's bytes, or "600KB") and/or
    min_fidelity (weight-space retained energy) choose rank and bits per module instead, among the
    widths of allowed_bits.
    """

    outer: str = "random"
    seed: int = 0
    outer_dim: int | tuple[int, int] | None = None
    outer_stream: str = "shared"
    rank: int | None = None
    keep_energy: float | None = None
    dtype: str = "auto"
    bits: int | str | None = None
    group_size: int = quant.DEFAULT_GROUP
    target_size: str | int | float | None = None
    min_fidelity: float | None = None
    allowed_bits: tuple[int | str, ...] = ALLOCATED_BITS

    def __post_init__(self):
        if self.outer not in outer.names():
            raise ConfigError("outer", f"unknown outer source {self.outer!r} (known: {', '.join(outer.names())})")
        stored = outer.get(self.outer).stored
        if isinstance(self.outer_dim, list):
            object.__setattr__(self, "outer_dim", tuple(self.outer_dim))
        if stored and self.outer_dim is not None:
            raise ConfigError("outer_dim", f"applies to random outers; {self.outer} outers are sized by rank / "
                              "keep_energy")
        dims = [self.outer_dim] if isinstance(self.outer_dim, int) else list(self.outer_dim or [])
        if (self.outer_dim is not None and not isinstance(self.outer_dim, int) and len(dims) != 2) or \
                any(type(d) is not int or d <= 0 for d in dims):
            raise ConfigError("outer_dim", f"must be a positive integer or a pair of them, got {self.outer_dim!r}")
        if self.outer_stream not in random_outer.STREAMS:
            raise ConfigError("outer_stream", f"must be one of {', '.join(random_outer.STREAMS)}, got "
                              f"{self.outer_stream!r}")
        if stored and self.outer_stream != "shared":
            raise ConfigError("outer_stream", f"applies to random outers; {self.outer} outers are stored")
        if type(self.seed) is not int or not 0 <= self.seed < MAX_SEED:
            raise ConfigError("seed", f"must be an integer in [0, 2**63), got {self.seed!r}")
        if self.rank is not None and (type(self.rank) is not int or self.rank <= 0):
            raise ConfigError("rank", f"must be a positive integer, got {self.rank!r}")
        if self.keep_energy is not None and not 0.0 < self.keep_energy <= 1.0:
            raise ConfigError("keep_energy", f"must be in (0, 1], got {self.keep_energy}")
        if self.dtype not in STORAGE_DTYPES:
            raise ConfigError("dtype", f"unknown dtype {self.dtype!r} (choose from {', '.join(STORAGE_DTYPES)})")
        if self.bits is not None:
            try:
                quant.check_bits(self.bits)
            except ValueError:
                raise ConfigError("bits", f"unknown bit width {self.bits!r} (choose from "
                                  f"{', '.join(map(str, quant.WIDTHS))})") from None
            if self.dtype != "auto":
                raise ConfigError("dtype", "applies to unquantized factors; with bits the factors are integers "
                                  "(bits 16: float16)")
        try:
            quant.check_group(self.group_size)
        except ValueError:
            raise ConfigError("group_size", f"must be an integer in [1, {quant.MAX_GROUP}], "
                              f"got {self.group_size!r}") from None
        if isinstance(self.allowed_bits, (str, int)) or not self.allowed_bits:
            raise ConfigError("allowed_bits", f"must be widths from {', '.join(map(str, quant.WIDTHS))}, got "
                              f"{self.allowed_bits!r}")
        bad = [b for b in self.allowed_bits if not _is_width(b)]
        if bad:
            raise ConfigError("allowed_bits", f"unknown bit width {bad[0]!r} (choose from "
                              f"{', '.join(map(str, quant.WIDTHS))})")
        object.__setattr__(self, "allowed_bits", tuple(sorted(set(self.allowed_bits), key=quant.width_key)))
        if self.target_size is not None:
            try:
                kind, value = parse_size(self.target_size)
            except ValueError as exc:
                raise ConfigError("target_size", str(exc)) from None
            if not value > 0 or (kind == "ratio" and value < 1):
                raise ConfigError("target_size", f"must be a ratio >= 1x or a positive size, got {self.target_size!r}")
        if self.min_fidelity is not None and not 0.0 < self.min_fidelity <= 1.0:
            raise ConfigError("min_fidelity", f"must be in (0, 1], got {self.min_fidelity}")
        if self.budgeted:
            for name in ("rank", "keep_energy", "bits"):
                if getattr(self, name) is not None:
                    raise ConfigError(name, "target_size / min_fidelity choose rank and bits per module; "
                                      f"drop {flag(name)}")
            if self.dtype != "auto":
                raise ConfigError("dtype", "target_size / min_fidelity choose the storage per module; drop --dtype")

    @property
    def budgeted(self) -> bool:
        return self.target_size is not None or self.min_fidelity is not None

    @property
    def quantized(self) -> bool:
        return self.bits is not None or self.budgeted

    def budget_bytes(self, original_bytes: int | None) -> int | None:
        """The byte budget target_size stands for (None without one)."""
        if self.target_size is None:
            return None
        kind, value = parse_size(self.target_size)
        if kind == "bytes":
            return int(value)
        if not original_bytes:
            raise ConfigError("target_size", "a ratio needs the input's size on disk, which is unknown here; "
                              "give a size in bytes (e.g. 600KB)")
        return int(original_bytes / value)

    def replace(self, **changes) -> CompressConfig:
        return dataclasses.replace(self, **changes)
