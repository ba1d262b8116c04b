"""What to try next after a compress: the method that wins for the user's situation, as measured
on the size-fidelity frontier (benchmarks/README.md) and summarised in README's "which method to
use". compress prints these lines under its report (``next:``) and returns them in ``--json``
(``next_steps``).
"""
from __future__ import annotations

from .config import CompressConfig
from .outer import get as outer_source
from .report import FidelityReport

# Below this share kept, the calibrated fit and recovery have measurably paid off on the
# benchmark's teachers; above it there is little left for them to win.
WORTH_MORE = 0.99


def next_steps(cfg: CompressConfig, report: FidelityReport, calibrated: bool = False) -> list[str]:
    """One line per method likely to keep more of the adapter at this file's size, best first."""
    s = report.summary()
    kept = s.get("calibrated_retained", s["retained_energy"])
    ratio = s.get("ratio")
    same = f"--target-size {ratio:.1f}x` (this size)" if ratio and ratio > 1 else "--target-size 32x`"
    if not outer_source(cfg.outer).stored:
        return [f"{cfg.outer} outers are a start for `lora-convert recover` or `train`; with only the adapter, "
                f"`--outer svd {same} keeps more of the update",
                "with the base model, text and time: `lora-convert recover` re-fits this file's inner "
                "matrices to the original adapter's outputs"]
    if not cfg.budgeted:
        return [f"rank and bits chosen per module: `{same} usually keeps more than one rank and one "
                "precision for all modules"]
    if kept is None or kept >= WORTH_MORE:
        return []
    out = []
    if not calibrated:
        out.append("with the base model and some text (best: like the adapter's data): add "
                   "`--calibration TEXT --base MODEL` (fits each module's output, no training)")
    start = "a file compressed to the same budget without --calibration" if calibrated else "this file"
    out.append(f"with the base model and time: `lora-convert recover --layer-weight 100` on {start} keeps its size "
               "and bits and regains effect on the model's outputs (on your text, or `--generate 256` samples some; "
               "GPU faster)")
    return out
