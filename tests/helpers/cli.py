"""The lora-convert command line, run in-process through click's test runner."""
from __future__ import annotations

from click.testing import CliRunner, Result

from lora_convert.cli import main


def run_cli(*args, env: dict[str, str] | None = None) -> Result:
    """`lora-convert ARGS` (paths allowed); `env` adds environment variables for the call.

    An exception the CLI does not turn into an exit code propagates: a crash must fail the
    test with its traceback, not pass as "exit code 1" where a test only asks for non-zero.
    """
    return CliRunner().invoke(main, [str(a) for a in args], env=env or None, catch_exceptions=False)
