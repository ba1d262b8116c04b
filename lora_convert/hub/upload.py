"""push: a verified local LoRA-Mini adapter, its summary config and model card in one idempotent commit."""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.hf_api import RepoFile

from ..containerspec import CONFIG_NAME, FILE_NAME, FORMAT_VERSION, resolve_file
from ..errors import BadInputError, HubNetworkError
from . import modelcard
from .addresses import COMMIT_SHA, Target, format_uri, target
from .integrity import git_blob_sha1, naming
from .retry import call, offline_mode, offline_variable

DEFAULT_MESSAGE = "Upload LoRA-Mini adapter with lora_convert"


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str
    commit: str
    url: str
    up_to_date: bool
    created_branch: bool = False

    def describe(self) -> str:
        where = format_uri(self.repo_id, self.revision)
        if self.up_to_date:
            return f"{where} is already up to date (commit {self.commit[:12]}); nothing pushed"
        return f"pushed to {where} (commit {self.commit[:12]}): {self.url}"


def push(local_dir: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | bool | None = None,
         endpoint: str | None = None) -> PushResult:
    """Verify a local LoRA-Mini adapter and upload it to `repo_id` in a single commit.

    The commit holds lora_mini.safetensors, lora_mini_config.json and a generated model card
    (README.md). The repo is created when missing (`private` applies only then), and the
    branch `revision` too (from the default branch). Pushing what the branch already holds
    makes no commit and reports "already up to date".

    >>> push("./mini", "me/llama-lora-mini", revision="experiments", commit_message="seed 7")  # doctest: +SKIP
    PushResult(repo_id='me/llama-lora-mini', revision='experiments', commit='…', url='…', up_to_date=False, ...)
    """
    local = Path(local_dir)
    t = target(repo_id, revision, token, endpoint)
    t = dataclasses.replace(t, revision=t.revision or constants.DEFAULT_REVISION)
    if t.subfolder:  # the model card is the repo's README: a LoRA-Mini push owns the top of the repo
        raise BadInputError("push uploads to the top of the repo; a folder inside it is not supported", repo_id)
    files = files_to_push(local, t.repo_id)
    if offline_mode():
        raise HubNetworkError(f"{offline_variable()} is set, so nothing can be pushed; unset it to push", t.uri)
    api = t.api()
    t = dataclasses.replace(t, repo_id=call(t, "create the repository", lambda: _ensure_repo(api, t, private)))
    created = _ensure_branch(api, t)
    commit, changed = _commit(api, t, files, commit_message or DEFAULT_MESSAGE)
    return PushResult(t.repo_id, t.revision, commit, f"{t.endpoint}/{t.repo_id}/tree/{t.revision}", not changed,
                      created)


def files_to_push(local: Path, repo_id: str) -> dict[str, bytes]:
    """Verify a local LoRA-Mini adapter; the exact bytes of the three files of the commit.

    `local` is a LoRA-Mini directory or a single LoRA-Mini ``.safetensors`` file (its config is
    then generated). A README.md in the directory is kept (given the metadata it lacks) unless
    lora_convert generated it.
    """
    # torch loads here, not when `hub` is imported: `inspect hf://...` and pull need none
    from .. import container
    from ..convert import stored_report

    outers = []
    with naming(str(local)):  # loading every module and passthrough tensor makes every check once
        mini = container.load(local)
        report = stored_report(mini, progress=lambda m: outers.append(m.outer))
    file = resolve_file(local)
    config, readme = local / CONFIG_NAME, local / modelcard.CARD_NAME
    return {
        FILE_NAME: file.read_bytes(),
        CONFIG_NAME: config.read_bytes() if local.is_dir() and config.is_file()
        else container.summary_config(mini, mini.format_version or FORMAT_VERSION,
                                          {m.outer for m in report.modules}, report.summary()).encode(),
        modelcard.CARD_NAME: modelcard.readme_for(repo_id, mini, report, outers,
                                                  readme.read_text(encoding="utf-8")
                                                  if local.is_dir() and readme.is_file() else None).encode(),
    }


def _ensure_repo(api: HfApi, t: Target, private: bool) -> str:
    """The repo's full id, creating the repo when it does not exist.

    Looked up first rather than relying on create_repo(exist_ok=True): with a token that may not
    create repos, the client's fallback for an existing repo fails on any endpoint other than
    HF_ENDPOINT's. A bare "name" resolves to the token's namespace.
    """
    try:
        return api.repo_info(t.repo_id).id
    except RepositoryNotFoundError:
        return api.create_repo(t.repo_id, private=private, exist_ok=True).repo_id


def _ensure_branch(api: HfApi, t: Target) -> bool:
    """Create `t.revision` from the default branch when it does not exist; True when created."""
    refs = call(t, "list the repo's branches", lambda: api.list_repo_refs(t.repo_id))
    if t.revision in {b.name for b in refs.branches}:
        return False
    if t.revision in {tag.name for tag in refs.tags} or COMMIT_SHA.fullmatch(t.revision):
        raise BadInputError(f"--revision must name a branch to push to; {t.revision!r} is a tag or a commit", t.uri)
    call(t, "create the branch", lambda: api.create_branch(t.repo_id, branch=t.revision, exist_ok=True))
    return True


def _remote_has(api: HfApi, t: Target, head: str, files: dict[str, bytes]) -> bool:
    listed = api.get_paths_info(t.repo_id, list(files), revision=head)
    remote = {e.path: e for e in listed if isinstance(e, RepoFile)}
    for name, data in files.items():
        entry = remote.get(name)
        if entry is None:
            return False
        same = (entry.lfs.sha256 == hashlib.sha256(data).hexdigest() if entry.lfs is not None
                else entry.blob_id == git_blob_sha1(data))
        if not same:
            return False
    return True


def _commit(api: HfApi, t: Target, files: dict[str, bytes], message: str) -> tuple[str, bool]:
    """One commit with `files` on `t.revision`, unless the branch already holds them.

    Idempotent, so that retrying is safe: each attempt re-reads the branch head, and if an
    earlier attempt whose answer was lost did land, finds the files there and stops. The
    parent commit is pinned, so a concurrent push makes the Hub refuse (412) instead of
    silently interleaving. Returns (commit, whether this call made it).
    """
    tried = False

    def once() -> tuple[str, bool]:
        nonlocal tried
        head = api.repo_info(t.repo_id, revision=t.revision).sha
        if _remote_has(api, t, head, files):
            return head, tried
        tried = True
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in files.items()]
        info = api.create_commit(t.repo_id, operations, commit_message=message, revision=t.revision,
                                 parent_commit=head)
        return info.oid, True

    return call(t, "commit the files", once)
