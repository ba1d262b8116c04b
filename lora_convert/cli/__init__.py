"""Command line: a thin layer over lora_convert's verbs.

Exit codes: 0 success, 2 bad input (one line naming the file and the problem),
1 internal error. Set LORA_CONVERT_DEBUG=1 to see tracebacks.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

import click

from .. import __version__
from ..errors import LoraConvertError
from . import convert, hub, recovery


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


for _command in convert.COMMANDS + hub.COMMANDS + recovery.COMMANDS:
    main.add_command(_command)

if __name__ == "__main__":
    main()
