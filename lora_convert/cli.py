"""Command line: a thin layer over lora_convert's verbs.

Exit codes: 0 success, 2 bad input (one line naming the file and the problem),
1 internal error. Set LORA_CONVERT_DEBUG=1 to see tracebacks.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading

import click

from . import __version__
from .errors import LoraConvertError
from .formats import REGISTRY as _FORMATS
from .outer.random import STREAMS

FORMAT_CHOICES = sorted(_FORMATS)


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class _Terminated(BaseException):
    """SIGTERM / SIGHUP as an exception, so that the atomic writers' clean-up runs (Python's
    default action for these signals exits without unwinding, leaving the .partial behind)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise _Terminated(signum)


@contextlib.contextmanager
def _unwind_on_termination():
    """Within the block, SIGTERM / SIGHUP raise _Terminated; the previous handlers come back after,
    so a program that runs the CLI in-process (click's CliRunner) keeps its own behaviour."""
    installed = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:  # leave an app's own handler
                installed[sig] = signal.signal(sig, _raise_terminated)
    try:
        yield
    finally:
        for sig, previous in installed.items():
            signal.signal(sig, previous)


class _Group(click.Group):
    """Turns lora_convert errors into one line and an exit code, never a traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            with _unwind_on_termination():
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:  # click would print usage + hint + error on 4 lines
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            _fail(f"{exc.format_message()}{where}", exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.exceptions.Abort:
            _fail("aborted", 1)
        except _Terminated as exc:  # a BaseException: invoke's handlers let it through to here
            _fail(f"terminated by {signal.Signals(exc.signum).name}", 128 + exc.signum)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, SystemExit):
            raise
        except LoraConvertError as exc:
            if os.environ.get("LORA_CONVERT_DEBUG"):
                raise
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as exc:  # a bug: say so plainly, still no traceback
            if os.environ.get("LORA_CONVERT_DEBUG"):
                raise
            _fail(f"internal error ({type(exc).__name__}: {exc}); rerun with LORA_CONVERT_DEBUG=1 "
                  "for a traceback", 1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lora-convert")
def main():
    """Compress LoRA adapters into LoRA-Mini form, verify them, and restore standard adapters.

    \b
    lora-convert inspect ./my-adapter
    lora-convert compress ./my-adapter -o ./mini --outer random --seed 7 --outer-dim 64 --rank 16
    lora-convert verify ./mini --against ./my-adapter
    lora-convert reconstruct ./mini -o ./restored
    lora-convert push ./mini me/my-adapter-mini
    lora-convert reconstruct hf://me/my-adapter-mini -o ./restored
    """


@contextlib.contextmanager
def progress_bar(length: int, label: str):
    """A progress bar on stderr when it is a terminal; yields a per-item callback."""
    if not sys.stderr.isatty():
        yield lambda m: None
        return
    with click.progressbar(length=length, label=label, file=sys.stderr,
                           show_pos=True, item_show_func=lambda n: n) as bar:
        yield lambda m: bar.update(1, getattr(m, "name", None))


def _emit(report, as_json: bool, extra: dict | None = None) -> None:
    if as_json:
        doc = report.as_dict()
        doc.update(extra or {})
        click.echo(json.dumps(doc, indent=2, allow_nan=False))
        if report.warning():
            click.echo(report.warning(), err=True)
    else:
        click.echo(report.table())


def _refuse_to_replace_input(path: str, output: str) -> None:
    """An output is published by replacing whatever is at its path: never let that be the input,
    a directory holding it (deleted once the output is complete), or an entry of the directory
    the input is read from that is, or could become, one of the input's own files."""
    from pathlib import Path

    from .errors import BadInputError
    from .paths import is_hub_uri

    if is_hub_uri(path):
        return
    src, out = Path(path).resolve(), Path(output).resolve()
    if out == src or out in src.parents:
        raise BadInputError(f"output would replace the input {path}; choose another output path", output)
    home = _input_dir(src)
    placed = Path(output).absolute().parent.resolve() / Path(output).name  # atomic writes replace a final link itself
    if home is not None and placed.parent == home and (os.path.lexists(placed) or placed.suffix in _INPUT_SUFFIXES):
        raise BadInputError(f"output would sit among the files of the input {path} (and could replace one); "
                            "choose a path outside that directory", output)


_INPUT_SUFFIXES = (".safetensors", ".bin", ".json")


def _input_dir(src):
    """The directory an input is read from: itself, or the folder of a directory layout's file
    (adapter_config.json, adapter_model.safetensors, lora_mini.safetensors, ...); None for a
    single-file layout, whose neighbours are not part of it."""
    from . import container

    if src.is_dir():
        return src
    names = {container.FILE_NAME, container.CONFIG_NAME}
    for fmt in _FORMATS.values():
        if getattr(fmt, "OUTPUT_IS_DIR", False):
            names |= {getattr(fmt, n) for n in ("CONFIG_FILE", "WEIGHTS_FILE", "PICKLE_FILE") if hasattr(fmt, n)}
    return src.parent if src.name in names else None


