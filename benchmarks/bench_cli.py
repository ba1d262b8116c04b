"""CLI start-up: wall time of `lora-convert --help` and `lora-convert inspect <adapter>`, side by
side with `python -c pass` (the interpreter's own floor) and `python -c "import torch"`.

    PYTHONPATH=$PWD python benchmarks/bench_cli.py [--runs 7] [--adapter fixtures/peft-tiny-llama]
        [--baseline DIR]

Each command runs in a fresh interpreter `--runs` times; the median is printed. With --baseline
(another checkout of lora_convert, e.g. `git worktree add --detach /tmp/base main`) the inspect
rows also run with PYTHONPATH=DIR, interleaved with this checkout's runs.
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


def once(argv: list[str], env: dict, cwd: Path = ROOT) -> float:
    # `python -m` puts the working directory first on sys.path: each checkout runs from its own
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return time.perf_counter() - start


def wall(argv: list[str], runs: int, env: dict) -> float:
    return statistics.median(once(argv, env) for _ in range(runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--adapter", default=str(ROOT / "fixtures" / "peft-tiny-llama"))
    ap.add_argument("--baseline", default=None, help="another lora_convert checkout to time `inspect` against")
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
    if args.baseline:
        base = Path(args.baseline).resolve()
        base_env = {**os.environ, "PYTHONPATH": str(base)}
        inspect = [py, "-m", "lora_convert.cli", "inspect", str(Path(args.adapter).resolve())]
        mine, theirs = [], []
        for _ in range(args.runs):  # interleaved: both see the same machine load
            theirs.append(once(inspect, base_env, base))
            mine.append(once(inspect, env))
        a, b = statistics.median(theirs), statistics.median(mine)
        name = f"inspect {Path(args.adapter).name}"
        print(f"{name + ' (baseline)':<44} {a:>9.3f} {a / floor:>8.1f}")
        print(f"{name + ' (this checkout)':<44} {b:>9.3f} {b / floor:>8.1f}   {a / b:.1f}x faster")


if __name__ == "__main__":
    main()
