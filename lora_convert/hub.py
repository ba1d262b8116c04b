"""Share adapters on the Hugging Face Hub (or any Hub-compatible endpoint), verified end to end.

Built on the real ``huggingface_hub`` client and its conventions: the token comes from
``token=``, else ``HF_TOKEN`` or the saved login (``hf auth login`` / ``huggingface-cli login``);
the endpoint from ``endpoint=``, else ``HF_ENDPOINT``; downloads land in the HF cache
(``HF_HOME`` / ``HF_HUB_CACHE``); a revision is a branch, a tag or a commit sha.

    >>> from lora_convert import hub                                        # doctest: +SKIP
    >>> hub.push("./mini", "me/llama-lora-mini", private=True).commit        # doctest: +SKIP
    '3f2a…'
    >>> hub.pull("me/llama-lora-mini", "./mini-copy", revision="v1").path    # doctest: +SKIP
    PosixPath('mini-copy')
    >>> hub.download_uri("hf://me/llama-lora-mini@v1")                       # doctest: +SKIP
    PosixPath('~/.cache/huggingface/hub/models--me--llama-lora-mini/snapshots/3f2a…')
    >>> hub.download_uri("hf://me/sd-loras@v1/styles/ink")                   # doctest: +SKIP
    PosixPath('~/.cache/huggingface/hub/models--me--sd-loras/snapshots/9c1d…/styles/ink')

push uploads the file, its config and a model card in one commit; pull pins the revision, checks
every file and module, and publishes the output directory atomically; download_uri returns a
checked cache snapshot. URIs follow huggingface_hub's HfFileSystem: ``hf://owner/repo[@rev][/path]``.

With HF_HUB_OFFLINE=1 no request is made: the revision (a branch or tag the cache recorded, or a
full commit sha) and its files come from the HF cache. When the endpoint cannot be reached at all
(connection refused, dropped, timed out, after the retries), the cache is used the same way and one
warning line says so; any answer from the Hub (404, 401, 5xx) is reported as it is.

Every failure a user can meet is one line: HubNotFoundError (repo, revision or file),
HubAuthError (missing/bad token, no permission), HubNetworkError (unreachable, dropped,
server errors after retries), HubError (anything else the Hub refuses), BadInputError
(not a LoRA-Mini repo, invalid local adapter), IntegrityError (corrupt download).
Transient failures (5xx, 429, dropped connections) are retried with exponential backoff on
top of the client's own retries: LORA_CONVERT_HUB_RETRIES (default 4) more attempts,
LORA_CONVERT_HUB_BACKOFF (default 1.0) seconds before the first, doubling, at most 30 s.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import httpx2
from huggingface_hub import (CommitOperationAdd, HfApi, constants, get_cached_repo_tree, get_token, parse_hf_uri,
                             snapshot_download)
from huggingface_hub.errors import (CachedRepoTreeNotFoundError, EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                    HfUriError, HFValidationError, LocalEntryNotFoundError, LocalTokenNotFoundError,
                                    OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import tqdm as hf_tqdm
from huggingface_hub.utils import validate_repo_id

from . import __version__, container, modelcard
from .atomic import atomic_dir, atomic_file
from .convert import stored_report
from .errors import (BadInputError, HubAuthError, HubError, HubNetworkError, HubNotFoundError, IntegrityError,
                     LoraConvertError)
from .paths import HF_SCHEME, is_hub_uri

__all__ = ["push", "pull", "download_uri", "parse_uri", "format_uri", "PushResult", "PullResult"]
log = logging.getLogger(__name__)

T = TypeVar("T")
RETRIES_ENV, BACKOFF_ENV = "LORA_CONVERT_HUB_RETRIES", "LORA_CONVERT_HUB_BACKOFF"
DEFAULT_RETRIES, DEFAULT_BACKOFF, MAX_DELAY = 4, 1.0, 30.0
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
README = "README.md"
MINI_FILES = (container.FILE_NAME, container.CONFIG_NAME, README)
DEFAULT_MESSAGE = "Upload LoRA-Mini adapter with lora_convert"
LOGIN_HINT = "run `hf auth login` (or `huggingface-cli login`), set HF_TOKEN, or pass --token"
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
URI_FORM = f"{HF_SCHEME}owner/repo[@revision][/path/in/repo]"
# Revisions with a '/' that huggingface_hub's URI parser takes verbatim; other ones are written with %2F.
_SPECIAL_REF = re.compile(r"refs/(?:convert/[\w.-]+|pr/\d+)")
_OTHER_REPO_TYPES = frozenset({"datasets", "spaces", "kernels", "buckets"})


# --------------------------------------------------------------------------- where, and as whom


@dataclass(frozen=True)
class Target:
    """One repo at one revision on one endpoint, as one identity (token as the client takes it).

    `subfolder` is a folder inside the repo ("" for its top): the adapter files are those directly in it.
    """

    repo_id: str
    revision: str | None
    endpoint: str
    token: str | bool | None
    subfolder: str = ""

    @property
    def uri(self) -> str:
        return format_uri(self.repo_id, self.revision, self.subfolder)

    def at(self, commit: str) -> str:
        """The URI of this target pinned to `commit` (for messages about that commit's files)."""
        return format_uri(self.repo_id, commit, self.subfolder)

    def api(self) -> HfApi:
        return HfApi(endpoint=self.endpoint, token=self.token, library_name="lora_convert",
                     library_version=__version__)

    def sends_token(self) -> bool:
        """Whether requests carry a token: explicit, or HF_TOKEN / the saved login."""
        if isinstance(self.token, str) or self.token is True:
            return True
        return self.token is None and not constants.HF_HUB_DISABLE_IMPLICIT_TOKEN and get_token() is not None


def _target(repo_id: str, revision: str | None, token: str | bool | None, endpoint: str | None) -> Target:
    subfolder = ""
    if is_hub_uri(repo_id):
        uri = parse_uri(repo_id)
        if revision and uri.revision and revision != uri.revision:
            raise BadInputError(f"two revisions given: {uri.revision!r} in the URI and {revision!r}", repo_id)
        repo_id, revision, subfolder = uri.repo_id, revision or uri.revision, uri.subfolder
    _check_repo_id(repo_id)
    if revision and not _plain_revision(revision):
        raise BadInputError(f"invalid revision {revision!r}: a branch, tag or commit sha, without empty, '.' or "
                            "'..' parts", repo_id)
    # The client reads HF_ENDPOINT once, at import, into constants.ENDPOINT: read it here at call
    # time and pass it explicitly everywhere, so every call agrees on one endpoint.
    return Target(repo_id, revision or None, (endpoint or constants.ENDPOINT).rstrip("/"), token, subfolder)


def _plain_revision(revision: str) -> bool:
    """A revision name that is a relative path of ordinary parts (git refs cannot be otherwise)."""
    parts = revision.split("/")
    return "\\" not in revision and ":" not in revision and all(p not in ("", ".", "..") for p in parts)


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise BadInputError(f"invalid repo id: {str(exc).splitlines()[0]}", repo_id) from None


def format_uri(repo_id: str, revision: str | None = None, subfolder: str = "") -> str:
    """The ``hf://`` URI that parse_uri reads back as (repo_id, revision, subfolder).

    A '/' (or '%') in a revision is percent-encoded, as huggingface_hub writes it, so that it is
    not taken for the start of the path; ``refs/pr/N`` stays as it is.

    >>> format_uri("me/loras", "v1", "styles/ink")
    'hf://me/loras@v1/styles/ink'
    >>> format_uri("me/loras", "feature/x")
    'hf://me/loras@feature%2Fx'
    """
    if revision and not _SPECIAL_REF.fullmatch(revision):
        revision = revision.replace("%", "%25").replace("/", "%2F")
    return HF_SCHEME + repo_id + (f"@{revision}" if revision else "") + (f"/{subfolder}" if subfolder else "")


def parse_uri(uri: str) -> Target:
    """``hf://owner/repo[@revision][/path/in/repo]`` -> Target (endpoint and token from the environment).

    The grammar is huggingface_hub's (HfFileSystem's): the revision comes right after the repo id,
    a revision holding '/' is written with %2F (``refs/pr/N`` as is). An '@' after the path
    (``hf://owner/repo/sub@v1``) is refused rather than read as part of a folder name.

    >>> parse_uri("hf://me/adapter@v1").revision
    'v1'
    >>> parse_uri("hf://me/adapter").revision is None
    True
    >>> parse_uri("hf://me/sd-loras@v1/styles/ink").subfolder
    'styles/ink'
    """
    if not is_hub_uri(uri):
        raise BadInputError(f"not a Hub URI (expected {URI_FORM})", uri)
    if uri[len(HF_SCHEME):].split("/")[0] in _OTHER_REPO_TYPES:
        raise BadInputError("only model repos hold adapters (no datasets/, spaces/, kernels/ or buckets/ prefix)", uri)
    try:
        parsed = parse_hf_uri(uri)
    except HfUriError as exc:
        raise BadInputError(f"{exc.msg.splitlines()[0]} (expected {URI_FORM})", uri) from None
    _check_subfolder(parsed.path_in_repo, uri)
    return Target(parsed.id, parsed.revision, constants.ENDPOINT.rstrip("/"), None, parsed.path_in_repo)


def _check_subfolder(path: str, uri: str) -> None:
    if "@" in path:
        raise BadInputError(f"'@' after the path: the revision goes right after the repo id ({URI_FORM}, "
                            "e.g. hf://me/loras@v1/styles/ink)", uri)
    if {".", ".."} & set(path.split("/")):
        raise BadInputError("'.' and '..' are not allowed in the path inside the repo", uri)


# --------------------------------------------------------------------------- retries and errors


def _retry_policy() -> tuple[int, float]:
    """(extra attempts, first delay in seconds) from the environment."""
    try:
        retries = int(os.environ.get(RETRIES_ENV, DEFAULT_RETRIES))
        base = float(os.environ.get(BACKOFF_ENV, DEFAULT_BACKOFF))
    except ValueError:
        raise BadInputError(f"{RETRIES_ENV} must be an integer and {BACKOFF_ENV} a number of seconds") from None
    return max(retries, 0), max(base, 0.0)


def _root(exc: BaseException) -> BaseException:
    """The error behind the client's "not in the local cache either" wrappers."""
    while isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None) if isinstance(exc, HfHubHTTPError) else None
    return getattr(response, "status_code", None)


