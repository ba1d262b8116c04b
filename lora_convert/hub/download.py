"""pull, download_uri and local_path: a pinned commit's files through the HF cache, checked, then used.

Online, the revision is looked up once and everything after uses that commit: the files, the
listing they are checked against, the result. With HF_HUB_OFFLINE set, or when the endpoint
cannot be reached at all, the client finds the commit and its files in the HF cache
(``snapshot_download(local_files_only=True)``, its refs/ and cached trees) and no request is made.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from huggingface_hub import constants, get_cached_repo_tree, snapshot_download
from huggingface_hub.errors import CachedRepoTreeNotFoundError, LocalEntryNotFoundError
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import tqdm as hf_tqdm

from .. import __version__
from ..containerspec import CONFIG_NAME, FILE_NAME
from ..atomic import atomic_dir, atomic_file
from ..errors import BadInputError, HubError, HubNetworkError, HubNotFoundError, IntegrityError, LoraConvertError
from .addresses import COMMIT_SHA, Target, format_uri, is_hub_uri, target
from .integrity import evict, matches, verify_mini
from .modelcard import CARD_NAME
from .retry import call, offline_mode, offline_variable, unreachable

# The documented logger for the "using the cache" warning (docs/HUB.md), whichever module emits it.
log = logging.getLogger("lora_convert.hub")
MINI_FILES = (FILE_NAME, CONFIG_NAME, CARD_NAME)
Selector = Callable[[list[str]], list[str]]


@dataclass(frozen=True)
class PullResult:
    repo_id: str
    revision: str | None
    commit: str
    path: Path
    modules: int
    subfolder: str = ""

    def describe(self) -> str:
        return (f"pulled {format_uri(self.repo_id, self.revision, self.subfolder)} (commit {self.commit[:12]}) to "
                f"{self.path}: {self.modules} modules, all outer fingerprints and checksums verified")


def pull(repo_id: str, dest: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None,
         endpoint: str | None = None, cache_dir: str | os.PathLike | None = None) -> PullResult:
    """Download a LoRA-Mini repo at a pinned revision, verify everything, publish `dest` atomically.

    `repo_id` may also be ``hf://owner/repo[@revision][/folder]`` (the LoRA-Mini files directly in
    that folder of the repo). Files go through the HF cache; the copy in `dest` is checked against
    the repo tree's sha256 / git oids, then every module is loaded (outer fingerprints, tensor
    checksums) before `dest` appears. A failed pull leaves `dest` as it was; a corrupt cached file
    is evicted so that the next pull downloads it again. Offline, see fetch.

    >>> pull("me/llama-lora-mini", "./mini", revision="v1").commit          # doctest: +SKIP
    '3f2a…'
    >>> pull("hf://me/loras@v1/styles/ink", "./ink").subfolder              # doctest: +SKIP
    'styles/ink'
    """
    t = target(repo_id, revision, token, endpoint)
    snap = fetch(t, _mini_files(t), cache_dir)
    with atomic_dir(dest) as tmp:
        for name in snap.names:
            shutil.copyfile(snap.path / name, tmp / name)
        snap.check(tmp, t)
        modules = len(verify_mini(tmp, t.at(snap.commit)).specs)
    return PullResult(t.repo_id, t.revision, snap.commit, Path(dest), modules, t.subfolder)


def download_uri(uri: str, *, expect: str | None = None, token: str | bool | None = None,
                 endpoint: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The verified local folder (in the HF cache) for ``hf://owner/repo[@revision][/folder]``.

    A LoRA-Mini repo (or folder) yields its LoRA-Mini files; any other its adapter files directly
    in that folder, the top of the repo by default (*.safetensors and *.json; *.bin only when
    there are no safetensors). Every file is checked against the repo tree (corrupt ones are
    evicted). LoRA-Mini modules are checked when they are loaded, as for a local file.
    `expect="lora-mini"` refuses other repos with a clear error, `expect="adapter"` fetches
    adapter files even from a LoRA-Mini repo. Offline, see fetch.

    >>> download_uri("hf://someone/their-lora")                                # doctest: +SKIP
    PosixPath('~/.cache/huggingface/hub/models--someone--their-lora/snapshots/0a1b…')
    >>> download_uri("hf://someone/sd-loras/styles/ink")                       # doctest: +SKIP
    PosixPath('~/.cache/huggingface/hub/models--someone--sd-loras/snapshots/0a1b…/styles/ink')
    """
    choosers = {None: _auto, "lora-mini": _mini_files, "adapter": _adapter_files}
    if expect not in choosers:
        raise ValueError(f"expect must be None, 'lora-mini' or 'adapter', not {expect!r}")
    t = target(uri, None, token, endpoint)
    snap = fetch(t, choosers[expect](t), cache_dir)
    snap.check(snap.path, t)
    return snap.path


