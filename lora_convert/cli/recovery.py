"""Recovery commands: recover, eval, train.

They need the training extras: pip install 'lora_convert[train]'. Under several GPUs run them
with ``accelerate launch -m lora_convert.cli recover ...``; one process is the default.
"""
from __future__ import annotations

import json

import click

from ..errors import BadInputError
from .options import parse_bits, parse_outer_dim, refuse_to_replace_input


def _model_options(f):
    opts = [
        click.option("--base", default=None, help="Base model: local directory, GGUF file, or Hub id "
                                                  "(default: base_model_name_or_path in the adapter)."),
        click.option("--gguf-file", default=None, help="GGUF file name inside --base."),
        click.option("--revision", default=None, help="Hub revision of the base model."),
        click.option("--offline", is_flag=True, help="Never download (also: HF_HUB_OFFLINE=1)."),
        click.option("--task", type=click.Choice(["auto", "causal-lm", "hidden", "seq-cls"]), default="auto",
                     show_default=True, help="causal-lm: KL on next tokens; hidden: last-hidden-state MSE; "
                                             "seq-cls (train only, labelled data): a classifier."),
        click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True),
        click.option("--model-dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                     show_default=True, help="Base weights (auto: bf16 on CUDA, fp32 on CPU)."),
        click.option("--max-len", type=int, default=256, show_default=True, help="Tokens per sequence."),
        click.option("--batch-size", type=int, default=4, show_default=True, help="Sequences per micro-batch."),
        click.option("--max-eval-sequences", type=int, default=None, help="Cap on held-out sequences."),
        click.option("--json", "as_json", is_flag=True, help="Print the results as JSON."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _train_options(f):
    opts = [
        click.option("--data", default=None,
                     help="Training text: .txt (lines or paragraphs) or .jsonl (\"text\"; train also takes "
                          "\"messages\", \"prompt\"/\"completion\" or \"text\"/\"label\" rows). "
                          "Required, except by recover with --generate."),
        click.option("--eval-data", default=None, help="Held-out text (default: the last --eval-fraction of --data)."),
        click.option("--eval-fraction", type=float, default=0.1, show_default=True),
        click.option("--steps", type=int, default=200, show_default=True, help="Optimizer steps."),
        click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per step."),
        click.option("--lr", type=float, default=None,
                     help="Peak learning rate (AdamW; default 1e-2 for recover; for train 1e-2 to 3e-2 by "
                          "outer size, smaller outers higher)."),
        click.option("--schedule", type=click.Choice(["cosine", "linear", "constant"]), default="cosine",
                     show_default=True),
        click.option("--warmup-steps", type=int, default=None, help="Default: 5% of --steps."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Data order (train: also the random outers and inner init)."),
        click.option("--checkpoint-every", type=int, default=0, show_default=True,
                     help="Save a checkpoint every N steps (0: only at the end)."),
        click.option("--checkpoint-dir", default=None, help="Default: OUTPUT.checkpoints"),
        click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --checkpoint-dir."),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _model_opts(kw):
    from ..recovery.run import ModelOptions

    return ModelOptions(base=kw["base"], gguf_file=kw["gguf_file"], revision=kw["revision"], offline=kw["offline"],
                        task=kw["task"], device=kw["device"], dtype=kw["model_dtype"])


def _data_opts(kw, data=None):
    from ..recovery.run import DataOptions

    return DataOptions(data=data or kw["data"], eval_data=kw.get("eval_data"),
                       eval_fraction=kw.get("eval_fraction", 0.1), max_len=kw["max_len"],
                       max_eval_sequences=kw["max_eval_sequences"], generate=kw.get("generate") or 0)


def _train_opts(kw, default_lr: float):
    from ..recovery.loop import TrainOptions

    return TrainOptions(steps=kw["steps"], batch_size=kw["batch_size"], grad_accum=kw["grad_accum"],
                        lr=kw["lr"] or default_lr, warmup_steps=kw["warmup_steps"], schedule=kw["schedule"],
                        seed=kw["seed"], checkpoint_every=kw["checkpoint_every"],
                        checkpoint_dir=kw["checkpoint_dir"], resume=kw["resume"], progress=not kw["no_progress"],
                        eval_every=kw.get("eval_every") or 0, early_stopping=kw.get("early_stopping") or 0,
                        keep_best=not kw.get("last", False))


def _no_seq_cls(kw) -> None:
    if kw["task"] == "seq-cls":
        raise click.UsageError("--task seq-cls is for train (labelled data)")


def _require_training_extras() -> None:
    try:
        import accelerate  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise BadInputError(f"{exc.name} is not installed; pip install 'lora_convert[train]'") from None


def _training_summary(result) -> dict:
    t = result.training
    return {"steps": t.steps, "resumed_at": t.start_step, "lr": t.lr, "seconds": round(t.seconds, 2), "tokens": t.tokens,
            "tokens_per_second": round(t.tokens_per_second, 1), "final_loss": t.losses[-1] if t.losses else None}


def _echo_result(result, as_json: bool) -> None:
    if not result.main_process:
        return
    doc = {"output": result.output, "before": result.before, "after": result.after,
           "training": _training_summary(result)}
    if result.unrounded is not None:  # recover
        t = result.qat
        doc |= {"unrounded": result.unrounded, "stored": result.stored, "nearest": result.nearest,
                "feedback": result.feedback, "kept_start": result.kept_start,
                "qat": None if t is None else {"steps": t.steps, "seconds": round(t.seconds, 2),
                                               "final_loss": t.losses[-1] if t.losses else None},
                "bytes": {"start": result.start_bytes, "written": result.written_bytes}}
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    t = doc["training"]
    size = ""
    if doc.get("bytes") and doc["bytes"]["written"] is not None:
        b = doc["bytes"]
        size = f" ({b['written']:,} B" + (f"; the input: {b['start']:,} B)" if b["start"] is not None else ")")
    click.echo(f"trained {t['steps'] - t['resumed_at']} steps in {t['seconds']:.1f} s "
               f"({t['tokens_per_second']:,.0f} tokens/s); wrote {result.output}{size}")


@click.command()
@click.argument("mini")
@click.option("--teacher", required=True, help="The original LoRA adapter (PEFT directory) to match.")
@click.option("-o", "--output", required=True, help="Output LoRA-Mini directory (or .safetensors file).")
@click.option("--layer-weight", type=float, default=0.0, show_default=True,
              help="Weight of per-layer output matching added to the output loss.")
@click.option("--bits", default=None, callback=lambda ctx, param, value: parse_bits(value),
              help="Store every module at this width (2, 3, 4, 8, nf4, or 16 for float16) instead of the file's own "
                   "precision; without it the output keeps each module's storage and is no larger than the input.")
@click.option("--qat-steps", type=int, default=20, show_default=True,
              help="Quantization-aware steps after the float phase, run only when rounding the trained factors "
                   "to the file's storage loses effect on the held-out data (0: never).")
@click.option("--generate", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also train on this many sequences of --max-len tokens sampled from the teacher and the base "
                   "model, half each (seeded by --seed): broader text than one data file, or no file at all.")
@_train_options
@_model_options
def recover(mini, teacher, output, layer_weight, bits, qat_steps, **kw):
    """Re-fit a LoRA-Mini file's inner matrices to match the original adapter on unlabelled text.

    \b
    lora-convert recover ./mini --base ./base-model --teacher ./my-adapter --data calib.txt -o ./mini-recovered
    lora-convert recover ./mini --base ./base-model --teacher ./my-adapter --generate 256 -o ./mini-recovered
    """
    for source in (mini, teacher):
        refuse_to_replace_input(source, output)
    _no_seq_cls(kw)
    _require_training_extras()
    from ..recovery.run import recover as run

    log = None if kw["as_json"] else click.echo
    result = run(mini, teacher, output, _data_opts(kw), _model_opts(kw), _train_opts(kw, 1e-2), layer_weight, log=log,
                 bits=bits, qat_steps=qat_steps)
    _echo_result(result, kw["as_json"])


@click.command("eval")
@click.argument("mini")
@click.option("--teacher", required=True, help="The original LoRA adapter (PEFT directory).")
@click.option("--data", required=True, help="Held-out text: .txt or .jsonl; all of it is evaluated.")
@_model_options
def eval_(mini, teacher, data, **kw):
    """KL, top-1 agreement and loss of base / teacher / LoRA-Mini on held-out text."""
    _no_seq_cls(kw)
    _require_training_extras()
    from ..recovery.run import evaluate_files, format_eval

    summary = evaluate_files(mini, teacher, _data_opts(kw, data), _model_opts(kw), kw["batch_size"])
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under torchrun / accelerate launch every rank gets here
        return
    click.echo(json.dumps(summary, indent=2) if kw["as_json"] else format_eval(summary, f"{mini} vs {teacher}"))


@click.command()
@click.option("-o", "--output", required=True, help="Output LoRA-Mini directory (or .safetensors file).")
@click.option("--target-modules", default=None,
              help="Comma-separated module names, or all-linear (default: PEFT's default for the model type).")
@click.option("--rank", type=int, default=8, show_default=True, help="LoRA rank r (inner rank k = r, capped by a, b).")
@click.option("--alpha", type=float, default=8.0, show_default=True, help="lora_alpha (scale = alpha / r).")
@click.option("--outer", type=click.Choice(["select", "random"]), default="select", show_default=True,
              help="Outers regenerated from --seed: select, a subset of each layer's own coordinates (kept more "
                   "of LoRA's gain at equal trainable parameters); random, dense random matrices (the paper's).")
@click.option("--outer-dim", default=None, help="Outer sizes a[,b] (default 64, capped by each module).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Storage dtype of the inner matrices.")
@click.option("--eval-every", type=int, default=0, show_default=True,
              help="Evaluate the held-out loss every N steps (0: only before and after); the best state is "
                   "exported.")
@click.option("--early-stopping", type=int, default=0, show_default=True,
              help="Stop after N evaluations without a better held-out loss (0: never).")
@click.option("--last", is_flag=True, help="With --eval-every: export the last state, not the best.")
@_train_options
@_model_options
def train(output, target_modules, rank, alpha, outer, outer_dim, dtype, **kw):
    """Train a LoRA-Mini adapter from scratch, outers regenerated from --seed.

    \b
    Text or chat/instruction JSONL trains a causal LM (chat: rendered with the tokenizer's chat
    template, loss on the assistant's tokens); {"text", "label"} JSONL trains a classifier.
    """
    _require_training_extras()
    from ..recovery.run import train as run

    if not kw["base"]:
        raise click.UsageError("train needs --base (the model to train the adapter for)")
    if not kw["data"]:
        raise click.UsageError("train needs --data (the text to train on)")
    targets = [t.strip() for t in target_modules.split(",") if t.strip()] if target_modules else None
    from ..recovery.scratch import default_lr

    log = None if kw["as_json"] else click.echo
    dims = parse_outer_dim(outer_dim)
    result = run(output, _data_opts(kw), _model_opts(kw), _train_opts(kw, default_lr(dims)), target_modules=targets,
                 rank=rank, alpha=alpha, outer_dim=dims, outer_seed=kw["seed"], dtype=dtype, outer=outer, log=log)
    _echo_result(result, kw["as_json"])


COMMANDS = [recover, eval_, train]
