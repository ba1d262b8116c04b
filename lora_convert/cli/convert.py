"""Commands that read and write adapters: inspect, compress, verify, reconstruct, convert."""
from __future__ import annotations

import json

import click

from .. import outer
from .options import (FORMAT_CHOICES, LazyChoice, allow_pickle, emit, input_format, json_flag, parse_outer_dim,
                      progress_bar, refuse_to_replace_input)


def _streams():
    from ..outer.random import STREAMS

    return STREAMS


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


@click.command()
@click.argument("path")
@click.option("-o", "--output", required=True, help="Output directory (or a .safetensors file).")
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
@input_format
@allow_pickle
@json_flag
def compress(path, output, outer, seed, outer_dim, outer_stream, rank, keep_energy, dtype, fmt, allow_pickle,
             as_json):
    """Compress an adapter into LoRA-Mini form and report its fidelity."""
    from .. import api

    refuse_to_replace_input(path, output)
    adapter = api.load_adapter(path, fmt, allow_pickle=allow_pickle)
    mini = api.compress(adapter, outer, seed=seed, outer_dim=parse_outer_dim(outer_dim), rank=rank,
                        keep_energy=keep_energy, dtype=dtype, outer_stream=outer_stream)
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
