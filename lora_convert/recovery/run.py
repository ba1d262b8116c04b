"""Recovery fine-tuning, held-out evaluation, and from-scratch training of LoRA-Mini adapters.

recover: the closed-form inners keep only a few percent of a trained LoRA's energy when the
    outers are random and small, so the student (base + LoRA-Mini) is trained to match the
    teacher (base + the original LoRA) on unlabelled text: KL of next-token distributions for
    causal LMs, relative MSE of the last hidden state otherwise, optionally plus per-layer
    output matching. Only the inner matrices X, Y train; the outers stay as the file defines
    them, so the result is written back with the same seeds and fingerprints.
evaluate: KL, top-1 agreement and loss of base / teacher / student on held-out text, the share
    of the teacher's effect the student keeps (1 − KL(teacher‖student)/KL(teacher‖base)) and the
    share of its loss improvement (meaningless when the teacher raises the loss).
train: the LoRA-Mini paper's method: random outers from --seed, inners trained from scratch
    on task text with the causal-LM loss, written in the same file format.

One model copy serves as base, teacher and student (see recovery.layers). Devices, bf16 autocast
on CUDA, gradient accumulation and multi-GPU data parallelism come from accelerate, so
``accelerate launch -m lora_convert.cli recover ...`` runs the same code on several GPUs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import container, quant
from ..adapter import Adapter
from ..container import MiniAdapter
from ..containerspec import resolve_file
from ..errors import BadInputError, OverBudgetError
from . import data as D
from .export import export_inner
from .inject import inject
from .layers import MiniLayer, rounded, use_mode
from .qat import lossless
from .rounding import feedback_round_all, input_stats
from .sample import SAMPLES_FILE, cached_samples, sample_sequences
from .loop import TrainOptions, TrainResult, make_accelerator, train_inner
from .models import ModelSource, load_model, model_dtype, pick_device
from .objectives import (FidelityStats, distill_loss, layer_matching_loss, lm_loss, model_output, tap_outputs,
                         token_ce)


@dataclass
class ModelOptions:
    base: str | None = None  # default: base_model_name_or_path recorded in the adapter
    gguf_file: str | None = None
    revision: str | None = None
    offline: bool = False
    task: str = "auto"  # auto | causal-lm | hidden
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # base weights: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16


@dataclass
class DataOptions:
    data: str | None  # recover: None when all its training text is sampled (`generate`)
    eval_data: str | None = None  # default: hold out the last eval_fraction of `data`
    eval_fraction: float = 0.1
    max_len: int = 256
    max_eval_sequences: int | None = None
    generate: int = 0  # recover: also train on this many sequences sampled from the teacher and the base


@dataclass
class Session:
    """A loaded model with LoRA-Mini layers injected, ready to train or evaluate."""

    accelerator: object
    model: torch.nn.Module
    tokenizer: object
    task: str
    layers: dict[str, MiniLayer]
    base: str

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


@dataclass
class RunResult:
    before: dict
    after: dict
    training: TrainResult
    output: str
    report: object = None
    main_process: bool = True  # False on the other ranks of a multi-process run (they print nothing)
    unrounded: dict | None = None  # recover: after the float phase, before rounding to the file's storage
    stored: dict | None = None  # recover: after the float phase, rounded as the file stores it (the better rounding)
    nearest: dict | None = None  # recover: after the float phase, each factor rounded to nearest
    feedback: dict | None = None  # recover: after the float phase, rounded with error feedback (when it ran)
    qat: TrainResult | None = None  # recover: the quantization-aware phase, when it ran
    kept_start: bool = False  # recover: the start file's factors were written (recovery did not improve them)
    start_bytes: int | None = None  # recover: the start file's size in the output's layout (the size bound)
    written_bytes: int | None = None  # recover: the output's size (main process)


# ------------------------------------------------------------------ setup

def open_session(mini: MiniAdapter, teacher: Adapter | None, mopts: ModelOptions, grad_accum: int = 1) -> Session:
    base = mopts.base or mini.source_config.get("base_model_name_or_path")
    if not base:
        raise BadInputError("no base model given and the adapter does not record base_model_name_or_path; "
                            "pass --base")
    device = pick_device(mopts.device)
    accelerator = make_accelerator(device, grad_accum)
    src = ModelSource.parse(base, mopts.gguf_file, mopts.revision, mopts.offline)
    model, tokenizer, task = load_model(src, mopts.task, model_dtype(device, mopts.dtype))
    layers = inject(model, mini, teacher)
    model = accelerator.prepare(model)
    return Session(accelerator, model, tokenizer, task, layers, base)


def read_data(dopts: DataOptions) -> tuple[list[str] | None, list[str] | None]:
    """The texts (and held-out texts, if a file is given), read before any model is loaded so bad
    data fails fast."""
    if type(dopts.generate) is not int or dopts.generate < 0:
        raise BadInputError(f"--generate must be a non-negative integer, got {dopts.generate!r}")
    if dopts.data is None and not dopts.generate:
        raise BadInputError("no training text: give --data, --generate N, or both")
    return (D.read_texts(dopts.data) if dopts.data is not None else None,
            D.read_texts(dopts.eval_data) if dopts.eval_data else None)


def load_sequences(session: Session, dopts: DataOptions, texts, seed: int = 0, cache_dir: str | None = None,
                   models: dict | None = None) -> tuple[list, list]:
    """(training sequences, held-out sequences), tokenized; causal LMs pack text into full blocks.
    `dopts.generate` sequences sampled from the teacher and the base (sample.py) join the training
    sequences; the held-out ones come from them only when there is no text of the user's. Samples
    are kept in `cache_dir` (the checkpoint directory) for a later run with the same `models`
    (sample_identity) and settings."""
    pack = session.task == "causal-lm"
    train_texts, eval_texts = texts
    seqs = D.tokenize(session.tokenizer, train_texts, dopts.max_len, pack) if train_texts is not None else []
    held = D.tokenize(session.tokenizer, eval_texts, dopts.max_len, pack) if eval_texts is not None else None
    if held is None and seqs:
        seqs, held = D.split_holdout(seqs, dopts.eval_fraction)
    if dopts.generate:
        if session.task != "causal-lm":
            raise BadInputError(f"--generate samples text from a causal language model; this base is a "
                                f"{session.task} model: give --data")
        raw = session.accelerator.unwrap_model(session.model)

        def sample():
            return sample_sequences(raw, session.tokenizer, list(session.layers.values()), dopts.generate,
                                    dopts.max_len, seed)

        identity = (models or {}) | {"n": dopts.generate, "length": dopts.max_len, "seed": seed}
        sampled = cached_samples(cache_dir if models else None, identity, (dopts.generate, dopts.max_len),
                                 raw.get_input_embeddings().num_embeddings, sample, session.accelerator.is_main_process)
        if held is None:
            sampled, held = D.split_holdout(sampled, dopts.eval_fraction, shuffle=True)  # both sources held out
        seqs = seqs + sampled
    if not seqs or not held:
        raise BadInputError("not enough text for training and evaluation after tokenization", dopts.data)
    return seqs, held[:dopts.max_eval_sequences] if dopts.max_eval_sequences else held


def file_digest(path: str | os.PathLike) -> str:
    """Identity of an input for the resume check: SHA-256 of a file; names and sizes of a directory's
    files (an adapter directory can be large, and a changed adapter changes its file sizes or names
    in practice; the LoRA-Mini file and the data are always hashed in full)."""
    p = Path(path)
    if p.is_dir():
        return ";".join(f"{f.name}:{f.stat().st_size}" for f in sorted(p.iterdir()) if f.is_file())
    return _hash_file(hashlib.sha256(), p).hexdigest()


SAMPLES_FORMAT = 1  # bumped when sampling changes what it draws for the same models and seed


def sample_identity(teacher: Adapter, session: Session, mopts: ModelOptions) -> dict:
    """What decides the sequences sampled from a teacher and its base, beside count, length and
    seed: the teacher's bytes; the base (a local directory by absolute path and its files' names,
    sizes and modification times; a Hub id with its revision; a GGUF file), its weights' dtype and
    the device type (sampling draws differ between CPU and CUDA)."""
    base = Path(session.base)
    if base.exists():
        files = sorted(q for q in base.iterdir() if q.is_file()) if base.is_dir() else [base]
        where = [str(base.resolve())] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    else:
        where = [session.base, mopts.revision]
    raw = session.accelerator.unwrap_model(session.model)
    return {"format": SAMPLES_FORMAT, "teacher": content_digest(teacher.source), "base": where,
            "gguf_file": mopts.gguf_file, "dtype": str(next(raw.parameters()).dtype),
            "device": session.accelerator.device.type}


def content_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, or of a directory's files (names and bytes): what decides
    whether sequences sampled from a teacher may be reused."""
    p = Path(path)
    h = hashlib.sha256()
    for f in sorted(q for q in p.iterdir() if q.is_file()) if p.is_dir() else [p]:
        h.update(f.name.encode() + b"\0")
        _hash_file(h, f)
    return h.hexdigest()


