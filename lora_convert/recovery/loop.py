"""The training loop for inner matrices, on accelerate: device, mixed precision, gradient
accumulation and multi-process data parallelism come from accelerate.Accelerator, so the
same code runs on CPU, one GPU, or several under ``accelerate launch``.

Checkpoints hold only what training changes (the inner matrices, optimizer and schedule
state) plus a description of the run, so they are small and a resume with different
settings is refused instead of silently mixing two runs.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..atomic import atomic_file
from ..errors import BadInputError
from .data import BatchPlan, collate
from .layers import MiniLayer, inner_parameters

SCHEDULES = ("constant", "linear", "cosine")
CHECKPOINT_FILE = "state.pt"


@dataclass
class TrainOptions:
    steps: int = 200
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # default: 5% of the steps
    schedule: str = "cosine"
    max_grad_norm: float | None = 1.0
    seed: int = 0
    checkpoint_every: int = 0  # 0: only the final checkpoint
    checkpoint_dir: str | None = None
    keep_checkpoints: int = 2
    resume: bool = False
    progress: bool = True

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) <= 0:
                raise BadInputError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise BadInputError(f"--lr must be positive, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise BadInputError(f"--schedule must be one of {', '.join(SCHEDULES)}")
        if self.resume and not self.checkpoint_dir:
            raise BadInputError("--resume needs a checkpoint directory")

    def identity(self) -> dict:
        """The settings a resumed run must share with the original (everything that shapes the result)."""
        keep = ("steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "schedule",
                "max_grad_norm", "seed")
        return {k: getattr(self, k) for k in keep}


@dataclass
class TrainResult:
    steps: int
    start_step: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def make_accelerator(device: str, grad_accum: int):
    """An Accelerator on `device` ('cuda' or 'cpu'); bf16 autocast on CUDA."""
    from accelerate import Accelerator

    mixed = "bf16" if device == "cuda" else "no"
    return Accelerator(cpu=device == "cpu", mixed_precision=mixed, gradient_accumulation_steps=grad_accum)


def lr_lambda(opts: TrainOptions) -> Callable[[int], float]:
    warmup = opts.warmup_steps if opts.warmup_steps is not None else round(0.05 * opts.steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if opts.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, opts.steps - warmup)
        if opts.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_inner(accelerator, model, layers: dict[str, MiniLayer], seqs: list[list[int]], pad_id: int,
                step_loss: Callable[[dict], torch.Tensor], opts: TrainOptions, run: dict) -> TrainResult:
    """Train the inner matrices of `layers` for opts.steps optimizer steps.

    `model` is the model accelerator.prepare returned; `step_loss(batch)` runs the
    forward(s) and returns the loss of one micro-batch. `run` describes the inputs
    (files, model) for the resume check.
    """
    opts.validate()
    params = inner_parameters(layers.values())
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opts))
    optimizer = accelerator.prepare(optimizer)  # skips steps between accumulation boundaries
    identity = {"run": run, "options": opts.identity(), "world": accelerator.num_processes}
    start = load_latest(opts.checkpoint_dir, layers, optimizer, scheduler, identity) if opts.resume else 0
    plan = BatchPlan(len(seqs), opts.batch_size, opts.seed, accelerator.num_processes, accelerator.process_index)
    result = TrainResult(steps=opts.steps, start_step=start)
    bar = _progress(opts, start, accelerator)
    # The model stays in eval mode: dropout off, so targets and updates are deterministic and a
    # resumed run continues exactly (only the inner matrices are trained; nothing needs train mode).
    model.eval()
    for step in range(start, opts.steps):
        t0 = time.perf_counter()
        loss, tokens = _one_step(accelerator, model, params, seqs, pad_id, plan, step, step_loss, optimizer, opts)
        scheduler.step()
        elapsed = time.perf_counter() - t0
        result.losses.append(loss)
        result.seconds += elapsed
        result.tokens += tokens
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}", tok_s=f"{tokens / elapsed:,.0f}")
        done = step + 1
        if opts.checkpoint_dir and ((opts.checkpoint_every and done % opts.checkpoint_every == 0)
                                    or done == opts.steps):
            save_checkpoint(accelerator, opts, layers, optimizer, scheduler, done, identity)
    if bar is not None:
        bar.close()
    return result


def _one_step(accelerator, model, params, seqs, pad_id, plan, step, step_loss, optimizer, opts):
    """One optimizer step over grad_accum micro-batches; returns (mean loss, tokens, all processes)."""
    losses, tokens = [], 0
    for micro in range(opts.grad_accum):
        batch = collate([seqs[i] for i in plan.indices(step * opts.grad_accum + micro)], pad_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss = step_loss(batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients and opts.max_grad_norm:
                accelerator.clip_grad_norm_(params, opts.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        tokens += int(batch["attention_mask"].sum())
    mean = accelerator.reduce(torch.stack(losses).mean(), reduction="mean")
    return float(mean), tokens * accelerator.num_processes


def _progress(opts: TrainOptions, start: int, accelerator):
    if not opts.progress or not accelerator.is_local_main_process:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=opts.steps, initial=start, desc="training", unit="step", file=sys.stderr, dynamic_ncols=True)


# ------------------------------------------------------------------ checkpoints

def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def save_checkpoint(accelerator, opts: TrainOptions, layers, optimizer, scheduler, step: int, identity: dict):
    """Write checkpoint `step` (main process only) and prune all but the newest keep_checkpoints."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        root = Path(opts.checkpoint_dir)
        state = {"step": step, "identity": json.dumps(identity, sort_keys=True),
                 "inner": {n: {"X": l.X.detach().cpu(), "Y": l.Y.detach().cpu()} for n, l in layers.items()},
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        target = _step_dir(root, step) / CHECKPOINT_FILE
        with atomic_file(target) as tmp:
            torch.save(state, tmp)
        for old in sorted(checkpoints(root))[:-max(1, opts.keep_checkpoints)]:
            shutil.rmtree(_step_dir(root, old), ignore_errors=True)
    accelerator.wait_for_everyone()


def checkpoints(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"step-(\d+)", p.name))
             and (p / CHECKPOINT_FILE).is_file()]
    return sorted(steps)


def load_latest(checkpoint_dir: str, layers, optimizer, scheduler, identity: dict) -> int:
    """Restore the newest checkpoint; returns its step (0 when there is none yet)."""
    root = Path(checkpoint_dir)
    found = checkpoints(root)
    if not found:
        return 0
    path = _step_dir(root, found[-1]) / CHECKPOINT_FILE
    state = torch.load(path, map_location="cpu", weights_only=True)
    _check_identity(json.loads(state["identity"]), identity, path)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.X.copy_(state["inner"][name]["X"])
            layer.Y.copy_(state["inner"][name]["Y"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


def _check_identity(saved: dict, current: dict, path: Path) -> None:
    current = json.loads(json.dumps(current, sort_keys=True))  # same normalisation as the saved copy
    if saved == current:
        return
    diffs = sorted(_diff_keys(saved, current))
    raise BadInputError(f"checkpoint was written by a different run (differs in: {', '.join(diffs[:5])}); "
                        "use the same settings or another --checkpoint-dir", path)


def _diff_keys(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in set(a) | set(b):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]
