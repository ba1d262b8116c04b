"""Commands that read and write adapters: inspect, compress, verify, reconstruct, convert."""
from __future__ import annotations

import json

import click

from .. import outer
from .options import (FORMAT_CHOICES, LazyChoice, allow_pickle, emit, input_format, json_flag, parse_bits,
                      parse_outer_dim, parse_widths, progress_bar, refuse_to_replace_input)


def _streams():
    from ..outer.random import STREAMS

    return STREAMS


@click.command()
@click.argument("path")
@input_format
@allow_pickle
@json_flag
def inspect(path, fmt, allow_pickle, as_json):
    """Show what is in an adapter or a LoRA-Mini file.

    Adapters are checked as every command reads them (shapes, ranks, config, NaN/Inf values) from
    their headers and stored bytes, quickly and without torch; LyCORIS LoHa/LoKr modules are
    converted as every command converts them (an SVD, which reports its error); only PEFT pickles
    load torch. LoRA-Mini files are checked as `verify` opens them: checksums, regenerated outers
    and their fingerprints.
    """
    from ..inspect import describe

    doc = describe(path, fmt, allow_pickle)
    text = doc.pop("_text")
    click.echo(json.dumps(doc, indent=2) if as_json else text)


def calibration_options(f):
    """compress's calibration options: text, and the base model as recover takes it."""
    opts = [
        click.option("--calibration", default=None,
                     help="Calibration text (.txt lines or paragraphs, .jsonl \"text\"): fit each module's "
                          "output on it (needs the base model)."),
        click.option("--base", default=None, help="Base model for --calibration: local directory, GGUF file or Hub "
                                                  "id (default: base_model_name_or_path in the adapter)."),
        click.option("--gguf-file", default=None, help="GGUF file name inside --base."),
        click.option("--revision", default=None, help="Hub revision of the base model."),
        click.option("--offline", is_flag=True, help="Never download the base model (also: HF_HUB_OFFLINE=1)."),
        click.option("--calibration-max-len", type=int, default=256, show_default=True,
                     help="Tokens per calibration sequence."),
        click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
                     help="Where the base model runs for --calibration."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def collect_calibration(adapter, cal: dict):
    """Input statistics for compress --calibration, or None without it."""
    if not cal["calibration"]:
        if cal["base"] or cal["gguf_file"]:
            raise click.UsageError("--base is used with --calibration")
        return None
    from ..recovery.calibration import calibration_stats

    return calibration_stats(adapter, cal["calibration"], cal["base"], gguf_file=cal["gguf_file"],
                             revision=cal["revision"], offline=cal["offline"], device=cal["device"],
                             max_len=cal["calibration_max_len"])


@click.command()
@click.argument("path")
@click.option("-o", "--output", default=None, help="Output directory (or a .safetensors file); required unless --plan.")
@click.option("--outer", type=click.Choice(outer.names()), default="random", show_default=True,
              help="random: outers regenerated from a seed (tiny files); svd: the update's own singular "
                   "vectors, stored (near-lossless).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random outers.")
@click.option("--outer-dim", default=None, help="Outer sizes a[,b] for random outers (default 64, "
                                                "capped by each module's dimensions).")
@click.option("--outer-stream", type=LazyChoice(_streams), default="shared", show_default=True,
              help="Random outers: shared: one generator stream per seed, so modules of a shape share U and V "
                   "(fast, VeRA-style); module: each module's own stream, keyed on its name (independent "
                   "outers per layer, as in the LoRA-Mini paper; same file size, slower to compress).")
@click.option("--rank", type=int, default=None,
              help="Inner rank (optimal truncation). With --keep-energy: the smaller of the two ranks.")
@click.option("--keep-energy", type=float, default=None,
              help="Smallest inner rank per module keeping this share of the update's energy, e.g. 0.99. "
                   "Random outers may hold less than that share at any rank: then the module keeps its "
                   "full inner rank, and the report shows what it retains.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True,
              help="Storage dtype of inner (and stored outer) tensors; auto keeps the adapter's.")
@click.option("--bits", default=None,
              help="Store the factors as symmetric integers of this width (2, 3, 4, 8; 16 = float16) or as "
                   "nf4 (4-bit codes into QLoRA's NormalFloat4 levels), with one fp16 scale per group; svd "
                   "outers store the truncated factors themselves. With --target-size / --min-fidelity / --plan: "
                   "the widths the budget chooses among, comma-separated (default 3,nf4,8,16).")
@click.option("--group-size", type=int, default=128, show_default=True, help="Values per quantization scale.")
@click.option("--target-size", default=None,
              help="Budget: a ratio to the input's size (32x) or a size (600KB, 1.5MB). Rank and bits are "
                   "chosen per module to keep the most of the update, each module's relative error weighed by "
                   "its energy^0.75 (with --calibration the same choice, each module fitted to its outputs on "
                   "the calibration text); the file honours it.")
@click.option("--min-fidelity", type=float, default=None,
              help="Smallest file keeping this share of the update's weight-space energy (e.g. 0.95); with "
                   "--calibration, the report's calibrated share: each module's share of its output on the "
                   "calibration text, weighted by its weight-space energy. With --target-size, refuse when the "
                   "budget cannot reach it.")
@click.option("--plan", is_flag=True, help="Print this adapter's predicted size-fidelity curve; write nothing.")
@click.option("--plot", "plot_file", default=None, help="With --plan: draw the curve into this image (matplotlib).")
@input_format
@allow_pickle
@json_flag
@calibration_options
def compress(path, output, outer, seed, outer_dim, outer_stream, rank, keep_energy, dtype, bits, group_size,
             target_size, min_fidelity, plan, plot_file, fmt, allow_pickle, as_json,
             **cal):
    """Compress an adapter into LoRA-Mini form and report its fidelity.

    With --calibration (text) the base model runs over the text once and each module minimises
    its output error on it instead of its weight error (no training).
    """
    from .. import api
    from ..config import CompressConfig, ConfigError, flag
    from ..errors import BadInputError

    if not plan and output is None:
        raise click.UsageError("Missing option '-o' / '--output' (required unless --plan).")
    if plot_file and not plan:
        raise click.UsageError("--plot draws the curve of --plan; add --plan.")
    if output is not None:
        refuse_to_replace_input(path, output)
    widths = {}
    if bits is not None and (target_size is not None or min_fidelity is not None or plan):
        widths, bits = {"allowed_bits": parse_widths(bits)}, None  # the budget's (or the curve's) choices
    elif bits is not None and "," in bits:
        raise BadInputError("--bits: a list of widths is for a budget (--target-size / --min-fidelity / --plan); "
                            "without one give a single width")
    try:
        cfg = CompressConfig(outer=outer, seed=seed, outer_dim=parse_outer_dim(outer_dim), outer_stream=outer_stream,
                             rank=rank, keep_energy=keep_energy, dtype=dtype, bits=parse_bits(bits),
                             group_size=group_size, target_size=target_size, min_fidelity=min_fidelity, **widths)
    except ConfigError as exc:  # the library names parameters; here they are flags
        param = "bits" if exc.param == "allowed_bits" else exc.param
        raise BadInputError(f"{flag(param)}: {exc.detail}") from None
    adapter = api.load_adapter(path, fmt, allow_pickle=allow_pickle)
    stats = collect_calibration(adapter, cal)
    if plan:
        _print_plan(adapter, cfg, as_json, plot_file, stats)
        return
    mini = api.compress(adapter, cfg, output=output, calibration=stats)
    with progress_bar(len(mini), "compressing") as tick:
        report = api.save(mini, output, progress=tick)
    from ..advice import next_steps

    advice = next_steps(cfg, report, calibrated=stats is not None)
    extra = {"output": output, "next_steps": advice}
    if mini.max_bytes is not None:
        extra["budget_bytes"] = mini.max_bytes
    emit(report, as_json, extra)
    if not as_json:
        if mini.max_bytes is not None:
            click.echo(f"budget: {mini.max_bytes:,} B; written: {report.compressed_bytes:,} B")
        if stats and report.calibrated_retained is None:  # a byte budget records no calibrated share
            click.echo("calibrated: each module is fitted to its outputs on the calibration text, not to its weights, "
                       "so the weight-space share above understates it; compare files with `lora-convert eval`")
        for line in advice:
            click.echo(f"next: {line}")


def _print_plan(adapter, cfg, as_json: bool, plot_file: str | None, stats=None) -> None:
    """The predicted size-fidelity curve: the allocator's path from the smallest file up (with
    calibration statistics: the calibrated share)."""
    from ..budget import balance_for, frontier
    from ..convert import calibrated_whitening, plan_curves, source_bytes

    curves, fixed = plan_curves(adapter, cfg.replace(target_size=None, min_fidelity=None) if cfg.budgeted else cfg,
                                whitening=calibrated_whitening(adapter, stats), floor=True)
    points = frontier(curves, fixed, balance=balance_for(cfg.min_fidelity))
    original = source_bytes(adapter.source)
    shown, last = [], None
    for nbytes, fid in points:  # about four points per doubling of the size
        if last is None or nbytes >= last * 2 ** 0.25 or (nbytes, fid) == points[-1]:
            shown.append((nbytes, fid))
            last = nbytes
    if as_json:
        click.echo(json.dumps({"original_bytes": original, "calibrated": bool(stats),
                               "fidelity": "calibrated share" if stats else "weight-space energy", "points": [
            {"bytes": b, "fidelity": f, "ratio": original / b if original else None} for b, f in shown]}, indent=2))
    else:
        click.echo(f"predicted size-fidelity curve ({cfg.outer} outers; bits {', '.join(map(str, cfg.allowed_bits))}; "
                   f"input {original:,} B)" if original else "predicted size-fidelity curve")
        if stats:
            click.echo("fidelity: calibrated share (module outputs on the calibration text), the path --min-fidelity "
                       "takes; --target-size alone allocates by weight-space error and fits each choice to outputs")
        click.echo(f"{'bytes':>12} {'smaller':>8} {'fidelity':>9}")
        for b, f in shown:
            click.echo(f"{b:>12,} {(f'{original / b:.1f}x' if original else '-'):>8} {100 * f:>8.2f}%")
    if plot_file:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            from ..errors import BadInputError
            raise BadInputError("--plot needs matplotlib (pip install 'lora_convert[plot]')") from None
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([b for b, _ in points], [100 * f for _, f in points])
        ax.set_xscale("log")
        ax.set_xlabel("file size (bytes)")
        ax.set_ylabel("calibrated share kept (%)" if stats else "weight-space energy kept (%)")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(plot_file)
        plt.close(fig)


@click.command()
@click.argument("path")
@click.option("--against", default=None, help="Original adapter to measure the error against.")
@input_format
@allow_pickle
@json_flag
def verify(path, against, fmt, allow_pickle, as_json):
    """Regenerate outers, check every fingerprint and checksum, report the error."""
    from .. import api
    from ..hub import local_path

    path = local_path(path, expect="lora-mini")  # an hf:// input is fetched (and checked) once
    n = len(api.load(path))
    with progress_bar(n, "verifying") as tick:
        report = api.verify(path, against, fmt=fmt, allow_pickle=allow_pickle, progress=tick)
    emit(report, as_json, {"verified": True})
    if not as_json:
        click.echo("integrity: OK (all outer fingerprints and tensor checksums match)")


@click.command()
@click.argument("path")
@click.option("-o", "--output", required=True, help="Output directory or file.")
@click.option("--to", "to", type=click.Choice(FORMAT_CHOICES), default=None,
              help="Output layout (default: the layout the adapter was compressed from).")
@click.option("--trim-rank", is_flag=True,
              help="Write the inner rank instead of zero-padding back to the original rank "
                   "(alpha is kept; the scale ratio is folded into lora_B, so clients that divide one "
                   "lora_alpha by each module's rank, like llama.cpp, read it right).")
@click.option("--one-alpha", is_flag=True,
              help="One plain lora_alpha for every module (no alpha_pattern, no rsLoRA; ratios folded into "
                   "lora_B): for llama.cpp and vLLM, which read a single lora_alpha.")
def reconstruct(path, output, to, trim_rank, one_alpha):
    """Turn a LoRA-Mini file back into a standard adapter with the original scale."""
    from .. import api

    refuse_to_replace_input(path, output)
    mini = api.load(path)
    adapter = api.reconstruct(mini, trim_rank=trim_rank, one_alpha=one_alpha)
    api.save_adapter(adapter, output, to)
    click.echo(f"wrote {to or adapter.format} adapter with {len(adapter)} modules to {output}")


@click.command()
@click.argument("path")
@click.option("-o", "--output", required=True, help="Output directory or file.")
@click.option("--to", "to", type=click.Choice(FORMAT_CHOICES), required=True, help="Output layout.")
@input_format
@allow_pickle
def convert(path, output, to, fmt, allow_pickle):
    """Convert an adapter between layouts, keeping every module's scale."""
    from .. import api

    refuse_to_replace_input(path, output)
    adapter = api.load_adapter(path, fmt, allow_pickle=allow_pickle)
    api.save_adapter(adapter, output, to)
    click.echo(f"wrote {to} adapter with {len(adapter)} modules to {output}")


COMMANDS = [inspect, compress, verify, reconstruct, convert]