def _hash_file(h, path: Path):
    """`h` updated with the file's bytes, read in 1 MiB chunks."""
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h


# ------------------------------------------------------------------ evaluation

@torch.no_grad()
def evaluate(session: Session, seqs: list, batch_size: int = 8, reference: dict | None = None) -> dict:
    """Held-out fidelity of the student against the teacher (and the base, unless `reference`
    already holds the base's numbers for the same data). Batches are split across processes."""
    acc, task = session.accelerator, session.task
    stats = FidelityStats(task)
    raw = acc.unwrap_model(session.model)
    batches = D.eval_batches(seqs, batch_size, session.pad_id)
    for batch in batches[acc.process_index::acc.num_processes]:
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        outs = {}
        for mode in ("teacher", "student") + (() if reference else ("base",)):
            with use_mode(session.layers.values(), mode), acc.autocast():
                outs[mode] = model_output(raw(**batch), task)
        add = stats.add_causal if task == "causal-lm" else stats.add_hidden
        add(batch, outs.get("base"), outs["teacher"], outs["student"])
    _reduce_stats(acc, stats)
    return with_effect_kept(stats.summary(reference))


def with_effect_kept(summary: dict) -> dict:
    """`summary` plus effect_kept: the share of the teacher's change of the outputs that the student
    reproduces, 1 − KL(teacher‖student) / KL(teacher‖base) (hidden-state models: 1 − MSE ratio, the
    same share). Unlike `retained` (the share of the loss improvement) it stays meaningful when the
    teacher raises the held-out loss, as an over-fitted adapter does; `teacher_raises_loss` says so."""
    out = dict(summary)
    if "kl_base" in out:
        out["effect_kept"] = 1.0 - out["kl_student"] / out["kl_base"] if out["kl_base"] > 0 else float("nan")
        out["teacher_raises_loss"] = bool(out["loss_teacher"] >= out["loss_base"])
    else:
        out["effect_kept"] = out["retained"]
    return out


