"""Commands that read and write adapters: inspect, compress, verify, reconstruct, convert."""
from __future__ import annotations

import json

import click

from ..outer.random import STREAMS
from .options import (FORMAT_CHOICES, allow_pickle, emit, input_format, json_flag, parse_outer_dim, progress_bar,
                      refuse_to_replace_input)


@click.command()
@click.argument("path")
@input_format
@allow_pickle
@json_flag
def inspect(path, fmt, allow_pickle, as_json):
    """Show what is in an adapter or a LoRA-Mini file."""
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
@click.option("-o", "--output", required=True, help="Output directory (or a .safetensors file).")
@click.option("--outer", type=click.Choice(["random", "svd"]), default="random", show_default=True,
              help="random: outers regenerated from a seed (tiny files); svd: the update's own singular "
                   "vectors, stored (near-lossless).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random outers.")
@click.option("--outer-dim", default=None, help="Outer sizes a[,b] for random outers (default 64, "
                                                "capped by each module's dimensions).")
@click.option("--outer-stream", type=click.Choice(STREAMS), default="shared", show_default=True,
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
@input_format
@allow_pickle
@json_flag
@calibration_options
def compress(path, output, outer, seed, outer_dim, outer_stream, rank, keep_energy, dtype, fmt, allow_pickle,
             as_json, **cal):
    """Compress an adapter into LoRA-Mini form and report its fidelity.

    With --calibration (text) the base model runs over the text once and each module minimises
    its output error on it instead of its weight error (no training).
    """
    from .. import api

    refuse_to_replace_input(path, output)
    adapter = api.load_adapter(path, fmt, allow_pickle=allow_pickle)
    mini = api.compress(adapter, outer, seed=seed, outer_dim=parse_outer_dim(outer_dim), rank=rank,
                        keep_energy=keep_energy, dtype=dtype, outer_stream=outer_stream,
                        calibration=collect_calibration(adapter, cal))
    with progress_bar(len(mini), "compressing") as tick:
        report = api.save(mini, output, progress=tick)
    emit(report, as_json, {"output": output})


@click.command()
@click.argument("path")
@click.option("--against", default=None, help="Original adapter to measure the error against.")
@input_format
@allow_pickle
@json_flag
def verify(path, against, fmt, allow_pickle, as_json):
    """Regenerate outers, check every fingerprint and checksum, report the error."""
    from .. import api
    from ..paths import local_path

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
                   "(alpha is rescaled; the scale then matches to within an ulp, not always exactly).")
def reconstruct(path, output, to, trim_rank):
    """Turn a LoRA-Mini file back into a standard adapter with the original scale."""
    from .. import api

    refuse_to_replace_input(path, output)
    mini = api.load(path)
    adapter = api.reconstruct(mini, trim_rank=trim_rank)
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