def _short_download(exc: BaseException) -> bool:
    """The client's "Consistency check failed" (fewer bytes than announced, after its own retries)."""
    return type(exc) is OSError and str(exc).startswith("Consistency check failed")


def _transient(exc: BaseException) -> bool:
    """Worth another try: dropped/refused connections, timeouts, short downloads, 5xx, 429, 408."""
    return isinstance(exc, httpx2.TransportError) or _status(exc) in TRANSIENT_STATUS or _short_download(exc)


def _delay(exc: BaseException, base: float, attempt: int) -> float:
    retry_after = exc.response.headers.get("Retry-After", "") if _status(exc) else ""
    if retry_after.strip().isdigit():  # a 429/503 that says when: honour it, within reason
        return min(float(retry_after), MAX_DELAY)
    return min(base * 2**attempt, MAX_DELAY)


def _call(t: Target, what: str, fn: Callable[[], T]) -> T:
    """Run one Hub operation, retrying transient failures, and turn errors into one line.

    The client retries some requests itself (tree listings, LFS transfers, a 5xx on HEAD) but
    not repo_info, commits, branch creation or a 5xx on GET /resolve: retrying here covers them.
    """
    retries, base = _retry_policy()
    for attempt in range(retries + 1):
        try:
            return fn()
        except LoraConvertError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated below, or re-raised untouched
            cause = _root(exc)
            if attempt < retries and _transient(cause):
                time.sleep(_delay(cause, base, attempt))
                continue
            error = translate(cause, t, what, attempt + 1)
            if error is None:
                raise
            raise error from exc
    raise AssertionError("unreachable")