def _reduce_stats(acc, stats: FidelityStats) -> None:
    if acc.num_processes == 1:
        return
    keys = sorted(stats.sums)
    t = torch.tensor([stats.sums[k] for k in keys] + [stats.tokens], dtype=torch.float64, device=acc.device)
    t = acc.reduce(t, reduction="sum")
    stats.sums = dict(zip(keys, t[:-1].tolist()))
    stats.tokens = int(t[-1])


@torch.no_grad()
def heldout_loss(session: Session, seqs: list, mode: str, batch_size: int = 8) -> float:
    """Mean next-token loss of the model in `mode` ("base" or "student") on held-out sequences."""
    acc, raw = session.accelerator, session.accelerator.unwrap_model(session.model)
    total, count = torch.zeros((), dtype=torch.float64, device=acc.device), 0
    for batch in D.eval_batches(seqs, batch_size, session.pad_id)[acc.process_index::acc.num_processes]:
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        with use_mode(session.layers.values(), mode), acc.autocast():
            logits = raw(**batch).logits
        n = int(batch["attention_mask"][:, 1:].sum())
        total += lm_loss(logits, batch).double() * n
        count += n
    sums = acc.reduce(torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=acc.device)]),
                      reduction="sum")
    return float(sums[0] / sums[1].clamp_min(1))


