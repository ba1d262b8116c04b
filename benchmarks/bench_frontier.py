"""The size–fidelity frontier: effect kept on held-out text against bytes stored, side by side.

    effect kept = 1 − KL(teacher ‖ x) / KL(teacher ‖ base)   (next-token distributions, nats/token)

Teachers: real PEFT LoRAs of SmolLM2-135M-Instruct trained hard on `fixtures/text/train.txt`
(scripts/make_teachers.py): T1 = r=16 on all seven projections, T2 = r=64 attention-only.
Held-out texts: `heldout_same.txt` (docstrings the teacher never saw) and `heldout_other.txt`
(license texts: another distribution). Calibration and recovery read `calibration.txt` only.

Points, all written as real files and scored through PEFT (the directory a user would load):
  svd-fp32 rK        per-module SVD truncation of s·B·A to rank K, fp32 factors (kohya resize / PEFT)
  baseline rK intB   the same, both factors symmetric intB in groups of 64 along the long side, one
                     fp16 scale per group (benchmarks/common.py; bytes = codes + scales + config)
  lc svd Nx          `compress --outer svd --target-size Nx` (rank and bits per module by budget)
  lc svd Nx bal B    the same with the budget walk's balance (lora_convert.budget.BALANCE) set to B
                     (--balance: the comparison behind its default)
  lc svd Nx gG       the same with quantization groups of G values (--groups: the comparison behind
                     the default group)
  lc svd+cal Nx      the same with `--calibration calibration.txt --base <SmolLM2>`
  lc ... +rec S      a LoRA-Mini file, then `lora-convert recover` for S steps on calibration.txt
lora_convert points go compress → save (bytes = the LoRA-Mini file) → load → reconstruct → PEFT.
"smaller" is the teacher's adapter_model.safetensors size over a point's bytes.

    nice -n 10 python benchmarks/bench_frontier.py                  # everything; hours on 2 busy cores
    nice -n 10 python benchmarks/bench_frontier.py --teachers T1 --recover-steps 0   # no recovery
    python benchmarks/bench_frontier.py --report-only               # tables/plot from the cache

Every finished point (file, bytes, effect kept per text) is cached under benchmarks/cache/frontier/
(git-ignored), so an interrupted run resumes where it stopped. Outputs:
benchmarks/results/frontier.txt, frontier.json, frontier.md (the README's tables), frontier.png.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lora_convert as lc  # noqa: E402
from lora_convert import budget, calibrated, quant  # noqa: E402
from benchmarks import common  # noqa: E402

CACHE = ROOT / "benchmarks" / "cache" / "frontier"
RESULTS = ROOT / "benchmarks" / "results"
HELDOUT = ("heldout_same", "heldout_other")
SVD_RANKS = (1, 2, 4, 8)
CAL_METRIC_KEY = {"relative": "", "weight": "-wt"}  # cache keys of calibrated budget points
# ... and of every quantized point: the quantization group compress uses by default (none for 64)
GROUP_KEY = "" if quant.DEFAULT_GROUP == 64 else f"-g{quant.DEFAULT_GROUP}"
BASELINES = ((8, None), (4, 8), (8, 4), (4, 4), (2, 4), (1, 4))  # (rank, bits); None = fp16: the table
TARGETS = (8, 16, 32, 64, 128)
RECOVER = ("random:256:2:4", "svd:32x")   # svd:<target> | random:<outer dim>:<rank>:<bits>


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# ------------------------------------------------------------------------------------------------
# Points: each returns (PEFT directory to score, bytes stored, notes)

def point_svd_fp32(teacher: Path, out: Path, rank: int):
    from safetensors.torch import save_file

    cfg, mods = common.peft_modules(teacher)
    tensors = {}
    for prefix, (a, b, scale) in mods.items():
        ak, bk = common.truncate(a, b, scale, rank)
        tensors[prefix + ".lora_A.weight"] = ak.float().contiguous()
        tensors[prefix + ".lora_B.weight"] = bk.float().contiguous()
    out.mkdir(parents=True, exist_ok=True)
    new_cfg = dict(cfg, r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    (out / "adapter_config.json").write_text(json.dumps(new_cfg, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out, common.adapter_bytes(out), {}


def point_baseline(teacher: Path, out: Path, rank: int, bits):
    res = common.baseline_adapter(teacher, out, rank, bits)
    return out, res.bytes, {}


def _mini_to_peft(mini_file: Path, out: Path) -> dict:
    """load → reconstruct → PEFT directory; the stored bits mix and inner ranks as notes."""
    mini = lc.load(mini_file)
    bits, ranks = {}, {}
    for m in mini.modules():
        key = quant.width_name(m.quant["bits"]) if m.quant else m.dtype
        bits[key] = bits.get(key, 0) + 1
        ranks[m.inner_rank] = ranks.get(m.inner_rank, 0) + 1
    if out.exists():
        shutil.rmtree(out)
    lc.save_adapter(lc.reconstruct(mini), out, "peft")
    return {"bits_per_value": dict(sorted(bits.items())), "inner_ranks": {str(k): v for k, v in sorted(ranks.items())}}


def point_lc(teacher: Path, out: Path, target: int, calibration=None, outer="svd", **extra):
    adapter = lc.load_adapter(teacher)
    if target is not None:
        extra["target_size"] = f"{target}x"
    mini = lc.compress(adapter, outer, calibration=calibration, **extra)
    mini_file = out / "mini.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    report = lc.save(mini, mini_file)
    notes = _mini_to_peft(mini_file, out / "peft")
    notes["weight_energy_kept"] = report.retained_energy
    return out / "peft", mini_file.stat().st_size, notes


def point_recover(teacher: Path, out: Path, spec: str, steps: int, base: Path, args):
    """A LoRA-Mini file from `spec`, then `lora-convert recover` on calibration.txt."""
    out.mkdir(parents=True, exist_ok=True)
    start = out / "start.safetensors"
    kind, *rest = spec.split(":")
    adapter = lc.load_adapter(teacher)
    if kind == "svd":
        mini = lc.compress(adapter, "svd", target_size=rest[0])
    elif kind == "random":
        dim, rank, bits = (int(x) for x in rest)
        mini = lc.compress(adapter, "random", outer_dim=(dim, dim), rank=rank, bits=None if bits == 16 else bits,
                           dtype="fp16" if bits == 16 else "auto")
    else:
        raise ValueError(f"recovery spec {spec!r}: svd:<target> or random:<dim>:<rank>:<bits>")
    lc.save(mini, start)
    rec = out / "recovered.safetensors"
    if rec.exists():
        rec.unlink()
    cmd = [sys.executable, "-m", "lora_convert.cli", "recover", str(start), "--teacher", str(teacher),
           "--data", str(common.TEXT_DIR / "calibration.txt"), "--base", str(base), "-o", str(rec),
           "--steps", str(steps), "--max-len", str(args.recover_len), "--batch-size", "4",
           "--max-eval-sequences", "4", "--device", "cpu", "--no-progress", "--offline"]
    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (out / "recover.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"recover exited {proc.returncode}: {tail[0]}")
    notes = _mini_to_peft(rec, out / "peft")
    notes.update(start_bytes=start.stat().st_size, recover_seconds=round(time.time() - t0, 1), steps=steps)
    return out / "peft", rec.stat().st_size, notes


# ------------------------------------------------------------------------------------------------
# Plan, cache, evaluation

# Families built to compare an option against compress's default: not held to the targets
COMPARISONS = ("lc svd balance", "lc svd group")


def plan_points(args) -> list[dict]:
    """[{key, family, label, ...}] in the order they are built."""
    pts = []
    for r in args.svd_ranks:
        pts.append({"key": f"svd-fp32-r{r}", "family": "svd fp32", "label": f"svd-fp32 r{r}", "rank": r})
    for r, b in BASELINES:
        name = "fp16" if b is None else f"int{b}"
        pts.append({"key": f"baseline-r{r}-{name}", "family": "baseline", "label": f"baseline r{r} {name}",
                    "rank": r, "bits": b})
    for t in args.targets:
        pts.append({"key": f"lc-svd-{t}x{GROUP_KEY}", "family": "lc svd", "label": f"lc svd {t}x", "target": t})
    for b in args.balance:
        for t in args.targets:
            pts.append({"key": f"lc-svd-{t}x-bal{b:g}{GROUP_KEY}", "family": "lc svd balance", "label": f"lc svd {t}x bal {b:g}",
                        "target": t, "balance": b})
    for g in args.groups:  # (the default group's points are built again under their own key)
        for t in args.targets:
            pts.append({"key": f"lc-svd-{t}x-grp{g}", "family": "lc svd group", "label": f"lc svd {t}x g{g}",
                        "target": t, "group": g})
    if not args.no_calibration:
        for t in args.targets:
            # the allocation metric is part of the key: points of another one are not reused
            pts.append({"key": f"lc-svdcal-{t}x-s{args.cal_sequences}{CAL_METRIC_KEY[calibrated.ALLOCATE_BY]}{GROUP_KEY}",
                        "family": "lc svd+cal",
                        "label": f"lc svd+cal {t}x", "target": t, "calibrated": True})
        for r in args.cal_ranks:
            pts.append({"key": f"lc-svdcal-r{r}-fp16-s{args.cal_sequences}", "family": "lc svd+cal",
                        "label": f"lc svd+cal r{r} fp16", "rank": r, "calibrated": True})
    if args.recover_steps > 0:
        for spec in args.recover:
            slug = spec.replace(":", "-")
            pts.append({"key": f"lc-rec-{slug}-st{args.recover_steps}-L{args.recover_len}{GROUP_KEY}", "family": "lc +recovery",
                        "label": f"lc {spec} +rec {args.recover_steps}", "spec": spec})
    return pts


def fingerprint(path: Path) -> str:
    """The teacher's weights and config (its model card may change without invalidating results)."""
    h = hashlib.sha256()
    for f in (Path(path) / "adapter_config.json", Path(path) / "adapter_model.safetensors"):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def load_cache(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_cache(path: Path, cache: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
    os.replace(tmp, path)


def run_teacher(name: str, teacher: Path, args, base: Path) -> dict:
    tdir = args.cache_dir / name
    tdir.mkdir(parents=True, exist_ok=True)
    cache_file = tdir / "points.json"
    cache = load_cache(cache_file)
    tfp = fingerprint(teacher)
    evalcfg = {"n_seq": args.n_seq, "max_len": args.max_len}
    if cache.get("_teacher") != tfp or cache.get("_eval") != evalcfg:
        if cache:
            log(f"{name}: teacher or eval settings changed; cache cleared")
        cache = {"_teacher": tfp, "_eval": evalcfg}
    teacher_bytes = (teacher / "adapter_model.safetensors").stat().st_size
    cache["_teacher_bytes"] = teacher_bytes
    calibration = None

    def get_calibration():
        nonlocal calibration
        if calibration is None:
            from lora_convert.recovery.calibration import calibration_stats

            t0 = time.time()
            calibration = calibration_stats(lc.load_adapter(teacher), str(common.TEXT_DIR / "calibration.txt"),
                                            str(base), offline=True, device="cpu", max_len=256,
                                            max_sequences=args.cal_sequences)
            log(f"{name}: calibration statistics from {args.cal_sequences} x 256 tokens in {time.time() - t0:.0f} s")
        return calibration

    def build(points):
        for p in points:
            entry = cache.get(p["key"])
            if entry and (entry.get("peft") or (entry.get("error") and not args.retry_failed)):
                continue
            out = tdir / p["key"]
            if out.exists():
                shutil.rmtree(out)
            t0 = time.time()
            try:
                if p["family"] == "svd fp32":
                    peft, nbytes, notes = point_svd_fp32(teacher, out, p["rank"])
                elif p["family"] == "baseline":
                    peft, nbytes, notes = point_baseline(teacher, out, p["rank"], p["bits"])
                elif p["family"] == "lc svd":
                    peft, nbytes, notes = point_lc(teacher, out, p["target"])
                elif p["family"] == "lc svd balance":
                    default, budget.BALANCE = budget.BALANCE, p["balance"]  # the walk reads it at each call
                    try:
                        peft, nbytes, notes = point_lc(teacher, out, p["target"])
                    finally:
                        budget.BALANCE = default
                elif p["family"] == "lc svd group":
                    peft, nbytes, notes = point_lc(teacher, out, p["target"], group_size=p["group"])
                elif p["family"] == "lc svd+cal" and "rank" in p:
                    peft, nbytes, notes = point_lc(teacher, out, None, calibration=get_calibration(), rank=p["rank"],
                                                   dtype="fp16")
                elif p["family"] == "lc svd+cal":
                    peft, nbytes, notes = point_lc(teacher, out, p["target"], calibration=get_calibration())
                else:
                    peft, nbytes, notes = point_recover(teacher, out, p["spec"], args.recover_steps, base, args)
                entry = dict(p, peft=str(peft.relative_to(ROOT)), bytes=nbytes, notes=notes,
                             build_seconds=round(time.time() - t0, 1), effect={})
                log(f"{name}: built {p['label']}: {nbytes:,} B ({teacher_bytes / nbytes:.1f}x) in {time.time() - t0:.0f} s")
            except Exception as exc:  # a refusal or failure is a result too: recorded, not retried
                msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                entry = dict(p, error=msg)
                log(f"{name}: {p['label']} failed: {msg}")
                if args.verbose:
                    traceback.print_exc()
            cache[p["key"]] = entry
            save_cache(cache_file, cache)

    def score():
        # every point without an effect for a text yet: all candidates in one pass per text
        for text_name in args.heldout:
            todo = {k: ROOT / e["peft"] for k, e in cache.items()
                    if not k.startswith("_") and e.get("peft") and text_name not in e.get("effect", {})}
            if not todo:
                continue
            t0 = time.time()
            for group in chunked(list(todo.items()), args.eval_group):
                res = common.effect_kept_many(base, teacher, dict(group), common.load_text(text_name),
                                              max_len=args.max_len, n_seq=args.n_seq, batch=2)
                for k, eff in res.items():
                    cache[k]["effect"][text_name] = eff.as_dict()
                save_cache(cache_file, cache)
            log(f"{name}: scored {len(todo)} points on {text_name} in {time.time() - t0:.0f} s")

    # cheap points first, scored, then recovery (slow), scored: an interrupted run still has a frontier
    plan = [p for p in plan_points(args) if not args.only or p["family"] in args.only]
    for slow in (False, True):
        phase = [p for p in plan if (p["family"] == "lc +recovery") == slow]
        build(phase)
        score()
    return cache


def rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def short_error(msg: str) -> str:
    """An error message without the machine's absolute paths."""
    return re.sub(r"(?<![\w.])/\S+: ", "", msg)


def chunked(items, n):
    for i in range(0, len(items), n):
        yield items[i:i + n]


# ------------------------------------------------------------------------------------------------
# Report

def envelope(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The baseline's upper frontier: points not beaten by a smaller-or-equal one, by bytes."""
    out, best = [], -math.inf
    for b, e in sorted(points):
        if e > best:
            out.append((b, e))
            best = e
    return out


def baseline_at(env: list[tuple[int, float]], nbytes: int) -> float | None:
    """The baseline's effect kept at `nbytes`: linear in log-bytes between frontier points, its best
    beyond the largest, None below the smallest (the baseline has no point that small)."""
    if not env or nbytes < env[0][0]:
        return None
    if nbytes >= env[-1][0]:
        return env[-1][1]
    for (b0, e0), (b1, e1) in zip(env, env[1:]):
        if b0 <= nbytes <= b1:
            t = (math.log(nbytes) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return e0 + t * (e1 - e0)
    return None


def current(key: str) -> bool:
    """False for a cached lora_convert point that compress would not write now: another default
    group, or (calibrated budgets) another allocation metric."""
    if not key.startswith(("lc-svd", "lc-rec")) or "-grp" in key or key.startswith("lc-svdcal-r"):
        return True  # not quantized by default, a group comparison, or calibration at a fixed rank
    stem, group = re.fullmatch(r"(.*?)(-g\d+)?", key).groups()
    if (group or "") != GROUP_KEY:
        return False
    m = re.fullmatch(r"lc-svdcal-\d+x-s\d+(-[a-z]+)?", stem)
    return m is None or (m.group(1) or "") == CAL_METRIC_KEY[calibrated.ALLOCATE_BY]


def report(all_cache: dict, args) -> tuple[str, dict]:
    lines, summary = [], {"teachers": {}, "targets": {}}
    t_ok = {"frontier": True, "free40": True, "rec100": True}
    compared = 0
    t_any = {"free40": False, "rec100": False}
    for name, cache in all_cache.items():
        tb = cache["_teacher_bytes"]
        pts = [e for k, e in cache.items() if not k.startswith("_")]
        order = {f: i for i, f in enumerate(("svd fp32", "baseline", "lc svd", "lc svd balance", "lc svd group", "lc svd+cal",
                                             "lc +recovery"))}
        tb32 = fp32_bytes(args.teacher_paths[name])
        pts.sort(key=lambda e: (order[e["family"]], -(e.get("bytes") or 0)))
        lines.append(f"\n## {name}: {rel(args.teacher_paths[name])} ({tb:,} B adapter_model.safetensors)")
        kl_base = {t: next((e["effect"][t]["kl_teacher_base"] for e in pts if t in e.get("effect", {})), None)
                   for t in args.heldout}
        lines.append("KL(teacher‖base), nats/token: " + ", ".join(
            f"{t} {v:.3f}" if v is not None else f"{t} ?" for t, v in kl_base.items()))
        head = f"{'point':30s} {'bytes':>11s} {'smaller':>8s} {'fp32/x':>7s} " + " ".join(f"{t:>14s}" for t in args.heldout)
        head += "  vs baseline at ≤ bytes (per text)"
        lines += [head, "-" * len(head)]
        envs = {t: envelope([(e["bytes"], e["effect"][t]["effect_kept"]) for e in pts
                             if e["family"] == "baseline" and t in e.get("effect", {})]) for t in args.heldout}
        for e in pts:
            if e.get("error"):
                lines.append(f"{e['label']:30s} {'—':>11s} {'':>8s} not available: {short_error(e['error'])}")
                continue
            eff = {t: e["effect"].get(t, {}).get("effect_kept") for t in args.heldout}
            row = f"{e['label']:30s} {e['bytes']:>11,} {tb / e['bytes']:>7.1f}x {tb32 / e['bytes']:>6.1f}x " + " ".join(
                f"{100 * v:>13.1f}%" if v is not None else f"{'?':>14s}" for v in eff.values())
            if e["family"].startswith("lc"):
                cmp = []
                for t in args.heldout:
                    ref = baseline_at(envs[t], e["bytes"])
                    if eff[t] is None:
                        cmp.append("?")
                    elif ref is None:
                        cmp.append("below baseline's range")
                    else:
                        ok = eff[t] >= ref
                        if e["family"] not in COMPARISONS:  # not what compress writes
                            t_ok["frontier"] &= ok
                            compared += 1
                        cmp.append(f"{'≥' if ok else '<'} {100 * ref:.1f}%")
                row += "  " + "; ".join(cmp)
                e["vs_baseline"] = dict(zip(args.heldout, cmp))
            lines.append(row)
        # targets per teacher and text
        for t in args.heldout:
            ok_free = [e for e in pts if e["family"] in ("lc svd", "lc svd+cal") and e.get("peft")
                       and tb / e["bytes"] >= 40 and e["effect"].get(t, {}).get("effect_kept", -1) >= 0.95]
            ok_rec = [e for e in pts if e["family"] == "lc +recovery" and e.get("peft")
                      and tb / e["bytes"] >= 100 and e["effect"].get(t, {}).get("effect_kept", -1) >= 0.95]
            ok_free32 = [e for e in pts if e["family"] in ("lc svd", "lc svd+cal") and e.get("peft")
                         and tb32 / e["bytes"] >= 40 and e["effect"].get(t, {}).get("effect_kept", -1) >= 0.95]
            summary["teachers"].setdefault(name, {})[t] = {"free40": [e["label"] for e in ok_free],
                                                           "free40_fp32": [e["label"] for e in ok_free32],
                                                           "rec100": [e["label"] for e in ok_rec]}
            t_ok["free40"] &= bool(ok_free)
            t_any["free40"] |= bool(ok_free)
            if t == "heldout_other":  # the target's text: another distribution than the calibration text
                t_ok["rec100"] &= bool(ok_rec)
                t_any["rec100"] |= bool(ok_rec)
    status = {
        "every lc point >= baseline at <= bytes (all teachers, texts)": t_ok["frontier"] if compared else None,
        "training-free >= 95% at >= 40x (every teacher and text)": t_ok["free40"],
        "with recovery >= 95% at >= 100x on heldout_other (every teacher)": t_ok["rec100"],
    }
    summary["targets"] = status
    lines.append("\n## Targets")
    for k, v in status.items():
        lines.append(f"- {k}: {'no comparable point' if v is None else 'MET' if v else 'NOT MET'}")
    for name, per in summary["teachers"].items():
        for t, d in per.items():
            lines.append(f"  {name} {t}: ≥95% at ≥40x training-free: {', '.join(d['free40']) or 'none'} "
                         f"(≥40x of the fp32 original: {', '.join(d['free40_fp32']) or 'none'}); "
                         f"≥95% at ≥100x with recovery: {', '.join(d['rec100']) or 'none'}")
    return "\n".join(lines), summary


def fp32_bytes(teacher: Path) -> int:
    """The size of the teacher's adapter_model.safetensors with every tensor stored as float32
    (the fixtures are fp16; PEFT saves an adapter trained in fp32 as fp32)."""
    import json
    import struct

    with open(teacher / "adapter_model.safetensors", "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    return 8 + n + sum(4 * math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def markdown(all_cache: dict, args) -> str:
    """One table per teacher for benchmarks/README.md."""
    out = []
    for name, cache in all_cache.items():
        tb = cache["_teacher_bytes"]
        tb32 = fp32_bytes(args.teacher_paths[name])
        out.append(f"\n**{name}** ({rel(args.teacher_paths[name])}, {tb:,} B; as fp32 {tb32:,} B)\n")
        out.append("| point | bytes | smaller | smaller than fp32 | "
                   + " | ".join(f"effect kept, {t}" for t in args.heldout) + " |")
        out.append("|---|---:|---:|---:|" + "---:|" * len(args.heldout))
        pts = [e for k, e in cache.items() if not k.startswith("_") and e["family"] not in COMPARISONS]
        pts.sort(key=lambda e: (-(e.get("bytes") or 0), e["label"]))
        for e in pts:
            if e.get("error"):
                out.append(f"| {e['label']} | — | — | — | " + " | ".join("refused" for _ in args.heldout) + " |")
                continue
            cells = []
            for t in args.heldout:
                v = e["effect"].get(t, {}).get("effect_kept")
                cells.append("?" if v is None else f"{100 * v:.1f}%")
            out.append(f"| {e['label']} | {e['bytes']:,} | {tb / e['bytes']:.1f}x | {tb32 / e['bytes']:.1f}x | "
                       + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(all_cache: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    styles = {"svd fp32": ("tab:gray", "s", "-"), "baseline": ("black", "o", "-"), "lc svd": ("tab:blue", "^", "-"),
              "lc svd+cal": ("tab:green", "v", "-"), "lc +recovery": ("tab:red", "*", "")}
    names = list(all_cache)
    fig, axes = plt.subplots(len(names), len(args.heldout), figsize=(5.5 * len(args.heldout), 4 * len(names)),
                             squeeze=False)
    for i, name in enumerate(names):
        cache = all_cache[name]
        tb = cache["_teacher_bytes"]
        for j, t in enumerate(args.heldout):
            ax = axes[i][j]
            for fam, (color, marker, ls) in styles.items():
                pts = sorted((tb / e["bytes"], e["effect"][t]["effect_kept"]) for k, e in cache.items()
                             if not k.startswith("_") and e.get("family") == fam and t in e.get("effect", {}))
                if pts:
                    ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], color=color, marker=marker,
                            linestyle=ls, label=fam)
            ax.axhline(95, color="tab:orange", lw=0.8, ls=":")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_ylim(max(0, ax.get_ylim()[0]), 101)
            ax.set_xlabel("times smaller than the teacher's safetensors")
            ax.set_ylabel("effect kept, %")
            ax.set_title(f"{name}, {t}")
            ax.grid(True, which="both", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teachers", default="T1,T2", help="names from benchmarks/common.TEACHERS (comma-separated)")
    ap.add_argument("--teacher-path", action="append", default=[], metavar="NAME=DIR",
                    help="use DIR for teacher NAME instead of its fixture")
    ap.add_argument("--heldout", default=",".join(HELDOUT))
    ap.add_argument("--n-seq", type=int, default=16, help="held-out chunks per text")
    ap.add_argument("--max-len", type=int, default=128, help="tokens per held-out chunk")
    ap.add_argument("--svd-ranks", default=",".join(map(str, SVD_RANKS)))
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)), help="--target-size ratios")
    ap.add_argument("--no-calibration", action="store_true")
    ap.add_argument("--cal-sequences", type=int, default=32, help="256-token calibration sequences")
    ap.add_argument("--recover", default=",".join(RECOVER),
                    help="starting files for recovery: svd:<target> or random:<dim>:<rank>:<bits>")
    ap.add_argument("--recover-steps", type=int, default=100, help="0: no recovery points")
    ap.add_argument("--recover-len", type=int, default=128, help="tokens per recovery sequence")
    ap.add_argument("--eval-group", type=int, default=12, help="candidates loaded at once for scoring")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--retry-failed", action="store_true",
                    help="build again the points that failed or were refused (e.g. after updating lora_convert)")
    ap.add_argument("--cal-ranks", default="1,2",
                    help="also calibrated svd at these fixed ranks, fp16 (calibration without a budget)")
    ap.add_argument("--groups", default="",
                    help="also lc svd with these quantization groups (comma-separated; the default is compress's)")
    ap.add_argument("--balance", default="",
                    help="also lc svd at these budget balances (comma-separated; budget.BALANCE is the default)")
    ap.add_argument("--cache-dir", type=Path, default=CACHE)
    ap.add_argument("--only", default="", help="build only these families (comma-separated, e.g. 'lc +recovery')")
    ap.add_argument("--merge-cache", type=Path, action="append", default=[],
                    help="with --report-only: also report the points of another cache directory")
    ap.add_argument("--report-only", action="store_true", help="tables and plot from the cache; build nothing")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    args.heldout = args.heldout.split(",")
    args.svd_ranks = [int(x) for x in args.svd_ranks.split(",") if x]
    args.targets = [int(x) for x in args.targets.split(",") if x]
    args.cal_ranks = [int(x) for x in args.cal_ranks.split(",") if x]
    args.balance = [float(x) for x in args.balance.split(",") if x]
    args.groups = [int(x) for x in args.groups.split(",") if x]
    args.recover = [x for x in args.recover.split(",") if x]
    args.cache_dir = args.cache_dir.resolve()
    args.only = [x for x in args.only.split(",") if x]
    torch.set_num_threads(args.threads)

    names = args.teachers.split(",")
    args.teacher_paths = {n: common.TEACHERS[n] for n in names}
    for spec in args.teacher_path:
        n, _, d = spec.partition("=")
        args.teacher_paths[n] = Path(d).resolve()
    base = common.base_model_dir()
    all_cache = {}
    for n in names:
        path = args.teacher_paths[n]
        if not (path / "adapter_model.safetensors").is_file():
            log(f"{n}: {path} has no adapter_model.safetensors yet; skipped")
            continue
        if args.report_only:
            cache = load_cache(args.cache_dir / n / "points.json")
            for extra in args.merge_cache:
                more = load_cache(extra.resolve() / n / "points.json")
                if cache and more.get("_teacher") == cache.get("_teacher") and more.get("_eval") == cache.get("_eval"):
                    cache.update({k: v for k, v in more.items() if not k.startswith("_") and v.get("peft")})
            if cache:
                all_cache[n] = cache
            continue
        all_cache[n] = run_teacher(n, path, args, base)
    if not all_cache:
        raise SystemExit("no teacher to report")

    # what compress does now: budget points of another default group or allocation metric stay cached, unreported
    all_cache = {n: {k: v for k, v in c.items() if current(k)} for n, c in all_cache.items()}
    text, summary = report(all_cache, args)
    header = (f"Size–fidelity frontier: effect kept = 1 − KL(teacher‖x)/KL(teacher‖base) on held-out text "
              f"({args.n_seq} chunks × {args.max_len} tokens per text), SmolLM2-135M-Instruct fp32 base.\n"
              f"Calibration: {args.cal_sequences} × 256 tokens of calibration.txt; recovery: "
              f"{args.recover_steps} steps, batch 4 × {args.recover_len} tokens of calibration.txt.\n"
              f"torch {torch.__version__}, lora_convert {lc.__version__}")
    out = header + "\n" + text + "\n"
    print(out)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "frontier.txt").write_text(out)
    doc = {"settings": {k: v for k, v in vars(args).items() if k != "teacher_paths"},
           "teachers": {n: {"path": rel(args.teacher_paths[n]), "points": c}
                        for n, c in all_cache.items()},
           "summary": summary}
    (RESULTS / "frontier.json").write_text(json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n")
    (RESULTS / "frontier.md").write_text(markdown(all_cache, args))
    plot(all_cache, args, RESULTS / "frontier.png")
    log("wrote benchmarks/results/frontier.{txt,json,md,png}")


if __name__ == "__main__":
    main()
