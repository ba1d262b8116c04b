"""Options and helpers shared by every command: input/output checks, --json, progress bars."""
from __future__ import annotations

import contextlib
import json
import os
import sys

import click

from .. import formats

FORMAT_CHOICES = formats.names()  # without importing the layouts (CLI start-up)


class LazyChoice(click.Choice):
    """A Choice whose values come from `load()` on first use: from a module that imports torch or
    numpy, which `lora-convert --help` must not (CLI start-up)."""

    def __init__(self, load, case_sensitive: bool = True):
        self._load, self._choices, self.case_sensitive = load, None, case_sensitive

    @property
    def choices(self) -> tuple:
        if self._choices is None:
            self._choices = tuple(self._load())
        return self._choices


@contextlib.contextmanager
def progress_bar(length: int, label: str):
    """A progress bar on stderr when it is a terminal; yields a per-item callback."""
    if not sys.stderr.isatty():
        yield lambda m: None
        return
    with click.progressbar(length=length, label=label, file=sys.stderr,
                           show_pos=True, item_show_func=lambda n: n) as bar:
        yield lambda m: bar.update(1, getattr(m, "name", None))


def emit(report, as_json: bool, extra: dict | None = None) -> None:
    if as_json:
        doc = report.as_dict()
        doc.update(extra or {})
        click.echo(json.dumps(doc, indent=2, allow_nan=False))
        if report.warning():
            click.echo(report.warning(), err=True)
    else:
        click.echo(report.table())


def refuse_to_replace_input(path: str, output: str) -> None:
    """An output is published by replacing whatever is at its path: never let that be the input,
    a directory holding it (deleted once the output is complete), or an entry of the directory
    the input is read from that is, or could become, one of the input's own files."""
    from pathlib import Path

    from ..errors import BadInputError
    from ..hub import is_hub_uri

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
    from .. import container

    if src.is_dir():
        return src
    names = {container.FILE_NAME, container.CONFIG_NAME}
    for layout in formats.REGISTRY.values():
        names.update(layout.dir_files)
    return src.parent if src.name in names else None


def parse_outer_dim(value: str | None):
    if value is None:
        return None
    try:
        parts = [int(p) for p in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected a or a,b (integers), got {value!r}") from None
    if len(parts) not in (1, 2):
        raise click.BadParameter(f"expected a or a,b, got {value!r}")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def parse_bits(value: str | None):
    """--bits: an integer width, or a codebook name ("nf4"); CompressConfig checks which exist."""
    if value is None:
        return None
    text = value.strip()
    return int(text) if text.isdigit() else text.lower()


def parse_widths(value: str | None) -> tuple | None:
    """compress --bits with a budget: the comma-separated widths it may choose among ("3,nf4")."""
    if value is None:
        return None
    return tuple(parse_bits(part) for part in value.split(","))


input_format = click.option("--from", "fmt", type=click.Choice(FORMAT_CHOICES), default=None,
                            help="Input layout (detected when omitted).")
allow_pickle = click.option("--allow-pickle", is_flag=True,
                            help="Allow adapter_model.bin, loaded with torch.load(weights_only=True) only.")
json_flag = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON report.")


token_option = click.option("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login).")
endpoint_option = click.option("--endpoint", default=None,
                               help="Hub endpoint URL (default: HF_ENDPOINT, else https://huggingface.co).")