def format_eval(s: dict, title: str) -> str:
    """The evaluation as a small table (causal LMs) or relative errors (hidden-state models)."""
    if "loss_base" not in s:
        return (f"{title} ({s['tokens']:,} tokens): hidden-state MSE to the teacher: base {s['mse_base']:.4g}, "
                f"student {s['mse_student']:.4g}; the student keeps {100 * s['retained']:.1f}% of the teacher's "
                "shift from the base")
    lines = [f"{title} ({s['tokens']:,} held-out tokens)",
             f"  {'':<8} {'loss':>8} {'KL(teacher||.)':>15} {'top-1 agree':>12}",
             f"  {'base':<8} {s['loss_base']:>8.4f} {s['kl_base']:>15.4f} {100 * s['agree_base']:>11.1f}%",
             f"  {'teacher':<8} {s['loss_teacher']:>8.4f} {0.0:>15.4f} {100.0:>11.1f}%",
             f"  {'student':<8} {s['loss_student']:>8.4f} {s['kl_student']:>15.4f} {100 * s['agree_student']:>11.1f}%"]
    if "effect_kept" in s:
        lines.append(f"  the student keeps {100 * s['effect_kept']:.1f}% of the teacher's effect "
                     "(effect kept = 1 - KL(teacher||student) / KL(teacher||base))")
    if s["loss_teacher"] >= s["loss_base"]:
        lines.append(f"  the teacher raises the held-out loss ({s['loss_base']:.4f} -> {s['loss_teacher']:.4f}): the share "
                     "of its loss improvement is meaningless here; judge by the effect kept")
    else:
        lines.append(f"  the student keeps {100 * s['retained']:.1f}% of the teacher's loss improvement "
                     f"(loss {s['loss_base']:.4f} -> {s['loss_teacher']:.4f})")
    return "\n".join(lines)


# ------------------------------------------------------------------ recover

QAT_STEPS = 20  # default length of the quantization-aware phase (--qat-steps)
# Effect kept (a share, 0.001 = 0.1 points) that rounding the trained factors to the file's
# storage may lose before the quantization-aware phase runs.
QAT_MIN_LOSS = 0.001