def translate(exc: BaseException, t: Target, what: str, attempts: int = 1) -> LoraConvertError | None:
    """The one-line lora_convert error for a client error, or None when it is not a Hub error."""
    if _short_download(exc):
        return HubNetworkError(f"the download kept ending early while trying to {what}, {attempts} attempt(s); "
                               "check the network and run the command again (it resumes)", t.uri)
    for kinds, make in _TRANSLATIONS:
        if isinstance(exc, kinds):
            return make(exc, t, what, attempts)
    return None


def _not_found(exc, t: Target, what, attempts) -> HubError:
    if not t.sends_token():
        return HubNotFoundError(f"repository not found on {t.endpoint} (no token was sent: if it is private, "
                                f"{LOGIN_HINT})", t.uri)
    return HubNotFoundError(f"repository not found on {t.endpoint}, or this token cannot see it", t.uri)


def _http(exc, t: Target, what, attempts) -> HubError:
    status = _status(exc)
    server = " ".join(str(getattr(exc, "server_message", None) or "").split())
    detail = f" ({server})" if server else ""
    if status == 401:
        return HubAuthError(f"authentication failed while trying to {what}: the token is missing or invalid{detail}; "
                            f"{LOGIN_HINT}", t.uri)
    if status == 403:
        return HubAuthError(f"permission denied while trying to {what}{detail}: this token cannot write to the "
                            f"repo; use a token with write access ({LOGIN_HINT})", t.uri)
    if status == 404:
        return HubNotFoundError(f"not found (HTTP 404) while trying to {what}{detail}", t.uri)
    if status == 412:
        return HubError(f"the branch moved while trying to {what} (someone pushed meanwhile); run the push again",
                        t.uri)
    if status in TRANSIENT_STATUS:
        return HubNetworkError(f"server error HTTP {status} from {t.endpoint} while trying to {what}, "
                               f"{attempts} attempt(s){detail}; the Hub may be down, try again later", t.uri)
    return HubError(f"the Hub refused to {what}: HTTP {status}{detail}", t.uri)