def local_path(path: str | os.PathLike, expect: str | None = None) -> Path:
    """A local path for `path`, downloading (and verifying) ``hf://`` inputs first.

    `expect` ("lora-mini" or "adapter") says what a Hub repo must hold (see download_uri); the
    endpoint and token come from HF_ENDPOINT and HF_TOKEN / the saved login. A folder in the URI
    yields that folder of the cached snapshot. With HF_HUB_OFFLINE=1 the HF cache alone answers.

    >>> local_path("./mini")
    PosixPath('mini')
    >>> local_path("hf://me/sd-loras@v1/styles/ink")                        # doctest: +SKIP
    PosixPath('~/.cache/huggingface/hub/models--me--sd-loras/snapshots/9c1d…/styles/ink')
    """
    return download_uri(path, expect=expect) if is_hub_uri(path) else Path(path)


# --------------------------------------------------------------------------- one commit's files in the cache


@dataclass(frozen=True)
class Snapshot:
    """The selected files of one commit in the HF cache, with what the repo tree says about them.

    `path` is the folder holding them (the snapshot, or the subfolder inside it); `names` are
    relative to it. `entries` lacks the names that no listing describes (offline, when the client
    cached no tree for the commit): those cannot be checked here.
    """

    path: Path
    commit: str
    names: tuple[str, ...]
    entries: dict[str, RepoFile]

    def check(self, folder: Path, t: Target) -> None:
        """Compare `folder`'s copies with the tree; evict and raise on the first mismatch."""
        for name, entry in sorted(self.entries.items()):
            if not matches(entry, folder / name):
                if not evict(self.path / name):
                    then = f"the cache is read-only: remove {self.path / name} and its blob, then run it again"
                elif offline_mode():
                    then = "the cached copy was removed; run the command again with network access"
                else:
                    then = "the cached copy was removed, run the command again"
                raise IntegrityError(f"downloaded {name} does not match the repo's checksum (corrupted in transit "
                                     f"or in the cache); {then}", t.at(self.commit))


def fetch(t: Target, select: Selector, cache_dir: str | os.PathLike | None = None) -> Snapshot:
    """`select(files directly in t.subfolder)` of the commit `t.revision` names, in the HF cache.

    Online, the commit is pinned first so that the files, the tree they are checked against and
    the result all belong to the same commit even if the branch moves meanwhile. With
    HF_HUB_OFFLINE set no request is made, and when the endpoint cannot be reached at all (not
    when it answers with an error), the cache alone answers (see cached), with a warning.
    """
    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    if offline_mode():
        return cached(t, select, cache, f"{offline_variable()} is set")
    try:
        return _download(t, select, cache)
    except HubNetworkError as exc:
        cause = unreachable(exc)
        if cause is None:
            raise
        snap = cached(t, select, cache, exc.problem)
        log.warning(f"warning: {t.uri}: cannot reach {t.endpoint} ({type(cause).__name__}); using commit "
                    f"{snap.commit[:12]} from the HF cache")
        return snap


