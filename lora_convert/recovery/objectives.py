"""Losses and metrics: distillation to the teacher, causal-LM loss, held-out fidelity statistics.

Everything is computed in float32 over the valid (non-padding) positions. For causal
LMs position t predicts token t+1, so logits[:, :-1] pair with input_ids[:, 1:].
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from .layers import MiniLayer


def model_output(out, task: str) -> torch.Tensor:
    """Next-token logits for causal LMs, the last hidden state otherwise."""
    return out.logits if task == "causal-lm" else out.last_hidden_state


def valid_positions(batch: dict, task: str) -> torch.Tensor:
    mask = batch["attention_mask"].bool()
    return mask[:, 1:] if task == "causal-lm" else mask


def aligned(t: torch.Tensor, task: str) -> torch.Tensor:
    return t[:, :-1] if task == "causal-lm" else t


def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) of the next-token distributions, one value per position."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def relative_mse(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean squared error over valid positions, relative to the teacher's mean square (scale-free)."""
    s, t = student.float()[valid], teacher.float()[valid]
    return (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)


def distill_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, batch: dict, task: str) -> torch.Tensor:
    valid = valid_positions(batch, task)
    s, t = aligned(student_out, task), aligned(teacher_out, task)
    if task == "causal-lm":
        return kl_per_token(t, s)[valid].mean()
    return relative_mse(s, t, valid)


def lm_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over valid positions."""
    valid = valid_positions(batch, "causal-lm")
    return token_ce(logits, batch)[valid].mean()


def token_ce(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    targets = batch["input_ids"][:, 1:]
    lg = logits[:, :-1].float()
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets.reshape(-1), reduction="none").view_as(targets)


@contextlib.contextmanager
def tap_outputs(layers: Iterable[MiniLayer], store: dict) -> Iterator[dict]:
    """Record every layer's output in `store` (by module name) during the forwards inside the block."""
    handles = [layer.register_forward_hook(_recorder(store, layer.name)) for layer in layers]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _recorder(store: dict, name: str):
    def hook(_module, _inputs, output):
        store[name] = output
    return hook


def layer_matching_loss(student: dict, teacher: dict) -> torch.Tensor:
    """Mean over layers of each adapted module's output relative MSE to the teacher's."""
    losses = [(student[n].float() - teacher[n].float()).pow(2).mean() / teacher[n].float().pow(2).mean()
              .clamp_min(1e-12) for n in teacher]
    return torch.stack(losses).mean()


@dataclass
class FidelityStats:
    """Running sums for held-out fidelity; `summary()` turns them into the reported numbers."""

    task: str
    tokens: int = 0
    sums: dict = field(default_factory=lambda: {k: 0.0 for k in (
        "loss_base", "loss_teacher", "loss_student", "kl_base", "kl_student", "agree_base", "agree_student",
        "mse_base", "mse_student", "teacher_sq")})

    def add_causal(self, batch: dict, base: torch.Tensor | None, teacher: torch.Tensor, student: torch.Tensor):
        valid = valid_positions(batch, "causal-lm")
        t_top = teacher[:, :-1].argmax(-1)
        self.tokens += int(valid.sum())
        self.sums["loss_teacher"] += float(token_ce(teacher, batch)[valid].sum())
        for role, logits in (("base", base), ("student", student)):
            if logits is None:
                continue
            self.sums[f"loss_{role}"] += float(token_ce(logits, batch)[valid].sum())
            self.sums[f"kl_{role}"] += float(kl_per_token(teacher[:, :-1], logits[:, :-1])[valid].sum())
            self.sums[f"agree_{role}"] += float((logits[:, :-1].argmax(-1) == t_top)[valid].sum())

    def add_hidden(self, batch: dict, base: torch.Tensor | None, teacher: torch.Tensor, student: torch.Tensor):
        valid = valid_positions(batch, "hidden")
        t = teacher.float()[valid]
        self.tokens += int(valid.sum())
        self.sums["teacher_sq"] += float(t.pow(2).sum())
        for role, h in (("base", base), ("student", student)):
            if h is not None:
                self.sums[f"mse_{role}"] += float((h.float()[valid] - t).pow(2).sum())

    def summary(self, reference: dict | None = None) -> dict:
        """Per-token averages; base numbers come from `reference` when the base was not run again."""
        n, s = max(self.tokens, 1), self.sums
        keys = (("loss_base", "loss_teacher", "loss_student", "kl_base", "kl_student", "agree_base",
                 "agree_student") if self.task == "causal-lm" else ("mse_base", "mse_student"))
        out = {k: s[k] / n for k in keys}
        if reference:
            out.update({k: v for k, v in reference.items() if k.endswith("_base")})
        if self.task == "causal-lm":
            gain = out["loss_base"] - out["loss_teacher"]
            out["retained"] = (out["loss_base"] - out["loss_student"]) / gain if gain else float("nan")
        else:
            # The share of the teacher's shift away from the base that the student reproduces.
            out["retained"] = 1.0 - out["mse_student"] / out["mse_base"] if out["mse_base"] else float("nan")
            out["rel_mse_student"] = s["mse_student"] / s["teacher_sq"] if s["teacher_sq"] else float("nan")
        out["tokens"] = self.tokens
        return out