def _transport(exc, t: Target, what, attempts) -> HubError:
    if isinstance(exc, httpx2.ConnectError):
        how = "cannot connect to"
    elif isinstance(exc, httpx2.TimeoutException):
        how = "timed out talking to"
    else:
        how = "the connection dropped talking to"
    return HubNetworkError(f"{how} {t.endpoint} while trying to {what}, {attempts} attempt(s) ({type(exc).__name__}: "
                           f"{exc}); check the network, HF_ENDPOINT or --endpoint", t.uri)


_TRANSLATIONS: list[tuple[type | tuple[type, ...], Callable[..., LoraConvertError]]] = [
    (GatedRepoError, lambda e, t, w, a: HubAuthError(
        f"gated repository: accept its conditions on the Hub, then {LOGIN_HINT}", t.uri)),
    (RevisionNotFoundError, lambda e, t, w, a: HubNotFoundError(
        f"revision {t.revision!r} not found: not a branch, tag or commit of {t.repo_id}", t.uri)),
    (RepositoryNotFoundError, _not_found),
    (EntryNotFoundError, lambda e, t, w, a: HubNotFoundError(f"file not found while trying to {w}", t.uri)),
    (HfHubHTTPError, _http),
    (httpx2.TransportError, _transport),
    (LocalTokenNotFoundError, lambda e, t, w, a: HubAuthError(f"no token found; {LOGIN_HINT}", t.uri)),
    (OfflineModeIsEnabled, lambda e, t, w, a: HubNetworkError(
        f"HF_HUB_OFFLINE is set, so the Hub cannot be asked to {w}", t.uri)),
    (LocalEntryNotFoundError, lambda e, t, w, a: HubNetworkError(
        f"could not reach {t.endpoint} to {w} and nothing usable is cached", t.uri)),
    (HFValidationError, lambda e, t, w, a: BadInputError(str(e).splitlines()[0], t.uri)),
]


# --------------------------------------------------------------------------- file digests and the cache


def _digest(path: Path, algorithm: str, prefix: bytes = b"") -> str:
    h = hashlib.new(algorithm, prefix)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub lists as the ``oid`` of a non-LFS file.

    >>> git_blob_sha1(b"")
    'e69de29bb2d1d6434b8b29ae775ad8c2e48c5391'
    """
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer git stores for an LFS file: its git oid is the one the repo tree lists."""
    return b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n" % (sha256.encode(), size)