def cached(t: Target, select: Selector, cache: Path, why: str) -> Snapshot:
    """`t` as the HF cache holds it, with no request: for HF_HUB_OFFLINE and an unreachable endpoint.

    The client finds the commit (a full sha, or the branch or tag its refs/ recorded) and its
    snapshot. The tree it cached for that commit lists the repo and gives each file's checksum;
    without it, only the snapshot's own files are known, and they are used unchecked (LoRA-Mini
    files still check every tensor when loaded). `why` starts the error when something is not cached.
    """
    try:  # no file is required yet (allow_patterns=[]): the listing below decides which are
        snapshot = Path(snapshot_download(t.repo_id, revision=t.revision, cache_dir=cache, local_files_only=True,
                                          allow_patterns=[]))
    except LocalEntryNotFoundError:
        raise _not_cached(t, why, cache) from None
    if not COMMIT_SHA.fullmatch(snapshot.name):  # a damaged ref: nothing we can trust to name a commit
        raise _not_cached(t, why, cache)
    try:
        tree = {f.path: f for f in get_cached_repo_tree(t.repo_id, revision=snapshot.name, cache_dir=cache)}
    except CachedRepoTreeNotFoundError:
        tree = None
    listing = sorted(tree) if tree is not None else sorted(
        p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    try:
        names = _pick(t, select, listing)
    except LoraConvertError:
        if tree is not None:
            raise
        raise _not_cached(t, why, cache) from None  # nothing lists the repo: the files may just not be cached
    folder = snapshot / t.subfolder
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise _not_cached(t, why, cache, missing)
    return Snapshot(folder, snapshot.name, tuple(names), {n: tree[t.in_repo(n)] for n in names} if tree else {})


class _TerminalOnly(hf_tqdm):
    """The client's progress bars, shown only on a terminal like lora_convert's own (not in logs)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("disable", None)  # tqdm: None means "only when the output is a TTY"
        super().__init__(*args, **kwargs)


def _download(t: Target, select: Selector, cache: Path) -> Snapshot:
    api = t.api()
    # The client's session has no timeout of its own: a silent endpoint (a firewall dropping
    # packets) would hang here forever instead of timing out into the cache fallback.
    info = call(t, "look up the revision", lambda: api.repo_info(t.repo_id, revision=t.revision,
                                                                 timeout=constants.HF_HUB_ETAG_TIMEOUT))
    names = _pick(t, select, sorted(s.rfilename for s in info.siblings or []))
    paths = [t.in_repo(n) for n in names]
    listed = call(t, "list the repo's files", lambda: api.get_paths_info(t.repo_id, paths, revision=info.sha))
    entries = {e.path: e for e in listed if isinstance(e, RepoFile)}
    if sorted(entries) != sorted(paths):  # every file we hand out must have a checksum to verify
        raise HubError(f"the repo tree does not describe {sorted(set(paths) - set(entries))}", t.uri)
    path = call(t, "download the files", lambda: snapshot_download(
        t.repo_id, revision=info.sha, allow_patterns=[glob.escape(p) for p in paths], cache_dir=cache,
        token=t.token, endpoint=t.endpoint, library_name="lora_convert", library_version=__version__,
        tqdm_class=_TerminalOnly))
    _record_ref(t, cache, info.sha)  # only once its files are cached: offline runs then find them all
    return Snapshot(Path(path) / t.subfolder, info.sha, tuple(names), {n: entries[p] for n, p in zip(names, paths)})


def _record_ref(t: Target, cache: Path, commit: str) -> None:
    """Record in the cache's refs/ the commit the branch or tag named, so that offline runs find it.

    The client records a ref only when it looks the revision up itself; here the lookup is ours
    (with a timeout, these retries, and the listing files are chosen from) and the download is
    pinned to its commit. Best effort, like the client: a read-only cache must not fail a download.
    The revision was checked to be a relative path of ordinary parts, so the ref stays in refs/.
    """
    revision = t.revision or constants.DEFAULT_REVISION
    ref = cache / repo_folder_name(repo_id=t.repo_id, repo_type="model") / "refs" / revision
    with contextlib.suppress(OSError, LoraConvertError):
        if revision != commit and (not ref.is_file() or ref.read_text() != commit):
            with atomic_file(ref) as tmp:
                tmp.write_text(commit)  # no newline: the client reads the file as is


def _not_cached(t: Target, why: str, cache: Path, missing: list[str] | None = None) -> HubNetworkError:
    revision = t.revision or constants.DEFAULT_REVISION
    what = (f"the cached revision {revision!r} lacks {', '.join(missing)}" if missing
            else f"revision {revision!r} is not in the HF cache")
    return HubNetworkError(f"{why}, and {what} ({cache}); run the command once with network access to cache it",
                           t.uri)


# --------------------------------------------------------------------------- which files


def _pick(t: Target, select: Selector, listing: list[str]) -> list[str]:
    """`select` applied to the files directly in `t.subfolder` (the top when none), named relative to it."""
    prefix = f"{t.subfolder}/" if t.subfolder else ""
    inside = [n[len(prefix):] for n in listing if n.startswith(prefix)]
    if prefix and not inside:
        raise HubNotFoundError(f"no folder {t.subfolder!r} in the repo at this revision", t.uri)
    return select([n for n in inside if "/" not in n])


def _where(t: Target) -> str:
    return f"in {t.subfolder}/" if t.subfolder else "at the top of the repo"


def _mini_files(t: Target) -> Selector:
    def select(names: list[str]) -> list[str]:
        if FILE_NAME not in names:
            kind = "folder" if t.subfolder else "repo"
            raise BadInputError(f"not a LoRA-Mini {kind}: no {FILE_NAME} {_where(t)} at this revision (to "
                                f"compress a standard adapter, run `lora-convert compress {t.uri} -o ./mini`)", t.uri)
        return [n for n in MINI_FILES if n in names]
    return select


def _adapter_files(t: Target) -> Selector:
    """Adapter files directly in the folder: weights and configs, pickles only when there are no safetensors."""
    def select(names: list[str]) -> list[str]:
        weights = [n for n in names if n.endswith(".safetensors")] or [n for n in names if n.endswith(".bin")]
        if not weights:
            raise BadInputError(f"no adapter weights (*.safetensors or *.bin) {_where(t)}", t.uri)
        return sorted(weights + [n for n in names if n.endswith(".json")])
    return select


def _auto(t: Target) -> Selector:
    mini, adapter = _mini_files(t), _adapter_files(t)
    return lambda names: mini(names) if FILE_NAME in names else adapter(names)