def recover(mini_path: str, teacher_path: str, output: str, dopts: DataOptions, mopts: ModelOptions,
            topts: TrainOptions, layer_weight: float = 0.0, log=print, *, bits: int | str | None = None,
            qat_steps: int = QAT_STEPS) -> RunResult:
    """Re-fit the LoRA-Mini file at `mini_path` against the teacher adapter; write `output`.

    The output keeps every module's storage (quant spec or float dtype; `bits` re-quantizes all
    modules to that width) and so its data bytes; without `bits` it is no larger than the start
    file (export_inner's max_bytes). After the float phase the factors are evaluated as the file
    will store them; when rounding loses more than QAT_MIN_LOSS of the effect kept, `qat_steps`
    steps of quantization-aware training follow, and the better rounded state is kept. If the
    result is worse on the held-out data than the start file (rounded likewise), the start file's
    factors are written instead.
    """
    from ..api import load_adapter

    if bits is not None:
        try:
            quant.check_bits(bits)
        except ValueError as exc:
            raise BadInputError(f"--{exc}") from None
    if type(qat_steps) is not int or qat_steps < 0:
        raise BadInputError(f"--qat-steps must be a non-negative integer, got {qat_steps!r}")
    if not (type(layer_weight) in (int, float) and math.isfinite(layer_weight) and layer_weight >= 0):
        raise BadInputError(f"--layer-weight must be a finite number >= 0, got {layer_weight!r}")
    mini, teacher, texts = container.load(mini_path), load_adapter(teacher_path), read_data(dopts)
    topts.checkpoint_dir = topts.checkpoint_dir or default_checkpoint_dir(output)
    topts.validate()
    session = open_session(mini, teacher, mopts, topts.grad_accum)
    layers = list(session.layers.values())
    start_storage = [dict(layer.storage) for layer in layers]
    if bits is not None:
        set_storage_bits(layers, bits)
    same_storage = start_storage == [layer.storage for layer in layers]
    if dopts.generate:
        cache = Path(topts.checkpoint_dir) / SAMPLES_FILE
        _log(session, log, f"sampling {dopts.generate} sequences of {dopts.max_len} tokens from the teacher and "
                           f"the base model (--generate; kept in {cache} for a --resume, and read from it if an "
                           "earlier run of this teacher and these settings wrote it)")
    t0 = time.perf_counter()
    seqs, held = load_sequences(session, dopts, texts, topts.seed, topts.checkpoint_dir,
                                sample_identity(teacher, session, mopts) if dopts.generate else None)
    if dopts.generate:
        _log(session, log, f"sequences ready in {time.perf_counter() - t0:.0f} s")
    start = param_values(layers)
    with rounded(layers):  # the start file as it is stored (with --bits: as it would be stored at that width)
        before = evaluate(session, held, topts.batch_size)
    _log(session, log, format_eval(before, "before recovery" if same_storage else
                                   f"before recovery (the start file rounded to {quant.width_name(bits)})"))
    run = {"mini": file_digest(resolve_file(mini_path)), "teacher": file_digest(teacher.source),
           "data": file_digest(dopts.data) if dopts.data is not None else None, "generate": dopts.generate,
           "base": session.base, "max_len": dopts.max_len, "task": session.task, "layer_weight": layer_weight,
           "bits": bits}
    step_loss = distill_step(session, layer_weight)
    training = train_inner(session.accelerator, session.model, session.layers, seqs, session.pad_id, step_loss,
                           topts, run)
    unrounded = evaluate(session, held, topts.batch_size, reference=before)
    stored, qat, nearest, fed = unrounded, None, None, None  # the float phase's result as the file stores it
    if not all(lossless(layer.storage) for layer in layers):
        with rounded(layers):
            nearest = evaluate(session, held, topts.batch_size, reference=before)
        _log(session, log, f"rounding the trained factors to the file's storage: effect kept "
                           f"{100 * unrounded['effect_kept']:.2f}% -> {100 * nearest['effect_kept']:.2f}%")
        stored, fed = _feedback_rounding(session, seqs, held, topts, before, nearest, log)
    after = stored
    if qat_steps and unrounded["effect_kept"] - stored["effect_kept"] > QAT_MIN_LOSS:
        qat, quantized, better = _qat_phase(session, seqs, held, step_loss, topts, run, qat_steps, before, stored)
        _log(session, log, f"quantization-aware phase ({qat_steps} steps): effect kept as stored "
                           f"{100 * quantized['effect_kept']:.2f}% ({'kept' if better else 'not better; dropped'})")
        if better:
            after = quantized
    kept_start = not after["effect_kept"] >= before["effect_kept"]  # also when training diverged (NaN)
    if kept_start:
        load_values(layers, start)
        _log(session, log, f"the recovered factors keep less of the effect than the start file "
                           f"({100 * after['effect_kept']:.2f}% < {100 * before['effect_kept']:.2f}% as stored): "
                           "writing the start file's factors")
        after = before
    _log(session, log, format_eval(after, "after recovery (as stored)"))
    budget = layout_bytes(resolve_file(mini_path), output) if same_storage else None
    if kept_start and same_storage:
        report = _save_start(session, mini, output, budget)
    else:
        marks = {} if kept_start else {"recovery_steps": topts.steps + (qat.steps if qat else 0)}
        report = _export(session, mini, output, teacher, marks, budget)
    written = layout_bytes(resolve_file(output), output) if report is not None else None
    if written is not None and budget is not None and written > budget:
        _log(session, log, f"note: the output is {written - budget:,} bytes larger than the start file ({budget:,} B): "
                           "the recovery note in its header did not fit (a file of few modules, or another layout)")
    return RunResult(before, after, training, output, report, session.accelerator.is_main_process, unrounded=unrounded,
                     qat=qat, kept_start=kept_start, start_bytes=budget, written_bytes=written, stored=stored,
                     nearest=nearest, feedback=fed)


FEEDBACK_SEQUENCES = 512  # training sequences the error-feedback rounding's input statistics read