def matches(entry: RepoFile, path: Path) -> bool:
    """Does the local file have the size and hash the repo tree lists for it?

    LFS files are checked against their sha256; others against their git blob sha1. The client
    itself checks only the size, so a corrupted transfer would otherwise go unnoticed. A listing
    without LFS details (the tree the client caches) gives an LFS file's git oid only: that is the
    oid of its LFS pointer, which the content's sha256 and size determine.
    """
    size = path.stat().st_size
    if entry.lfs is not None:
        return size == entry.lfs.size and _digest(path, "sha256") == entry.lfs.sha256
    if size != entry.size:
        return False
    if _digest(path, "sha1", b"blob %d\0" % size) == entry.blob_id:
        return True
    return git_blob_sha1(_lfs_pointer(_digest(path, "sha256"), size)) == entry.blob_id


def evict(cached: Path) -> bool:
    """Remove a file from the HF cache (the snapshot entry and the blob behind it); False when the
    cache would not let us (a read-only shared cache).

    The client serves a commit's files from the cache without asking the Hub again, so a
    corrupt blob left there would be served forever; gone, the next download fetches it anew.
    """
    try:
        blob = cached.resolve() if cached.is_symlink() else None
        cached.unlink(missing_ok=True)
        if blob is not None:
            blob.unlink(missing_ok=True)
    except OSError:
        return False
    return True


class _TerminalOnly(hf_tqdm):
    """The client's progress bars, shown only on a terminal like lora_convert's own (not in logs)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("disable", None)  # tqdm: None means "only when the output is a TTY"
        super().__init__(*args, **kwargs)


Selector = Callable[[list[str]], list[str]]


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


def offline_variable() -> str:
    """The variable that decides offline mode, for messages too: HF_HUB_OFFLINE when it is set,
    else the older TRANSFORMERS_OFFLINE when that one is."""
    return "TRANSFORMERS_OFFLINE" if os.environ.get("TRANSFORMERS_OFFLINE") and not os.environ.get(
        "HF_HUB_OFFLINE") else "HF_HUB_OFFLINE"


def offline_mode() -> bool:
    """Is HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set, now or when the client was imported?

    The client reads the variable once, at import; a program that sets it later means it too.
    """
    value = os.environ.get(offline_variable()) or ""
    return constants.is_offline_mode() or value.upper() in constants.ENV_VARS_TRUE_VALUES


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
        cause = _root(exc.__cause__) if exc.__cause__ else exc
        if not isinstance(cause, httpx2.TransportError) or isinstance(cause, httpx2.ProxyError):
            raise  # the Hub answered (5xx...), or a proxy is misconfigured: not a reason to go offline
        snap = cached(t, select, cache, exc.problem)
        log.warning(f"warning: {t.uri}: cannot reach {t.endpoint} ({type(cause).__name__}); using commit "
                    f"{snap.commit[:12]} from the HF cache")
        return snap


def _download(t: Target, select: Selector, cache: Path) -> Snapshot:
    api = t.api()
    # The client's session has no timeout of its own: a silent endpoint (a firewall dropping
    # packets) would hang here forever instead of timing out into the cache fallback.
    info = _call(t, "look up the revision", lambda: api.repo_info(t.repo_id, revision=t.revision,
                                                                  timeout=constants.HF_HUB_ETAG_TIMEOUT))
    names = _pick(t, select, sorted(s.rfilename for s in info.siblings or []))
    paths = [_in_repo(t, n) for n in names]
    listed = _call(t, "list the repo's files", lambda: api.get_paths_info(t.repo_id, paths, revision=info.sha))
    entries = {e.path: e for e in listed if isinstance(e, RepoFile)}
    if sorted(entries) != sorted(paths):  # every file we hand out must have a checksum to verify
        raise HubError(f"the repo tree does not describe {sorted(set(paths) - set(entries))}", t.uri)
    path = _call(t, "download the files", lambda: snapshot_download(
        t.repo_id, revision=info.sha, allow_patterns=[glob.escape(p) for p in paths], cache_dir=cache,
        token=t.token, endpoint=t.endpoint, library_name="lora_convert", library_version=__version__,
        tqdm_class=_TerminalOnly))
    _record_ref(cache, t, info.sha)  # only once its files are cached: offline runs then find them all
    return Snapshot(Path(path) / t.subfolder, info.sha, tuple(names), {n: entries[p] for n, p in zip(names, paths)})


def cached(t: Target, select: Selector, cache: Path, why: str) -> Snapshot:
    """`t` as the HF cache holds it, with no request: for HF_HUB_OFFLINE and an unreachable endpoint.

    The revision is a full commit sha, or a branch or tag whose commit the cache recorded. The
    tree the client cached for that commit lists the repo and gives each file's checksum; without
    it, only the snapshot's own files are known, and they are used unchecked (LoRA-Mini files
    still check every tensor when loaded). `why` starts the error when something is not cached.
    """
    commit, snapshot = _cached_snapshot(t, cache, why)
    tree = _cached_tree(t, commit, cache)
    try:
        names = _pick(t, select, sorted(tree) if tree is not None else _files_in(snapshot))
    except LoraConvertError:
        if tree is not None:
            raise
        raise _not_cached(t, why, cache) from None  # nothing lists the repo: the files may just not be cached
    folder = snapshot / t.subfolder
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise _not_cached(t, why, cache, missing)
    return Snapshot(folder, commit, tuple(names), {n: tree[_in_repo(t, n)] for n in names} if tree else {})


def _storage(cache: Path, t: Target) -> Path:
    return cache / repo_folder_name(repo_id=t.repo_id, repo_type="model")


def _cached_snapshot(t: Target, cache: Path, why: str) -> tuple[str, Path]:
    """(commit, snapshot folder) for `t.revision`, read from the cache's refs/ like the client does."""
    revision = t.revision or constants.DEFAULT_REVISION
    commit = revision if _COMMIT_SHA.fullmatch(revision) else None
    with contextlib.suppress(OSError, ValueError):
        commit = commit or (_storage(cache, t) / "refs" / revision).read_text().strip()
    if not commit or not _COMMIT_SHA.fullmatch(commit):  # only a sha may name a folder we read from
        raise _not_cached(t, why, cache)
    snapshot = _storage(cache, t) / "snapshots" / commit
    if not snapshot.is_dir():
        raise _not_cached(t, why, cache)
    return commit, snapshot


