"""Fidelity report: per-module relative error and retained energy, plus a whole-adapter summary."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

LOW_ENERGY = 0.5  # below this share the compressed adapter is not a faithful stand-in


@dataclass
class ModuleFidelity:
    name: str
    shape: tuple[int, int]
    rank: int
    inner_rank: int
    outer: str
    a: int
    b: int
    rel_error: float | None  # None: not recorded (fidelity is informational in the format)
    energy: float  # ||s·B·A||_F² of the original module
    recovered: bool = False  # inner matrices re-fitted in function space (`lora-convert recover`)
    bits: float | None = None  # stored bits per factor value, quantization scales included
    quantized: bool = False  # integer codes (rank and bits chosen by --bits or a budget)
    calibrated_rel_error: float | None = None  # compress --calibration: relative output error on the data
    codebook: str | None = None  # factors stored as indices into this codebook ("nf4"), not integers

    @property
    def calibrated(self) -> bool:
        return self.calibrated_rel_error is not None and math.isfinite(self.calibrated_rel_error)

    @property
    def known(self) -> bool:
        return self.rel_error is not None and math.isfinite(self.rel_error)

    @property
    def retained_energy(self) -> float | None:
        return max(0.0, 1.0 - self.rel_error**2) if self.known else None

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "rank": self.rank,
                "inner_rank": self.inner_rank, "outer": self.outer, "a": self.a, "b": self.b,
                "rel_error": _finite(self.rel_error), "retained_energy": self.retained_energy,
                "recovered": self.recovered, "bits": self.bits,
                **({"codebook": self.codebook} if self.codebook else {}),
                **({"calibrated_rel_error": self.calibrated_rel_error,
                    "calibrated_retained": max(0.0, 1.0 - self.calibrated_rel_error ** 2)} if self.calibrated else {})}


@dataclass
class FidelityReport:
    modules: list[ModuleFidelity] = field(default_factory=list)
    original_bytes: int | None = None
    compressed_bytes: int | None = None

    def add(self, row: ModuleFidelity) -> None:
        self.modules.append(row)

    @property
    def total_energy(self) -> float:
        return sum(m.energy for m in self.modules)

    @property
    def unknown(self) -> int:
        """Modules whose error is not known (not recorded, or relative to an all-zero update)."""
        return sum(not m.known for m in self.modules)

    @property
    def rel_error(self) -> float | None:
        """Whole-adapter relative error: sqrt(Σ residual² / Σ ||ΔW||²) across modules (None if
        any module's error is unknown: a partial figure would overstate the fidelity)."""
        if self.unknown:
            return None
        total = self.total_energy
        if total == 0.0:
            return 0.0
        return math.sqrt(sum(m.energy * m.rel_error**2 for m in self.modules) / total)

    @property
    def retained_energy(self) -> float | None:
        err = self.rel_error
        return None if err is None else max(0.0, 1.0 - err**2)

    @property
    def calibrated_retained(self) -> float | None:
        """The calibrated share: 1 − Σ e²·E / Σ E over modules, e the relative output error on the
        calibration data, E the weight-space energy ||s·B·A||² (each module's output-space share,
        weighted as the weight-space share weighs it): what compress --min-fidelity refers to with
        --calibration. None unless every module has a calibrated error."""
        if not self.modules or not all(m.calibrated for m in self.modules):
            return None
        total = self.total_energy
        if total == 0.0:
            return 1.0
        return max(0.0, 1.0 - sum(m.energy * m.calibrated_rel_error ** 2 for m in self.modules) / total)

    @property
    def recovered(self) -> bool:
        """Whether the inner matrices were re-fitted to the original's outputs (recover), so that
        weight-space energy no longer measures how well the adapter stands in for the original."""
        return any(m.recovered for m in self.modules)

    @property
    def low_energy(self) -> bool:
        kept = self.retained_energy
        return bool(self.modules) and kept is not None and kept < LOW_ENERGY

    def summary(self) -> dict:
        known = [m for m in self.modules if m.known]
        worst = max(known, key=lambda m: m.rel_error, default=None)
        out = {"modules": len(self.modules), "rel_error": self.rel_error,
               "retained_energy": self.retained_energy,
               "worst_module": worst.name if worst else None,
               "worst_rel_error": worst.rel_error if worst else None,
               "modules_without_fidelity": self.unknown,
               "low_energy": self.low_energy, "recovered": self.recovered}
        if self.calibrated_retained is not None:
            out["calibrated_retained"] = self.calibrated_retained
        if self.original_bytes and self.compressed_bytes:
            out.update(original_bytes=self.original_bytes, compressed_bytes=self.compressed_bytes,
                       ratio=self.original_bytes / self.compressed_bytes)
        return out

    def as_dict(self) -> dict:
        return {"summary": self.summary(), "modules": [m.as_dict() for m in self.modules]}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    @property
    def low_modules(self) -> list[ModuleFidelity]:
        """Modules that keep under LOW_ENERGY of their own update (known errors only)."""
        return [m for m in self.modules if m.known and m.retained_energy < LOW_ENERGY]

    def warning(self) -> str | None:
        if self.low_energy and self.recovered:
            return (f"NOTE: the adapter keeps {100 * self.retained_energy:.1f}% of the original update's energy "
                    "in weight space. Its inner matrices were re-fitted by `lora-convert recover` to match the "
                    "original's outputs, which this figure does not measure: compare outputs with "
                    "`lora-convert eval` instead.")
        budgeted = any(m.quantized for m in self.modules)
        if self.low_energy and budgeted:
            return (f"WARNING: the compressed adapter keeps only {100 * self.retained_energy:.1f}% of the "
                    "update's energy in weight space; a larger --target-size (see --plan for the curve) "
                    "keeps more.")
        if self.low_energy:
            return (f"WARNING: the compressed adapter keeps only {100 * self.retained_energy:.1f}% of the "
                    "update's energy. Random outers much smaller than the layer keep a few percent of a "
                    "trained adapter; run `lora-convert recover` to re-fit the inner matrices against the "
                    "original, or use --outer svd / a larger --outer-dim.")
        low = [] if self.recovered else self.low_modules  # after recover, weight space says little
        if not low:
            return None
        worst = min(low, key=lambda m: m.retained_energy)
        whole = ("the adapter as a whole keeps more" if self.retained_energy is not None
                 else "the whole adapter's figure is unknown")
        return (f"NOTE: {len(low)} of {len(self.modules)} modules keep under {LOW_ENERGY:.0%} of their own "
                f"update's energy (worst: {worst.name}, {100 * worst.retained_energy:.1f}%); {whole}. "
                + ("The budget gives each byte where it keeps the most; a larger --target-size raises them."
                   if budgeted else "A larger --rank, --keep-energy or --outer-dim raises them."))

    def table(self, max_rows: int = 40) -> str:
        lines = [f"{'module':<56} {'shape':>13} {'r':>4} {'k':>4} {'a×b':>9} {'bits':>5} {'rel.err':>9} {'energy':>8}"]
        rows = self.modules if len(self.modules) <= max_rows else sorted(
            self.modules, key=lambda m: -(m.rel_error if m.known else math.inf))[:max_rows]
        for m in rows:
            name = m.name if len(m.name) <= 56 else "…" + m.name[-55:]
            lines.append(f"{name:<56} {m.shape[0]:>6}×{m.shape[1]:<6} {m.rank:>4} {m.inner_rank:>4} "
                         f"{f'{m.a}×{m.b}':>9} {m.codebook or _fmt(m.bits, '.1f'):>5} {_fmt(m.rel_error, '.2e'):>9} "
                         f"{_fmt(m.retained_energy, '.2%'):>8}")
        if len(rows) < len(self.modules):
            lines.append(f"… {len(self.modules) - len(rows)} more modules (worst {max_rows} shown; --json for all)")
        s = self.summary()
        if s["rel_error"] is None:
            lines.append(f"whole adapter: {s['modules']} modules; fidelity unknown for {self.unknown} of them "
                         "(not recorded in the file: run verify --against the original adapter)")
        else:
            lines.append(f"whole adapter: {s['modules']} modules, relative error {s['rel_error']:.3e}, "
                         f"retained energy {100 * s['retained_energy']:.2f}%")
        if "calibrated_retained" in s:
            lines.append(f"calibrated share (module outputs on the calibration text): "
                         f"{100 * s['calibrated_retained']:.2f}% kept")
        if "ratio" in s:
            lines.append(f"size: {s['original_bytes']:,} B -> {s['compressed_bytes']:,} B "
                         f"({s['ratio']:.1f}x smaller)")
        if self.warning():
            lines.append(self.warning())
        return "\n".join(lines)


def _finite(x):
    return x if x is not None and math.isfinite(x) else None


def _fmt(x, spec: str) -> str:
    return format(x, spec) if _finite(x) is not None else "unknown"
