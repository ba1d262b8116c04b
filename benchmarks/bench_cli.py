"""CLI start-up: wall time of `lora-convert --help` and `lora-convert inspect <adapter>`, side by
side with `python -c pass` (the interpreter's own floor) and `python -c "import torch"`.

    PYTHONPATH=$PWD python benchmarks/bench_cli.py [--runs 7] [--adapter fixtures/peft-tiny-llama]

Each command runs in a fresh interpreter `--runs` times; the median is printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wall(argv: list[str], runs: int, env: dict) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--adapter", default=str(ROOT / "fixtures" / "peft-tiny-llama"))
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    py = sys.executable
    cases = [("python -c pass", [py, "-c", "pass"]),
             ("python -c 'import torch'", [py, "-c", "import torch"]),
             ("lora-convert --help", [py, "-m", "lora_convert.cli", "--help"]),
             ("lora-convert inspect --help", [py, "-m", "lora_convert.cli", "inspect", "--help"]),
             (f"lora-convert inspect {Path(args.adapter).name}", [py, "-m", "lora_convert.cli", "inspect", args.adapter])]
    floor = None
    print(f"{'command':<44} {'median s':>9} {'x floor':>8}   ({args.runs} runs each)")
    for label, argv in cases:
        t = wall(argv, args.runs, env)
        floor = floor or t
        print(f"{label:<44} {t:>9.3f} {t / floor:>8.1f}")


if __name__ == "__main__":
    main()
