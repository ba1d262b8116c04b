"""Where an adapter lives on the Hub: ``hf://owner/repo[@revision][/path/in/repo]`` and the Target it names.

The grammar is huggingface_hub's (HfFileSystem's): the revision comes right after the repo id, a
revision holding '/' is written with %2F (``refs/pr/N`` as is).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from huggingface_hub import HfApi, constants, get_token, parse_hf_uri
from huggingface_hub.errors import HfUriError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from .. import __version__
from ..errors import BadInputError

HF_SCHEME = "hf://"
URI_FORM = f"{HF_SCHEME}owner/repo[@revision][/path/in/repo]"
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
# Revisions with a '/' that huggingface_hub's URI parser takes verbatim; other ones are written with %2F.
_SPECIAL_REF = re.compile(r"refs/(?:convert/[\w.-]+|pr/\d+)")
_OTHER_REPO_TYPES = frozenset({"datasets", "spaces", "kernels", "buckets"})


def is_hub_uri(path: str | os.PathLike) -> bool:
    return isinstance(path, str) and path.startswith(HF_SCHEME)


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

    def in_repo(self, name: str) -> str:
        """The repo path of `name`, a file directly in the subfolder."""
        return f"{self.subfolder}/{name}" if self.subfolder else name


def target(repo_id: str, revision: str | None, token: str | bool | None, endpoint: str | None) -> Target:
    """The Target for a repo id or ``hf://`` URI and the options given with it; BadInputError when invalid."""
    subfolder = ""
    if is_hub_uri(repo_id):
        uri = parse_uri(repo_id)
        if revision and uri.revision and revision != uri.revision:
            raise BadInputError(f"two revisions given: {uri.revision!r} in the URI and {revision!r}", repo_id)
        repo_id, revision, subfolder = uri.repo_id, revision or uri.revision, uri.subfolder
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise BadInputError(f"invalid repo id: {str(exc).splitlines()[0]}", repo_id) from None
    if revision and not plain_revision(revision):
        raise BadInputError(f"invalid revision {revision!r}: a branch, tag or commit sha, without empty, '.' or "
                            "'..' parts", repo_id)
    # The client reads HF_ENDPOINT once, at import, into constants.ENDPOINT: read it here at call
    # time and pass it explicitly everywhere, so every call agrees on one endpoint.
    return Target(repo_id, revision or None, (endpoint or constants.ENDPOINT).rstrip("/"), token, subfolder)


def plain_revision(revision: str) -> bool:
    """A revision name that is a relative path of ordinary parts (git refs cannot be otherwise), so
    that the cache's ``refs/<revision>`` stays inside ``refs/``."""
    parts = revision.split("/")
    return "\\" not in revision and ":" not in revision and all(p not in ("", ".", "..") for p in parts)


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

    An '@' after the path (``hf://owner/repo/sub@v1``) is refused rather than read as part of a
    folder name.

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
    if "@" in parsed.path_in_repo:
        raise BadInputError(f"'@' after the path: the revision goes right after the repo id ({URI_FORM}, "
                            "e.g. hf://me/loras@v1/styles/ink)", uri)
    if {".", ".."} & set(parsed.path_in_repo.split("/")):
        raise BadInputError("'.' and '..' are not allowed in the path inside the repo", uri)
    return Target(parsed.id, parsed.revision, constants.ENDPOINT.rstrip("/"), None, parsed.path_in_repo)
