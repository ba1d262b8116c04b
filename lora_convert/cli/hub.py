"""Hub commands: push, pull."""
from __future__ import annotations

import click

from .options import endpoint_option, token_option


@click.command()
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
    from .. import hub

    result = hub.push(path, repo_id, private=private, revision=revision, commit_message=commit_message,
                      token=token, endpoint=endpoint)
    click.echo(result.describe())


@click.command()
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
    from .. import hub

    click.echo(hub.pull(repo_id, output, revision=revision, token=token, endpoint=endpoint).describe())


COMMANDS = [push, pull]