def _outer_dim(value: str | None):
    if value is None:
        return None
    try:
        parts = [int(p) for p in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected a or a,b (integers), got {value!r}") from None
    if len(parts) not in (1, 2):
        raise click.BadParameter(f"expected a or a,b, got {value!r}")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


input_format = click.option("--from", "fmt", type=click.Choice(FORMAT_CHOICES), default=None,
                            help="Input layout (detected when omitted).")
allow_pickle = click.option("--allow-pickle", is_flag=True,
                            help="Allow adapter_model.bin, loaded with torch.load(weights_only=True) only.")
json_flag = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON report.")


@main.command()
@click.argument("path")
@input_format
@allow_pickle
@json_flag
def inspect(path, fmt, allow_pickle, as_json):
    """Show what is in an adapter or a LoRA-Mini file."""
    from .inspect import describe

    doc = describe(path, fmt, allow_pickle)
    text = doc.pop("_text")
    click.echo(json.dumps(doc, indent=2) if as_json else text)


@main.command()
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
def compress(path, output, outer, seed, outer_dim, outer_stream, rank, keep_energy, dtype, fmt, allow_pickle,
             as_json):
    """Compress an adapter into LoRA-Mini form and report its fidelity."""
    from . import api

    _refuse_to_replace_input(path, output)
    adapter = api.load_adapter(path, fmt, allow_pickle=allow_pickle)
    mini = api.compress(adapter, outer, seed=seed, outer_dim=_outer_dim(outer_dim), rank=rank,
                        keep_energy=keep_energy, dtype=dtype, outer_stream=outer_stream)
    with progress_bar(len(mini), "compressing") as tick:
        report = api.save(mini, output, progress=tick)
    _emit(report, as_json, {"output": output})


@main.command()
@click.argument("path")
@click.option("--against", default=None, help="Original adapter to measure the error against.")
@input_format
@allow_pickle
@json_flag
def verify(path, against, fmt, allow_pickle, as_json):
    """Regenerate outers, check every fingerprint and checksum, report the error."""
    from . import api
    from .paths import local_path

    path = local_path(path, expect="lora-mini")  # an hf:// input is fetched (and checked) once
    n = len(api.load(path))
    with progress_bar(n, "verifying") as tick:
        report = api.verify(path, against, fmt=fmt, allow_pickle=allow_pickle, progress=tick)
    _emit(report, as_json, {"verified": True})
    if not as_json:
        click.echo("integrity: OK (all outer fingerprints and tensor checksums match)")


@main.command()
@click.argument("path")
@click.option("-o", "--output", required=True, help="Output directory or file.")
@click.option("--to", "to", type=click.Choice(FORMAT_CHOICES), default=None,
              help="Output layout (default: the layout the adapter was compressed from).")
@click.option("--trim-rank", is_flag=True,
              help="Write the inner rank instead of zero-padding back to the original rank "
                   "(alpha is rescaled; the scale then matches to within an ulp, not always exactly).")
def reconstruct(path, output, to, trim_rank):
    """Turn a LoRA-Mini file back into a standard adapter with the original scale."""
    from . import api

    _refuse_to_replace_input(path, output)
    mini = api.load(path)
    adapter = api.reconstruct(mini, trim_rank=trim_rank)
    api.save_adapter(adapter, output, to)
    click.echo(f"wrote {to or adapter.format} adapter with {len(adapter)} modules to {output}")


token_option = click.option("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login).")
endpoint_option = click.option("--endpoint", default=None,
                               help="Hub endpoint URL (default: HF_ENDPOINT, else https://huggingface.co).")


@main.command()
@click.argument("path")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (when it does not exist yet).")
@click.option("--revision", default=None, help="Branch to push to (created from the default branch if missing).")
@click.option("-m", "--message", "commit_message", default=None, help="Commit message.")
@token_option
@endpoint_option
def push(path, repo_id, private, revision, commit_message, token, endpoint):
    """Verify a LoRA-Mini adapter and upload it to a Hub repo in one commit, with a model card.

    \b
    lora-convert push ./mini me/my-adapter-mini --private -m "seed 7, k=8"
    """
    from . import hub

    result = hub.push(path, repo_id, private=private, revision=revision, commit_message=commit_message,
                      token=token, endpoint=endpoint)
    click.echo(result.describe())


@main.command()
@click.argument("repo_id")
@click.option("-o", "--output", required=True, help="Output directory (replaced atomically).")
@click.option("--revision", default=None, help="Branch, tag or commit sha (default: the default branch).")
@token_option
@endpoint_option
def pull(repo_id, output, revision, token, endpoint):
    """Download a LoRA-Mini repo at a pinned revision and verify it before writing OUTPUT.

    \b
    lora-convert pull me/my-adapter-mini -o ./mini --revision v1
    """
    from . import hub

    click.echo(hub.pull(repo_id, output, revision=revision, token=token, endpoint=endpoint).describe())


@main.command()
@click.argument("path")
@click.option("-o", "--output", required=True, help="Output directory or file.")
@click.option("--to", "to", type=click.Choice(FORMAT_CHOICES), required=True, help="Output layout.")
@input_format
@allow_pickle
def convert(path, output, to, fmt, allow_pickle):
    """Convert an adapter between layouts, keeping every module's scale."""
    from . import api

    _refuse_to_replace_input(path, output)
    adapter = api.load_adapter(path, fmt, allow_pickle=allow_pickle)
    api.save_adapter(adapter, output, to)
    click.echo(f"wrote {to} adapter with {len(adapter)} modules to {output}")


from .cli_recover import register as _register_training  # noqa: E402  (recover / eval / train)

_register_training(main)

if __name__ == "__main__":
    main()