def _cached_tree(t: Target, commit: str, cache: Path) -> dict[str, RepoFile] | None:
    """The repo listing snapshot_download cached for `commit` (path -> size and git oid), if any."""
    try:
        return {f.path: f for f in get_cached_repo_tree(t.repo_id, revision=commit, cache_dir=cache)}
    except CachedRepoTreeNotFoundError:
        return None


def _files_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _not_cached(t: Target, why: str, cache: Path, missing: list[str] | None = None) -> HubNetworkError:
    revision = t.revision or constants.DEFAULT_REVISION
    what = (f"the cached revision {revision!r} lacks {', '.join(missing)}" if missing
            else f"revision {revision!r} is not in the HF cache")
    return HubNetworkError(f"{why}, and {what} ({cache}); run the command once with network access to cache it",
                           t.uri)


def _record_ref(cache: Path, t: Target, commit: str) -> None:
    """Record the commit a branch or tag named, as the client does, so that an offline run finds it.

    snapshot_download records it only when given the branch or tag, and it is given the pinned
    sha. Best effort, like the client: a read-only cache must not fail a download.
    """
    revision = t.revision or constants.DEFAULT_REVISION
    if _COMMIT_SHA.fullmatch(revision) or not _plain_revision(revision):
        return  # never a path that could leave refs/ (absolute, .., a Windows separator)
    ref = _storage(cache, t) / "refs" / revision
    with contextlib.suppress(OSError, LoraConvertError):
        if not ref.is_file() or ref.read_text() != commit:
            with atomic_file(ref) as tmp:
                tmp.write_text(commit)  # no newline: the client reads the file as is


def _pick(t: Target, select: Selector, listing: list[str]) -> list[str]:
    """`select` applied to the files directly in `t.subfolder` (the top when none), named relative to it."""
    prefix = f"{t.subfolder}/" if t.subfolder else ""
    inside = [n[len(prefix):] for n in listing if n.startswith(prefix)]
    if prefix and not inside:
        raise HubNotFoundError(f"no folder {t.subfolder!r} in the repo at this revision", t.uri)
    return select([n for n in inside if "/" not in n])


def _in_repo(t: Target, name: str) -> str:
    return f"{t.subfolder}/{name}" if t.subfolder else name


def _where(t: Target) -> str:
    return f"in {t.subfolder}/" if t.subfolder else "at the top of the repo"


