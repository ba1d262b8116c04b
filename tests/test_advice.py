"""compress's `next:` lines: the method to try next depends on what was run and what it kept."""
from __future__ import annotations

import json

from lora_convert.advice import WORTH_MORE, next_steps
from lora_convert.config import CompressConfig
from lora_convert.report import FidelityReport, ModuleFidelity

from helpers.cli import run_cli


def _report(kept: float, original=9_800_000, compressed=300_000) -> FidelityReport:
    r = FidelityReport(original_bytes=original, compressed_bytes=compressed)
    r.add(ModuleFidelity(name="m", shape=(8, 8), rank=4, inner_rank=2, outer="svd", a=8, b=8, rel_error=(1 - kept) ** 0.5,
                         energy=1.0))
    return r


def test_advice_follows_the_method_and_what_it_kept():
    random = next_steps(CompressConfig(outer="random"), _report(0.4))
    assert "`--outer svd --target-size 32.7x` (this size)" in random[0] and "recover" in random[1]
    assert "--target-size 32x`" in next_steps(CompressConfig(outer="random"), _report(0.4, compressed=20_000_000))[0]
    fixed = next_steps(CompressConfig(outer="svd", rank=4), _report(0.9))
    assert len(fixed) == 1 and "`--target-size 32.7x` (this size)" in fixed[0]
    budget = CompressConfig(outer="svd", target_size="32x")
    assert next_steps(budget, _report(WORTH_MORE + 0.001)) == []
    low = next_steps(budget, _report(0.7))
    assert "--calibration" in low[0] and "recover --layer-weight 100" in low[1] and len(low) == 2
    calibrated = next_steps(budget, _report(0.7), calibrated=True)
    assert len(calibrated) == 1 and "recover" in calibrated[0] and "without --calibration" in calibrated[0]
    assert "without --calibration" not in low[1]  # a calibrated start recovered less (benchmarks/README.md)


def test_compress_prints_and_returns_next_steps(fixtures, tmp_path):
    res = run_cli("compress", fixtures / "peft-tiny-llama", "-o", tmp_path / "a", "--outer", "svd", "--rank", "2")
    assert res.exit_code == 0 and res.stdout.splitlines()[-1].startswith("next: rank and bits chosen per module")
    res = run_cli("compress", fixtures / "peft-tiny-llama", "-o", tmp_path / "b", "--outer", "svd",
                  "--target-size", "8x", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["next_steps"] == next_steps(CompressConfig(outer="svd", target_size="8x"), _report_of(doc))


def _report_of(doc: dict) -> FidelityReport:
    """A report with the summary the JSON gives (what next_steps reads)."""
    s = doc["summary"]
    return _report(s["retained_energy"], s["original_bytes"], s["compressed_bytes"])