def _feedback_rounding(session: Session, seqs, held, topts: TrainOptions, before: dict, nearest: dict,
                       log) -> tuple[dict, dict | None]:
    """Round the float phase's factors with error feedback on the training text (recovery.rounding)
    and keep that when it beats rounding to nearest (evaluated as `nearest`): (the evaluation as
    stored of the state the layers are left in, the error-feedback rounding's evaluation or None)."""
    layers = list(session.layers.values())
    step = max(1, -(-len(seqs) // FEEDBACK_SEQUENCES))
    trained = param_values(layers)
    try:
        stats = input_stats(session.accelerator.unwrap_model(session.model), session.layers, seqs[::step],
                            topts.batch_size, session.pad_id)
        feedback_round_all(session.layers, stats, session.accelerator)
    except (ValueError, BadInputError, torch.linalg.LinAlgError) as exc:
        # a diverged float phase (factors the file cannot hold), a module the sequences never reach:
        # rounding to nearest stands, and the never-worse check decides as before
        load_values(layers, trained)
        _log(session, log, f"rounding with error feedback skipped: {exc}")
        return nearest, None
    if not stats:
        return nearest, None
    with rounded(layers):
        fed = evaluate(session, held, topts.batch_size, reference=before)
    better = fed["effect_kept"] > nearest["effect_kept"]
    _log(session, log, f"rounding with error feedback on the training text: effect kept as stored "
                       f"{100 * fed['effect_kept']:.2f}% ({'kept' if better else 'not better; dropped'})")
    if not better:
        load_values(layers, trained)
    return (fed if better else nearest), fed


def _qat_phase(session: Session, seqs, held, step_loss, topts: TrainOptions, run: dict, steps: int,
               before: dict, stored: dict) -> tuple[TrainResult, dict, bool]:
    """`steps` steps of quantization-aware training from the float phase's state (the forward sees the
    factors as stored, gradients pass straight through; fresh batches, its own checkpoints): (the
    run, its evaluation as stored, whether that beats `stored`, the float phase's). The float
    phase's state is put back unless it does."""
    layers = list(session.layers.values())
    trained = param_values(layers)
    qopts = dataclasses.replace(topts, steps=steps, seed=topts.seed + 1,
                                checkpoint_dir=str(Path(topts.checkpoint_dir) / "qat"))
    with rounded(layers):
        result = train_inner(session.accelerator, session.model, session.layers, seqs, session.pad_id, step_loss,
                             qopts, run | {"phase": "qat"})
        quantized = evaluate(session, held, topts.batch_size, reference=before)
    better = quantized["effect_kept"] > stored["effect_kept"]
    if not better:
        load_values(layers, trained)
    return result, quantized, better


def set_storage_bits(layers, bits: int | str) -> None:
    """Store every module at `bits` (keeping a quantized module's group, else the default group)."""
    for layer in layers:
        layer.storage = {"bits": bits, "group": layer.storage.get("group", quant.DEFAULT_GROUP)}


def param_values(layers) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.X.detach().clone(), layer.Y.detach().clone()) for layer in layers]


@torch.no_grad()
def load_values(layers, values) -> None:
    for layer, (X, Y) in zip(layers, values):
        layer.X.copy_(X)
        layer.Y.copy_(Y)


def layout_bytes(start_file: Path, output: str) -> int:
    """Bytes of the start file in the output's layout: its safetensors file, plus its summary file
    when both are directories (what container.save writes there)."""
    total = start_file.stat().st_size
    config = start_file.parent / container.CONFIG_NAME
    if start_file.name == container.FILE_NAME and Path(output).suffix != ".safetensors" and config.is_file():
        total += config.stat().st_size
    return total


def distill_step(session: Session, layer_weight: float = 0.0):
    """step_loss(batch) for recovery: teacher forward (no grad), student forward, distillation loss,
    plus `layer_weight` × per-layer output matching."""
    acc, task, layers = session.accelerator, session.task, list(session.layers.values())
    raw = acc.unwrap_model(session.model)
    tapped = layers if layer_weight else []

    def step_loss(batch: dict) -> torch.Tensor:
        t_out, s_out = {}, {}
        with torch.no_grad(), use_mode(layers, "teacher"), tap_outputs(tapped, t_out):
            teacher = model_output(raw(**batch), task)
        with tap_outputs(tapped, s_out):
            student = model_output(session.model(**batch), task)
        loss = distill_loss(student, teacher, batch, task)
        if layer_weight:
            loss = loss + layer_weight * layer_matching_loss(s_out, t_out)
        return loss

    return step_loss


def default_checkpoint_dir(output: str) -> str:
    return str(Path(output)) + ".checkpoints"


def _export(session: Session, mini: MiniAdapter, output: str, teacher: Adapter | None, marks: dict,
            max_bytes: int | None = None):
    """Write the trained inners (main process). `marks` (numbers only, per the format) are added to every
    module's fidelity record so readers can tell a function-space fit from a weight-space one."""
    acc = session.accelerator
    acc.wait_for_everyone()
    report = None
    if acc.is_main_process:
        report = export_inner(session.layers, mini, output, teacher, extra_fidelity=marks, max_bytes=max_bytes)
    acc.wait_for_everyone()
    return report


def _save_start(session: Session, mini: MiniAdapter, output: str, max_bytes: int | None):
    """Write the start file's modules unchanged (main process), without header room to spare."""
    acc = session.accelerator
    acc.wait_for_everyone()
    report = None
    if acc.is_main_process:
        try:
            report = container.save(mini, output, max_bytes=max_bytes)
        except OverBudgetError:
            report = container.save(mini, output)
    acc.wait_for_everyone()
    return report


