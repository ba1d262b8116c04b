"""The training loop for inner matrices, on accelerate: device, mixed precision, gradient
accumulation and multi-process data parallelism come from accelerate.Accelerator, so the
same code runs on CPU, one GPU, or several under ``accelerate launch``.

With an evaluation function, held-out loss is measured every `eval_every` steps; the best
state seen is kept (and restored at the end, so the exported adapter is the best one, not the
last), and `early_stopping` evaluations without improvement end the run.

Checkpoints hold only what training changes (the inner matrices, a trained head, optimizer and
schedule state, the best state so far) plus a description of the run, so they are small and a resume with different
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
    eval_every: int = 0  # 0: no evaluation during training
    early_stopping: int = 0  # stop after this many evaluations without improvement (0: never)
    keep_best: bool = True  # with eval_every: end on the best evaluated state, not the last

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) <= 0:
                raise BadInputError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise BadInputError(f"--lr must be a finite number > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise BadInputError(f"--schedule must be one of {', '.join(SCHEDULES)}")
        if self.resume and not self.checkpoint_dir:
            raise BadInputError("--resume needs a checkpoint directory")
        if self.eval_every < 0 or self.early_stopping < 0:
            raise BadInputError("--eval-every and --early-stopping must not be negative")
        if self.early_stopping and not self.eval_every:
            raise BadInputError("--early-stopping needs --eval-every (it counts evaluations)")

    def identity(self) -> dict:
        """The settings a resumed run must share with the original (everything that shapes the result)."""
        keep = ("steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "schedule",
                "max_grad_norm", "seed", "eval_every", "early_stopping", "keep_best")
        return {k: getattr(self, k) for k in keep}


@dataclass
class TrainResult:
    steps: int
    start_step: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    step_seconds: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)
    best_step: int | None = None
    best_loss: float | None = None
    stopped_at: int | None = None  # the step early stopping ended the run at
    lr: float = 0.0  # the peak learning rate used

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
                step_loss: Callable[[dict], torch.Tensor], opts: TrainOptions, run: dict,
                evaluate: Callable[[], float] | None = None,
                extra_params: dict[str, torch.nn.Parameter] | None = None) -> TrainResult:
    """Train the inner matrices of `layers` (and `extra_params`, e.g. a classification head) for
    opts.steps optimizer steps.

    `model` is the model accelerator.prepare returned; `step_loss(batch)` runs the
    forward(s) and returns the loss of one micro-batch. `run` describes the inputs
    (files, model) for the resume check. `evaluate()` returns the held-out loss; it is
    called every opts.eval_every steps and at the end.
    """
    opts.validate()
    if opts.eval_every and evaluate is None:
        raise BadInputError("--eval-every needs held-out data to evaluate")
    state = TrainState(layers, extra_params or {})
    optimizer = torch.optim.AdamW(state.params, lr=opts.lr, weight_decay=opts.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opts))
    optimizer = accelerator.prepare(optimizer)  # skips steps between accumulation boundaries
    identity = {"run": run, "options": opts.identity(), "world": accelerator.num_processes}
    result = TrainResult(steps=opts.steps, start_step=0, lr=opts.lr)
    if opts.resume:
        result.start_step = load_latest(opts.checkpoint_dir, state, optimizer, scheduler, identity, result)
    plan = BatchPlan(len(seqs), opts.batch_size, opts.seed, accelerator.num_processes, accelerator.process_index)
    bar = _progress(opts, result.start_step, accelerator)
    since_best = _evals_since_best(result)
    # The model stays in eval mode: dropout off, so targets and updates are deterministic and a
    # resumed run continues exactly (only the inner matrices are trained; nothing needs train mode).
    model.eval()
    step = result.start_step
    while step < opts.steps and result.stopped_at is None:
        t0 = time.perf_counter()
        loss, tokens = _one_step(accelerator, model, state.params, seqs, pad_id, plan, step, step_loss, optimizer,
                                 opts)
        scheduler.step()
        elapsed = time.perf_counter() - t0
        result.losses.append(loss)
        result.seconds += elapsed
        result.step_seconds.append(elapsed)
        result.tokens += tokens
        step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}", tok_s=f"{tokens / elapsed:,.0f}")
        if opts.eval_every and (step % opts.eval_every == 0 or step == opts.steps):
            held = float(evaluate())
            result.evals.append((step, held))
            if result.best_loss is None or held < result.best_loss:
                result.best_loss, result.best_step, since_best = held, step, 0
                state.snapshot()
            else:
                since_best += 1
            if bar is not None:
                bar.write(f"step {step}: held-out loss {held:.4f} (best {result.best_loss:.4f} at {result.best_step})")
            if opts.early_stopping and since_best >= opts.early_stopping and step < opts.steps:
                result.stopped_at = step
        if opts.checkpoint_dir and ((opts.checkpoint_every and step % opts.checkpoint_every == 0)
                                    or step == opts.steps or result.stopped_at is not None):
            save_checkpoint(accelerator, opts, state, optimizer, scheduler, step, identity, result)
    if bar is not None:
        bar.close()
    if opts.eval_every and opts.keep_best and state.best is not None:
        state.restore_best()
    return result


def _evals_since_best(result: TrainResult) -> int:
    if result.best_step is None:
        return 0
    return sum(1 for s, _ in result.evals if s > result.best_step)


class TrainState:
    """The trained tensors by name (inner X, Y of each layer; extra parameters such as a head) and a copy
    of their best evaluated values."""

    def __init__(self, layers: dict[str, MiniLayer], extra: dict[str, torch.nn.Parameter]):
        self.named = {}
        for name, layer in layers.items():
            self.named[f"{name}.X"], self.named[f"{name}.Y"] = layer.X, layer.Y
        for name, p in extra.items():
            self.named[f"extra:{name}"] = p
        self.params = inner_parameters(layers.values()) + list(extra.values())
        self.best: dict[str, torch.Tensor] | None = None

    def values(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.named.items()}

    def load(self, values: dict[str, torch.Tensor], path: Path) -> None:
        if set(values) != set(self.named):
            raise BadInputError("checkpoint holds other tensors than this run trains", path)
        with torch.no_grad():
            for n, p in self.named.items():
                p.copy_(values[n])

    def snapshot(self) -> None:
        self.best = self.values()

    def restore_best(self) -> None:
        with torch.no_grad():
            for n, p in self.named.items():
                p.copy_(self.best[n])


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


def save_checkpoint(accelerator, opts: TrainOptions, state: TrainState, optimizer, scheduler, step: int,
                    identity: dict, result: TrainResult):
    """Write checkpoint `step` (main process only) and prune all but the newest keep_checkpoints."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        root = Path(opts.checkpoint_dir)
        progress = {"evals": result.evals, "best_step": result.best_step, "best_loss": result.best_loss,
                    "stopped_at": result.stopped_at}
        doc = {"step": step, "identity": json.dumps(identity, sort_keys=True), "tensors": state.values(),
               "best": state.best, "progress": json.dumps(progress),
               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        target = _step_dir(root, step) / CHECKPOINT_FILE
        with atomic_file(target) as tmp:
            torch.save(doc, tmp)
        for old in sorted(checkpoints(root))[:-max(1, opts.keep_checkpoints)]:
            shutil.rmtree(_step_dir(root, old), ignore_errors=True)
    accelerator.wait_for_everyone()


def checkpoints(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"step-(\d+)", p.name))
             and (p / CHECKPOINT_FILE).is_file()]
    return sorted(steps)


def load_latest(checkpoint_dir: str, state: TrainState, optimizer, scheduler, identity: dict,
                result: TrainResult) -> int:
    """Restore the newest checkpoint (and the evaluation history into `result`); returns its step
    (0 when there is none yet)."""
    root = Path(checkpoint_dir)
    found = checkpoints(root)
    if not found:
        return 0
    path = _step_dir(root, found[-1]) / CHECKPOINT_FILE
    saved = torch.load(path, map_location="cpu", weights_only=True)
    _check_identity(json.loads(saved["identity"]), identity, path)
    state.load(saved["tensors"], path)
    state.best = saved["best"]
    progress = json.loads(saved["progress"])
    result.evals = [tuple(e) for e in progress["evals"]]
    result.best_step, result.best_loss, result.stopped_at = (progress["best_step"], progress["best_loss"],
                                                             progress["stopped_at"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return int(saved["step"])


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
