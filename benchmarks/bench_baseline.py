"""The baseline lora_convert has to beat: per-module SVD truncation of s*B*A to rank k, both factors
stored as symmetric integers in groups of 64 along the long side with one fp16 scale per group.

For each committed teacher (fixtures/smollm2-r16-all, fixtures/smollm2-r64-attn), every baseline point
is written as a PEFT directory (dequantized factors) and scored on held-out text of the teacher's own
distribution (heldout_same) and of another one (heldout_other):
    effect kept = 1 - KL(teacher || candidate) / KL(teacher || base)   (next-token, nats/token)
Bytes are the storage the baseline needs: packed integers (two int4 per byte) + fp16 scales (or fp16
factors) + the adapter config; "smaller" is the teacher's fp16 PEFT files (safetensors + config)
divided by that.

    python benchmarks/bench_baseline.py                        # ~10-20 min on a shared 2-core CPU
    python benchmarks/bench_baseline.py --n-seq 4 --teachers T1 --points r8-int4   # smoke
Outputs: benchmarks/results/baseline.txt, baseline.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (ROOT, TEACHERS, adapter_bytes, base_model_dir, baseline_adapter,  # noqa: E402
                               effect_kept_many, load_text)

RESULTS = Path(__file__).resolve().parent / "results"
# label -> (rank, bits; None = fp16)
POINTS = {"r8-fp16": (8, None), "r4-int8": (4, 8), "r8-int4": (8, 4), "r4-int4": (4, 4),
          "r2-int4": (2, 4), "r1-int4": (1, 4)}
TEXTS = ("heldout_other", "heldout_same")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", default="T1,T2")
    ap.add_argument("--points", default=",".join(POINTS))
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--n-seq", type=int, default=24, help="held-out chunks per text, spread over it")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=ROOT / "tmp" / "bench_baseline")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base = base_model_dir()
    rows = []
    for name in args.teachers.split(","):
        teacher = TEACHERS[name]
        tbytes = adapter_bytes(teacher)
        cands, built = {}, {}
        for label in args.points.split(","):
            rank, bits = POINTS[label]
            res = baseline_adapter(teacher, args.workdir / name / label, rank, bits)
            cands[label], built[label] = res.out_dir, res
        scores = {text: effect_kept_many(base, teacher, cands, load_text(text), args.max_len, args.n_seq)
                  for text in TEXTS}
        for label in cands:
            rows.append({"teacher": name, "teacher_dir": teacher.name, "teacher_bytes": tbytes, "point": label,
                         "rank": POINTS[label][0], "bits": POINTS[label][1] or 16, "bytes": built[label].bytes,
                         "smaller": tbytes / built[label].bytes,
                         **{text: scores[text][label].as_dict() for text in TEXTS}})
            r = rows[-1]
            print(f"{name} {label:8s} {r['bytes']:>10,} B {r['smaller']:6.1f}x  "
                  + "  ".join(f"{t} {r[t]['effect_kept']:.1%}" for t in TEXTS), flush=True)
        write(rows, args, time.perf_counter() - t0, quiet=True)  # a killed run keeps the teachers done
    seconds = time.perf_counter() - t0
    write(rows, args, seconds)
    return {"rows": rows}


def write(rows: list[dict], args, seconds: float, quiet: bool = False) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    head = [
        "Baseline: SVD truncation of s*B*A to rank k per module (float64, from the factors), then both",
        "factors as symmetric ints in groups of 64 along the long side, one fp16 scale per group.",
        f"Model SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32), CPU, {args.threads} threads; held-out text:"
        f" {args.n_seq} chunks x {args.max_len} tokens per text; wall time {seconds:.0f} s.",
        "effect kept = 1 - KL(teacher||x)/KL(teacher||base); smaller = teacher fp16 PEFT files / baseline bytes.",
        "",
    ]
    kl = {}
    for r in rows:
        kl[r["teacher"]] = {t: r[t]["kl_teacher_base"] for t in TEXTS}
    for name, v in kl.items():
        tb = next(r["teacher_bytes"] for r in rows if r["teacher"] == name)
        head.append(f"{name} = {next(r['teacher_dir'] for r in rows if r['teacher'] == name)}, {tb:,} bytes;"
                    f" KL(teacher||base) heldout_other {v['heldout_other']:.4f}, heldout_same {v['heldout_same']:.4f}")
    head.append("")
    cols = f"{'teacher':7s} {'point':8s} {'bytes':>11s} {'smaller':>8s} {'kept other':>11s} {'kept same':>10s}" \
           f" {'KL other':>9s} {'KL same':>8s}"
    lines = head + [cols, "-" * len(cols)]
    for r in rows:
        lines.append(f"{r['teacher']:7s} {r['point']:8s} {r['bytes']:>11,} {r['smaller']:>7.1f}x"
                     f" {r['heldout_other']['effect_kept']:>10.1%} {r['heldout_same']['effect_kept']:>10.1%}"
                     f" {r['heldout_other']['kl_teacher_candidate']:>9.4f} {r['heldout_same']['kl_teacher_candidate']:>8.4f}")
    text = "\n".join(lines) + "\n"
    (args.out / "baseline.txt").write_text(text)
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "baseline.json").write_text(json.dumps({"args": meta, "seconds": seconds, "rows": rows}, indent=1) + "\n")
    if not quiet:
        print(text)


if __name__ == "__main__":
    main()