def _log(session: Session, log, text: str) -> None:
    if log and session.accelerator.is_main_process:
        log(text)


# ------------------------------------------------------------------ eval

def evaluate_files(mini_path: str, teacher_path: str, dopts: DataOptions, mopts: ModelOptions,
                   batch_size: int = 8) -> dict:
    """Held-out fidelity of a LoRA-Mini file against its teacher adapter (all of dopts.data is held out)."""
    from ..api import load_adapter

    mini, teacher, texts = container.load(mini_path), load_adapter(teacher_path), D.read_texts(dopts.data)
    session = open_session(mini, teacher, mopts)
    held = D.tokenize(session.tokenizer, texts, dopts.max_len, pack=session.task == "causal-lm")
    if dopts.max_eval_sequences:
        held = held[:dopts.max_eval_sequences]
    if not held:
        raise BadInputError("no sequences of at least 2 tokens in the data", dopts.data)
    return evaluate(session, held, batch_size)


# ------------------------------------------------------------------ train from scratch

TRAIN_TASKS = ("causal-lm", "seq-cls")
MODEL_INPUTS = ("input_ids", "attention_mask")  # loss_mask / labels stay out of the model's forward


def train(output: str, dopts: DataOptions, mopts: ModelOptions, topts: TrainOptions, *,
          target_modules: list[str] | None = None, rank: int = 8, alpha: float | None = None,
          outer_dim=None, outer_seed: int = 0, dtype: str = "fp32", outer: str = "select", log=print) -> RunResult:
    """Train a LoRA-Mini adapter from scratch (outers regenerated from `outer_seed`: `outer` is
    "select", coordinate subsets, or "random").

    Text and chat/instruction data train a causal LM (next-token loss; on chat data only the
    assistant's tokens count); labelled data ({"text", "label"} JSONL) trains a sequence
    classifier, whose new head trains in full beside the inners. With topts.eval_every the
    held-out loss is tracked and the best state is exported.
    """
    from .scratch import classification_head, load_classifier, scratch_adapter

    topts.checkpoint_dir = topts.checkpoint_dir or default_checkpoint_dir(output)
    topts.validate()
    records = D.read_samples(dopts.data)
    held_records = D.read_samples(dopts.eval_data) if dopts.eval_data else None
    if held_records is not None and held_records.kind != records.kind:
        raise BadInputError(f"held-out data is {held_records.kind} but the training data is {records.kind}",
                            dopts.eval_data)
    task = "seq-cls" if records.kind == "labelled" else "causal-lm"
    if mopts.task not in ("auto", task):
        raise BadInputError(f"{records.kind} data trains a {task} model, not --task {mopts.task}", dopts.data)
    device = pick_device(mopts.device)
    src = ModelSource.parse(mopts.base, mopts.gguf_file, mopts.revision, mopts.offline)
    labels, head = None, None
    if task == "seq-cls":
        labels = D.label_names(records)
        model, tokenizer = load_classifier(src, labels, model_dtype(device, mopts.dtype), outer_seed)
        head = classification_head(model)
    else:
        model, tokenizer, found = load_model(src, "auto" if mopts.task == "auto" else task,
                                             model_dtype(device, mopts.dtype))
        if found != "causal-lm":
            raise BadInputError("text data trains a causal LM, and this model is not one (labelled JSONL "
                                "rows train a classifier)", mopts.base)
    mini = scratch_adapter(model, mopts.base, target_modules, rank, alpha, outer_dim, outer_seed, dtype, head, outer)
    accelerator = make_accelerator(device, topts.grad_accum)
    layers = inject(model, mini)
    extra = dict(head[1]) if head else {}
    for p in extra.values():
        p.requires_grad_(True)
    session = Session(accelerator, accelerator.prepare(model), tokenizer, task, layers, mopts.base)
    seqs, held = train_sequences(tokenizer, dopts, records, held_records, labels)
    bs = topts.batch_size
    before = {f"{k}_base": v for k, v in train_metrics(session, held, "base", bs).items()}
    _log(session, log, "held-out base model: " + _fmt_metrics(before, "_base"))
    run = {"data": file_digest(dopts.data), "eval_data": file_digest(dopts.eval_data) if dopts.eval_data else None,
           "base": mopts.base, "max_len": dopts.max_len, "rank": rank, "alpha": alpha, "outer_dim": outer_dim,
           "outer": outer, "outer_seed": outer_seed, "targets": list(mini.module_names), "task": task, "labels": labels}

    def step_loss(batch: dict) -> torch.Tensor:
        return train_loss(session.model(**{k: batch[k] for k in MODEL_INPUTS}).logits, batch, task)

    def held_out() -> float:
        return train_metrics(session, held, "student", bs)["loss"]

    training = train_inner(accelerator, session.model, layers, seqs, session.pad_id, step_loss, topts, run,
                           evaluate=held_out if topts.eval_every else None, extra_params=extra)
    after = {f"{k}_student": v for k, v in train_metrics(session, held, "student", bs).items()}
    if training.best_step is not None:
        after |= {"best_step": training.best_step, "evals": training.evals}
        if training.stopped_at is not None:
            after["stopped_at"] = training.stopped_at
    _log(session, log, "held-out after training: " + _fmt_metrics(after, "_student")
         + (f" (best of {len(training.evals)} evaluations, step {training.best_step})" if training.evals else ""))
    report = _export(session, mini, output, None, {"train_steps": training.best_step or topts.steps})
    return RunResult(before, after, training, output, report, accelerator.is_main_process)