def _mini_files(t: Target) -> Selector:
    def select(names: list[str]) -> list[str]:
        if container.FILE_NAME not in names:
            kind = "folder" if t.subfolder else "repo"
            raise BadInputError(f"not a LoRA-Mini {kind}: no {container.FILE_NAME} {_where(t)} at this revision (to "
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


# --------------------------------------------------------------------------- pull and hf:// paths


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


def verify_mini(folder: Path, where: str) -> tuple[container.MiniAdapter, list[dict]]:
    """Load a LoRA-Mini adapter and every module and passthrough tensor, so every check runs.

    Returns the adapter and each module's outer spec. Errors name `where` (a path or hf:// URI).
    """
    try:
        mini = container.load(folder)
        outers = [m.outer for m in mini.modules()]
        for _ in mini.passthrough():
            pass
    except LoraConvertError as exc:
        raise type(exc)(exc.problem, where) from None
    return mini, outers


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
    t = _target(repo_id, revision, token, endpoint)
    snap = fetch(t, _mini_files(t), cache_dir)
    with atomic_dir(dest) as tmp:
        for name in snap.names:
            shutil.copyfile(snap.path / name, tmp / name)
        snap.check(tmp, t)
        mini, _ = verify_mini(tmp, t.at(snap.commit))
    return PullResult(t.repo_id, t.revision, snap.commit, Path(dest), len(mini), t.subfolder)


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
    t = _target(uri, None, token, endpoint)
    snap = fetch(t, choosers[expect](t), cache_dir)
    snap.check(snap.path, t)
    return snap.path


def _auto(t: Target) -> Selector:
    mini, adapter = _mini_files(t), _adapter_files(t)
    return lambda names: mini(names) if container.FILE_NAME in names else adapter(names)


# --------------------------------------------------------------------------- push


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


def files_to_push(local: Path, repo_id: str) -> dict[str, bytes]:
    """Verify a local LoRA-Mini adapter; the exact bytes of the three files of the commit.

    `local` is a LoRA-Mini directory or a single LoRA-Mini ``.safetensors`` file (its config is
    then generated). A README.md in the directory is kept (given the metadata it lacks) unless
    lora_convert generated it.
    """
    mini, outers = verify_mini(local, str(local))
    report = stored_report(mini)  # modules were just checked; this reads the stored fidelity
    file = container.resolve_file(local)
    config, readme = local / container.CONFIG_NAME, local / README
    return {
        container.FILE_NAME: file.read_bytes(),
        container.CONFIG_NAME: config.read_bytes() if local.is_dir() and config.is_file()
        else modelcard.summary_config(mini, report).encode(),
        README: modelcard.readme_for(repo_id, mini, report, outers,
                                     readme.read_text(encoding="utf-8") if local.is_dir() and readme.is_file()
                                     else None).encode(),
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
    refs = _call(t, "list the repo's branches", lambda: api.list_repo_refs(t.repo_id))
    if t.revision in {b.name for b in refs.branches}:
        return False
    if t.revision in {tag.name for tag in refs.tags} or _COMMIT_SHA.fullmatch(t.revision):
        raise BadInputError(f"--revision must name a branch to push to; {t.revision!r} is a tag or a commit", t.uri)
    _call(t, "create the branch", lambda: api.create_branch(t.repo_id, branch=t.revision, exist_ok=True))
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

    return _call(t, "commit the files", once)


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
    t = _target(repo_id, revision, token, endpoint)
    t = dataclasses.replace(t, revision=t.revision or constants.DEFAULT_REVISION)
    if t.subfolder:  # the model card is the repo's README: a LoRA-Mini push owns the top of the repo
        raise BadInputError("push uploads to the top of the repo; a folder inside it is not supported", repo_id)
    files = files_to_push(local, t.repo_id)
    if offline_mode():
        raise HubNetworkError(f"{offline_variable()} is set, so nothing can be pushed; unset it to push", t.uri)
    api = t.api()
    t = dataclasses.replace(t, repo_id=_call(t, "create the repository", lambda: _ensure_repo(api, t, private)))
    created = _ensure_branch(api, t)
    commit, changed = _commit(api, t, files, commit_message or DEFAULT_MESSAGE)
    return PushResult(t.repo_id, t.revision, commit, f"{t.endpoint}/{t.repo_id}/tree/{t.revision}", not changed,
                      created)