def train_sequences(tokenizer, dopts: DataOptions, records, held_records, labels) -> tuple[list, list]:
    """(training, held-out) samples. Plain text is packed into full blocks and held out from its end;
    chat and labelled rows are one sample each, held out in a seeded shuffle (so no class or
    source is left out by the file's order)."""
    pack = records.kind == "text"
    seqs = D.tokenize_samples(tokenizer, records, dopts.max_len, pack, labels)
    if held_records is not None:
        held = D.tokenize_samples(tokenizer, held_records, dopts.max_len, pack, labels)
    else:
        seqs, held = D.split_holdout(seqs, dopts.eval_fraction, shuffle=not pack)
    if not seqs or not held:
        raise BadInputError("not enough data for training and evaluation after tokenization", dopts.data)
    return seqs, held[:dopts.max_eval_sequences] if dopts.max_eval_sequences else held


def train_loss(logits: torch.Tensor, batch: dict, task: str, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the class (seq-cls) or of every target token (causal LM: the assistant's tokens
    only when the batch has a loss_mask); `reduction="sum"` for evaluation sums."""
    if task == "seq-cls":
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction=reduction)
    valid = batch["attention_mask"][:, 1:].bool()
    if "loss_mask" in batch:
        valid &= batch["loss_mask"][:, 1:].bool()
    ce = token_ce(logits, batch)[valid]
    return ce.sum() if reduction == "sum" else ce.mean()


@torch.no_grad()
def train_metrics(session: Session, seqs: list, mode: str, batch_size: int = 8) -> dict:
    """Held-out loss (and accuracy for classifiers) of the model in `mode` ("base" or "student")."""
    acc, task = session.accelerator, session.task
    raw = acc.unwrap_model(session.model)
    sums = torch.zeros(3, dtype=torch.float64, device=acc.device)  # loss, targets, correct
    for batch in D.eval_batches(seqs, batch_size, session.pad_id)[acc.process_index::acc.num_processes]:
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        with use_mode(session.layers.values(), mode), acc.autocast():
            logits = raw(**{k: batch[k] for k in MODEL_INPUTS}).logits
        sums[0] += train_loss(logits, batch, task, "sum").double()
        if task == "seq-cls":
            sums[1] += len(batch["labels"])
            sums[2] += (logits.argmax(-1) == batch["labels"]).sum()
        else:
            valid = batch["attention_mask"][:, 1:].bool()
            if "loss_mask" in batch:
                valid &= batch["loss_mask"][:, 1:].bool()
            sums[1] += valid.sum()
    sums = acc.reduce(sums, reduction="sum")
    out = {"loss": float(sums[0] / sums[1].clamp_min(1))}
    if task == "seq-cls":
        out["accuracy"] = float(sums[2] / sums[1].clamp_min(1))
    return out


def _fmt_metrics(m: dict, suffix: str) -> str:
    text = f"loss {m['loss' + suffix]:.4f}"
    if "accuracy" + suffix in m:
        text += f", accuracy {100 * m['accuracy' + suffix]:.1f}%"
    return text
