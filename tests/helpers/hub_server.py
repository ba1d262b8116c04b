"""A loopback, in-memory, Hub-compatible HTTP server for tests.

The real ``huggingface_hub`` client (written against 2.4.0) talks to it over plain HTTP,
unpatched: pass ``endpoint=srv.endpoint`` to ``HfApi``, ``hf_hub_download`` and
``snapshot_download`` (the client reads ``HF_ENDPOINT`` once, at import time).

    with HubServer(tokens={"hf_w": "write", "hf_r": "read"}) as srv:
        api = HfApi(endpoint=srv.endpoint, token="hf_w")
        api.create_repo("me/adapter")
        srv.inject(r"/resolve/", status=500, times=2)   # transient Hub outage
        ...
        assert srv.requests_to(r"/resolve/")          # what the client actually sent

Stdlib only. Repos (model/dataset/space) have branches, tags and commits with 40-hex
oids; files are git blobs or, following the repo's ``.gitattributes``/size/binary
rules the Hub applies, LFS objects uploaded through the basic LFS batch protocol.
Xet is not served: the client must run with ``HF_HUB_DISABLE_XET=1`` (see
``isolate_hf_client``), otherwise it uploads LFS files to Xet, which this server lacks.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import json
import re
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
ROLES = ("read", "write")

# What a repo freshly created on the Hub contains (abridged): it decides which paths go to LFS.
DEFAULT_GITATTRIBUTES = b"""\
*.7z filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.gguf filter=lfs diff=lfs merge=lfs -text
*.gz filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.npz filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.pickle filter=lfs diff=lfs merge=lfs -text
*.pkl filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.tar filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
*tfevents* filter=lfs diff=lfs merge=lfs -text
"""


# --------------------------------------------------------------------------- content model


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob, which the Hub reports as `oid` and as the ETag of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def iso(date: datetime) -> str:
    return date.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"  # the one format the client parses


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Blob:
    """File content as one commit holds it."""

    data: bytes
    lfs: bool
    sha256: str
    git_oid: str  # oid of what git stores: the content itself, or the LFS pointer to it

    @classmethod
    def make(cls, data: bytes, lfs: bool) -> Blob:
        sha = hashlib.sha256(data).hexdigest()
        return cls(data, lfs, sha, git_blob_oid(lfs_pointer(sha, len(data)) if lfs else data))

    @property
    def etag(self) -> str:
        # The client names cache blobs after this and compares it with its own oid to skip no-op uploads.
        return self.sha256 if self.lfs else self.git_oid

    def lfs_info(self, sha_key: str) -> dict | None:
        if not self.lfs:
            return None
        pointer_size = len(lfs_pointer(self.sha256, len(self.data)))
        return {sha_key: self.sha256, "size": len(self.data), "pointerSize": pointer_size}

    def tree_entry(self, path: str) -> dict:
        entry = {"type": "file", "oid": self.git_oid, "size": len(self.data), "path": path}
        if self.lfs:
            entry["lfs"] = self.lfs_info("oid")
        return entry

    def sibling(self, path: str, blobs: bool) -> dict:
        if not blobs:
            return {"rfilename": path}
        return {"rfilename": path, "size": len(self.data), "blobId": self.git_oid, "lfs": self.lfs_info("sha256")}


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    files: Mapping[str, Blob]
    title: str
    message: str
    date: datetime


class HubError(Exception):
    """An error response, shaped the way `hf_raise_for_status` recognises it."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict | None = None, extra: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}
        self.extra = extra or {}  # more fields for the JSON body

    @classmethod
    def repo_not_found(cls, anonymous: bool) -> HubError:
        # Like the Hub: 401 for anonymous callers (the repo may be private), 404 otherwise.
        return cls(401 if anonymous else 404, "Repository not found", "RepoNotFound")

    @classmethod
    def entry_not_found(cls, commit: Commit, message: str = "Entry not found") -> HubError:
        # X-Repo-Commit lets the client cache the file's absence for that commit.
        return cls(404, message, "EntryNotFound", {"X-Repo-Commit": commit.oid})


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: datetime = field(default_factory=_now)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # pull requests live here as "refs/pr/N"
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        """A branch, a tag or a full commit oid (the revisions the Hub accepts)."""
        oid = self.branches.get(revision) or self.tags.get(revision)
        if oid is None and revision in self.commits:
            oid = revision
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]

    def head(self, branch: str) -> Commit:
        if branch not in self.branches:
            self.resolve(branch)  # a tag or a commit: exists, but cannot be committed to
            raise HubError(400, f"Invalid rev id: {branch} is not a branch")
        return self.commits[self.branches[branch]]

    def history(self, revision: str) -> Iterator[Commit]:
        commit: Commit | None = self.resolve(revision)
        while commit is not None:
            yield commit
            commit = self.commits[commit.parent] if commit.parent else None

    @property
    def url_path(self) -> str:
        return URL_PREFIXES[self.repo_type] + self.repo_id


class HubStore:
    """Every repo and LFS object the server holds. Callers hold `lock` around any use."""

    def __init__(self, user: str, lfs_threshold: int):
        self.user = user
        self.lfs_threshold = lfs_threshold
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content
        self._counter = itertools.count()

    def get(self, repo_type: str, repo_id: str) -> Repo | None:
        return self.repos.get((repo_type, repo_id))

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_type, repo_id, private)
        self.repos[(repo_type, repo_id)] = repo
        # The Hub seeds every repo with an initial commit holding .gitattributes.
        files = {".gitattributes": Blob.make(DEFAULT_GITATTRIBUTES, lfs=False)}
        self.add_commit(repo, "main", files, "initial commit", "", parent=None)
        return repo

    def add_commit(
        self, repo: Repo, branch: str, files: Mapping[str, Blob], title: str, message: str, parent: str | None
    ) -> Commit:
        seed = json.dumps([parent, sorted((p, b.etag) for p, b in files.items()), title, next(self._counter)])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, dict(files), title, message, _now())
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def wants_lfs(self, commit: Commit, path: str, size: int, sample: bytes) -> bool:
        """The Hub's rule: big files, binary files and paths `.gitattributes` marks `filter=lfs`."""
        if size >= self.lfs_threshold or b"\0" in sample:
            return True
        existing = commit.files.get(path)
        if existing is not None and existing.lfs:
            return True
        attributes = commit.files.get(".gitattributes")
        return attributes is not None and _matches_lfs_rule(attributes.data, path)

    def blob_for(self, commit: Commit, path: str, data: bytes) -> Blob:
        lfs = len(data) > 0 and self.wants_lfs(commit, path, len(data), data[:512])
        if lfs:
            self.lfs_objects[hashlib.sha256(data).hexdigest()] = data
        return Blob.make(data, lfs)


def _matches_lfs_rule(gitattributes: bytes, path: str) -> bool:
    for line in gitattributes.decode(errors="replace").splitlines():
        pattern, *attributes = line.split()
        if "filter=lfs" not in attributes:
            continue
        pattern = pattern.lstrip("/")
        target = path if "/" in pattern else path.rsplit("/", 1)[-1]  # git matches bare names at any depth
        if fnmatch.fnmatchcase(target, pattern):
            return True
    return False


def list_tree(files: Mapping[str, Blob], base: str, recursive: bool) -> list[dict] | None:
    """Tree entries under `base` (directories included), or None when `base` is no directory."""
    prefix = base.strip("/") + "/" if base.strip("/") else ""
    entries: list[dict] = []
    seen_dirs: set[str] = set()
    for path, blob in sorted(files.items()):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        depth = len(parts) if recursive else 1
        for i in range(1, min(depth + 1, len(parts))):
            directory = prefix + "/".join(parts[:i])
            if directory not in seen_dirs:
                seen_dirs.add(directory)
                entries.append({"type": "directory", "oid": _tree_oid(files, directory), "size": 0, "path": directory})
        if len(parts) <= depth:
            entries.append(blob.tree_entry(path))
    return entries if entries or not prefix else None


def _tree_oid(files: Mapping[str, Blob], directory: str) -> str:
    children = sorted(f"{p}:{b.git_oid}" for p, b in files.items() if p.startswith(directory + "/"))
    return hashlib.sha1("\n".join(children).encode()).hexdigest()


# --------------------------------------------------------------------------- HTTP model


@dataclass
class Request:
    method: str  # HEAD is routed as GET
    segments: list[str]  # percent-decoded path segments: a quoted "refs%2Fpr%2F1" stays one segment
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: bytes
    role: str | None = None  # "read", "write", or None when anonymous

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err

    def flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[-1].lower() in ("1", "true")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_response(
    obj: Any, status: int = 200, headers: dict | None = None, content_type: str = "application/json"
) -> Response:
    return Response(status, json.dumps(obj).encode(), {"Content-Type": content_type, **(headers or {})})


def error_response(err: HubError) -> Response:
    headers = {"X-Error-Message": err.message, **err.headers}
    if err.code:
        headers["X-Error-Code"] = err.code
    return json_response({"error": err.message, **err.extra}, err.status, headers)


@dataclass
class Fault:
    """One injected failure; see `HubServer.inject`."""

    pattern: re.Pattern
    method: str | None
    status: int | None
    drop: bool
    truncate: bool
    corrupt: bool
    delay: float
    headers: dict[str, str]
    remaining: int | None  # None: never runs out
    hits: int = 0

    def take(self, method: str, path: str) -> bool:
        if self.remaining == 0 or (self.method and self.method != method) or not self.pattern.search(path):
            return False
        self.hits += 1
        if self.remaining is not None:
            self.remaining -= 1
        return True

    @property
    def kind(self) -> str:
        if self.drop:
            return "drop"
        if self.status is not None:
            return f"status:{self.status}"
        return "truncate" if self.truncate else "corrupt" if self.corrupt else "delay"


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str  # percent-decoded, without the query string
    query: str
    status: int | None  # None: the connection was dropped before any response
    fault: str | None  # Fault.kind of the fault applied, if any
    headers: Mapping[str, str]  # names lower-cased


# --------------------------------------------------------------------------- Hub API


class HubApp:
    """Maps requests to the store. Handlers take (request, repo_type, repo_id, args) or (request)."""

    REPO_ACTIONS: dict[tuple[str, str | None], str] = {
        ("GET", None): "repo_info",
        ("GET", "revision"): "repo_info",
        ("GET", "tree"): "tree",
        ("POST", "paths-info"): "paths_info",
        ("GET", "refs"): "refs",
        ("GET", "commits"): "commits",
        ("POST", "preupload"): "preupload",
        ("POST", "commit"): "commit",
        ("POST", "branch"): "create_branch",
        ("DELETE", "branch"): "delete_branch",
        ("POST", "tag"): "create_tag",
        ("DELETE", "tag"): "delete_tag",
    }

    def __init__(self, store: HubStore, tokens: dict[str, str] | None, endpoint: Callable[[], str]):
        self.store = store
        self.tokens = tokens
        self.endpoint = endpoint

    def handle(self, req: Request) -> Response:
        try:
            req.role = self._role(req.headers)
            with self.store.lock:
                return self._route(req)
        except HubError as err:
            return error_response(err)
        except (KeyError, ValueError, TypeError, AttributeError) as err:  # a body missing fields, or mistyped
            return error_response(HubError(400, f"Malformed request: {err!r}"))
        except Exception as err:  # a server bug: answer rather than drop, and leave a trace in the test's stderr
            traceback.print_exc()
            return error_response(HubError(500, f"Test server error: {err!r}"))

    # ----------------------------------------------------------------- auth

    def _role(self, headers: Mapping[str, str]) -> str | None:
        if self.tokens is None:
            return "write"  # auth disabled: everyone may do anything
        auth = headers.get("Authorization")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            # This exact message makes the client raise a plain HfHubHTTPError, not RepositoryNotFoundError.
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _readable(self, req: Request, repo_type: str, repo_id: str) -> Repo:
        repo = self.store.get(repo_type, repo_id)
        if repo is None or (repo.private and req.role is None):
            raise HubError.repo_not_found(anonymous=req.role is None)
        return repo

    def _writable(self, req: Request, repo_type: str, repo_id: str) -> Repo:
        repo = self._readable(req, repo_type, repo_id)
        self._require_write(req)
        return repo

    @staticmethod
    def _require_write(req: Request) -> None:
        if req.role is None:
            raise HubError(401, "You must be authenticated to write")
        if req.role != "write":
            raise HubError(403, "You don't have the rights to write with a read-only token")

    # ----------------------------------------------------------------- routing

    def _route(self, req: Request) -> Response:
        segs = req.segments
        if segs[:1] == ["api"]:
            return self._route_api(req, segs[1:])
        if segs[:1] == ["__lfs"]:
            return self._route_lfs_storage(req, segs[1:])
        return self._route_repo_url(req, segs)

    def _route_api(self, req: Request, segs: list[str]) -> Response:
        plain = {
            ("POST", "repos/create"): self.create_repo,
            ("DELETE", "repos/delete"): self.delete_repo,
            ("GET", "whoami-v2"): self.whoami,
            ("POST", "validate-yaml"): lambda r: json_response({"errors": [], "warnings": []}),
            # The client fetches this registry once per process; answering keeps it off the network.
            ("GET", "agent-harnesses"): lambda r: json_response({"standardEnvVars": [], "harnesses": {}}),
        }
        handler = plain.get((req.method, "/".join(segs)))
        if handler is not None:
            return handler(req)
        if len(segs) >= 2 and segs[0] in REPO_TYPES:
            repo_id, action, args = self._split_repo_path(segs[1:])
            name = self.REPO_ACTIONS.get((req.method, action))
            if name is not None:
                return getattr(self, name)(req, REPO_TYPES[segs[0]], repo_id, args)
        raise HubError(404, "Not found")

    def _split_repo_path(self, segs: list[str]) -> tuple[str, str | None, list[str]]:
        actions = {action for _, action in self.REPO_ACTIONS}
        n = 2 if len(segs) >= 2 and segs[1] not in actions else 1  # "namespace/name", or a legacy bare name
        rest = segs[n:]
        return "/".join(segs[:n]), (rest[0] if rest else None), rest[1:]

    def _route_repo_url(self, req: Request, segs: list[str]) -> Response:
        repo_type = "model"  # model URLs carry no prefix
        if segs and segs[0] in ("datasets", "spaces"):
            repo_type, segs = REPO_TYPES[segs[0]], segs[1:]
        if req.method == "GET" and "resolve" in segs[1:3]:
            i = segs.index("resolve", 1)
            if len(segs) > i + 2:
                return self.resolve_file(req, repo_type, "/".join(segs[:i]), segs[i + 1], "/".join(segs[i + 2 :]))
        is_batch = len(segs) >= 5 and segs[-4:] == ["info", "lfs", "objects", "batch"] and segs[-5].endswith(".git")
        if req.method == "POST" and is_batch:
            repo_id = "/".join(segs[:-5] + [segs[-5].removesuffix(".git")])
            return self.lfs_batch(req, repo_type, repo_id)
        raise HubError(404, "Not found")

    # ----------------------------------------------------------------- account & repos

    def whoami(self, req: Request) -> Response:
        if req.role is None:
            raise HubError(401, "Invalid user token")
        token_info = {"displayName": "test-token", "role": req.role}
        return json_response(
            {"type": "user", "id": "0" * 24, "name": self.store.user, "fullname": self.store.user,
             "orgs": [], "auth": {"type": "access_token", "accessToken": token_info}}
        )  # fmt: skip

    def _repo_from_body(self, req: Request) -> tuple[str, str, dict]:
        body = req.json()
        repo_type = body.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        return repo_type, f"{body.get('organization') or self.store.user}/{body['name']}", body

    def create_repo(self, req: Request) -> Response:
        self._require_write(req)
        repo_type, repo_id, body = self._repo_from_body(req)
        url = f"{self.endpoint()}/{URL_PREFIXES[repo_type]}{repo_id}"
        if self.store.get(repo_type, repo_id) is not None:
            # The client's exist_ok path reads "url" from the 409 body.
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        private = body.get("visibility") == "private" or body.get("private") is True
        self.store.create_repo(repo_type, repo_id, private)
        return json_response({"url": url, "name": repo_id, "id": repo_id})

    def delete_repo(self, req: Request) -> Response:
        repo_type, repo_id, _ = self._repo_from_body(req)
        self._writable(req, repo_type, repo_id)
        del self.store.repos[(repo_type, repo_id)]
        return json_response({})

    def repo_info(self, req: Request, repo_type: str, repo_id: str, args: list[str]) -> Response:
        repo = self._readable(req, repo_type, repo_id)
        commit = repo.resolve(args[0] if args else "main")
        blobs = req.flag("blobs")
        return json_response(
            {"_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id,
             "author": repo_id.split("/")[0], "sha": commit.oid, "lastModified": iso(commit.date),
             "createdAt": iso(repo.created_at), "private": repo.private, "gated": False, "disabled": False,
             "downloads": 0, "likes": 0, "tags": [],
             "siblings": [blob.sibling(path, blobs) for path, blob in sorted(commit.files.items())]}
        )  # fmt: skip

    # ----------------------------------------------------------------- browsing

    def tree(self, req: Request, repo_type: str, repo_id: str, args: list[str]) -> Response:
        commit = self._readable(req, repo_type, repo_id).resolve(self._revision_arg(args))
        entries = list_tree(commit.files, "/".join(args[1:]), recursive=req.flag("recursive"))
        if entries is None:
            raise HubError.entry_not_found(commit, f"Directory not found: {'/'.join(args[1:])}")
        return json_response(entries)  # one page: no Link header, so the client stops paginating

    def paths_info(self, req: Request, repo_type: str, repo_id: str, args: list[str]) -> Response:
        commit = self._readable(req, repo_type, repo_id).resolve(self._revision_arg(args))
        paths = parse_qs(req.body.decode()).get("paths", [])
        entries = []
        for path in paths:
            if path in commit.files:
                entries.append(commit.files[path].tree_entry(path))
            elif any(p.startswith(path.rstrip("/") + "/") for p in commit.files):
                entries.append({"type": "directory", "oid": _tree_oid(commit.files, path), "size": 0, "path": path})
        return json_response(entries)

    def refs(self, req: Request, repo_type: str, repo_id: str, args: list[str]) -> Response:
        repo = self._readable(req, repo_type, repo_id)

        def refs_of(names: dict[str, str], kind: str) -> list[dict]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": oid} for n, oid in sorted(names.items())]

        branches = {n: oid for n, oid in repo.branches.items() if not n.startswith("refs/pr/")}
        pulls = {n.removeprefix("refs/pr/"): oid for n, oid in repo.branches.items() if n.startswith("refs/pr/")}
        data = {"branches": refs_of(branches, "heads"), "converts": [], "tags": refs_of(repo.tags, "tags")}
        if req.flag("include_prs"):
            data["pullRequests"] = refs_of(pulls, "pr")
        return json_response(data)

    def commits(self, req: Request, repo_type: str, repo_id: str, args: list[str]) -> Response:
        repo = self._readable(req, repo_type, repo_id)
        history = repo.history(self._revision_arg(args))
        return json_response(
            [{"id": c.oid, "title": c.title, "message": c.message, "date": iso(c.date),
              "authors": [{"user": self.store.user}]} for c in history]
        )  # fmt: skip

    @staticmethod
    def _revision_arg(args: list[str]) -> str:
        if not args:
            raise HubError(400, "Missing revision")
        return args[0]

    # ----------------------------------------------------------------- writing

    def preupload(self, req: Request, repo_type: str, repo_id: str, args: list[str]) -> Response:
        commit = self._writable(req, repo_type, repo_id).resolve(self._revision_arg(args))
        files = []
        for item in req.json().get("files", []):
            path, existing = item["path"], commit.files.get(item["path"])
            sample = base64.b64decode(item.get("sample", ""))
            lfs = self.store.wants_lfs(commit, path, item["size"], sample)
            info = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if existing is not None:
                info["oid"] = existing.etag  # lets the client drop unchanged files from the commit
            files.append(info)
        return json_response({"files": files, "commitOid": commit.oid})

    def commit(self, req: Request, repo_type: str, repo_id: str, args: list[str]) -> Response:
        repo = self._writable(req, repo_type, repo_id)
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header = lines[0]["value"]
        branch, pr_num = self._commit_branch(repo, self._revision_arg(args), req.flag("create_pr"))
        head = repo.head(branch)
        if header.get("parentCommit") not in (None, head.oid):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = self._apply_operations(head, lines[1:])
        commit = self.store.add_commit(
            repo, branch, files, header.get("summary", ""), header.get("description", ""), head.oid
        )
        base = f"{self.endpoint()}/{repo.url_path}"
        pr_url = f"{base}/discussions/{pr_num}" if pr_num else None
        return json_response(
            {"success": True, "commitOid": commit.oid, "commitUrl": f"{base}/commit/{commit.oid}",
             "pullRequestUrl": pr_url, "hookOutput": ""}
        )  # fmt: skip

    @staticmethod
    def _commit_branch(repo: Repo, revision: str, create_pr: bool) -> tuple[str, int | None]:
        if not create_pr:
            return revision, None
        pr_num = 1 + sum(name.startswith("refs/pr/") for name in repo.branches)
        branch = f"refs/pr/{pr_num}"
        repo.branches[branch] = repo.head(revision).oid
        return branch, pr_num

    def _apply_operations(self, head: Commit, operations: list[dict]) -> dict[str, Blob]:
        files = dict(head.files)
        for op in operations:
            key, value = op.get("key"), op.get("value", {})
            path = value.get("path", "")
            if key == "file":
                content = value.get("content", "")
                data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                files[path] = Blob.make(data, lfs=False)
            elif key == "lfsFile":
                files[path] = self._lfs_blob(value)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError.entry_not_found(head, f"A file with this name doesn't exist: {path}")
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                if not doomed:
                    raise HubError.entry_not_found(head, f"A folder with this name doesn't exist: {path}")
                for p in doomed:
                    del files[p]
            else:
                raise HubError(400, f"Unknown commit operation: {key}")
        return files

    def _lfs_blob(self, value: dict) -> Blob:
        data = self.store.lfs_objects.get(value.get("oid", ""))
        if data is None:
            raise HubError(422, f"LFS object {value.get('oid')} was not uploaded")
        return Blob.make(data, lfs=True)

    def create_branch(self, req: Request, repo_type: str, repo_id: str, args: list[str]) -> Response:
        repo = self._writable(req, repo_type, repo_id)
        name = self._revision_arg(args)
        if name in repo.branches:
            raise HubError(409, f"Reference already exists: {name}")
        repo.branches[name] = repo.resolve(req.json().get("startingPoint") or "main").oid
        return json_response({})

    def delete_branch(self, req: Request, repo_type: str, repo_id: str, args: list[str]) -> Response:
        return self._delete_ref(self._writable(req, repo_type, repo_id).branches, args)

    def create_tag(self, req: Request, repo_type: str, repo_id: str, args: list[str]) -> Response:
        repo = self._writable(req, repo_type, repo_id)
        commit = repo.resolve(self._revision_arg(args))
        tag = req.json().get("tag", "")
        if not tag or tag in repo.tags or tag in repo.branches:
            raise HubError(409, f"Reference already exists: {tag}")
        repo.tags[tag] = commit.oid
        return json_response({})

    def delete_tag(self, req: Request, repo_type: str, repo_id: str, args: list[str]) -> Response:
        return self._delete_ref(self._writable(req, repo_type, repo_id).tags, args)

    def _delete_ref(self, refs: dict, args: list[str]) -> Response:
        if refs.pop(self._revision_arg(args), None) is None:
            raise HubError(404, f"Invalid rev id: {args[0]}", "RevisionNotFound")
        return json_response({})

    # ----------------------------------------------------------------- LFS

    def lfs_batch(self, req: Request, repo_type: str, repo_id: str) -> Response:
        self._writable(req, repo_type, repo_id)
        body = req.json()
        if body.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is served")
        objects = [self._lfs_batch_object(o["oid"], o["size"]) for o in body.get("objects", [])]
        return json_response({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _lfs_batch_object(self, oid: str, size: int) -> dict:
        if oid in self.store.lfs_objects:
            return {"oid": oid, "size": size}  # no "actions": the client skips the upload
        href = f"{self.endpoint()}/__lfs/{oid}"
        actions = {"upload": {"href": href}, "verify": {"href": f"{self.endpoint()}/__lfs/verify"}}
        return {"oid": oid, "size": size, "authenticated": True, "actions": actions}

    def _route_lfs_storage(self, req: Request, segs: list[str]) -> Response:
        """Stands in for the presigned storage URLs the batch API hands out (hence no auth)."""
        if req.method == "POST" and segs == ["verify"]:
            oid = req.json().get("oid", "")
            if oid not in self.store.lfs_objects:
                raise HubError(404, f"LFS object {oid} not found")
            return json_response({})
        if req.method == "PUT" and len(segs) == 1:
            if hashlib.sha256(req.body).hexdigest() != segs[0]:
                raise HubError(400, "Uploaded content does not match its sha256")
            self.store.lfs_objects[segs[0]] = req.body
            return Response(200, headers={"ETag": f'"{segs[0]}"'})
        raise HubError(404, "Not found")

    # ----------------------------------------------------------------- downloads

    def resolve_file(self, req: Request, repo_type: str, repo_id: str, revision: str, path: str) -> Response:
        commit = self._readable(req, repo_type, repo_id).resolve(revision)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError.entry_not_found(commit)
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if blob.lfs:
            # The Hub answers LFS files with a redirect carrying these; served directly here, same values.
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
        return _ranged(blob.data, req.headers.get("Range"), headers)


_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


def _ranged(data: bytes, range_header: str | None, headers: dict[str, str]) -> Response:
    """Honour a single `Range`, which the client sends to resume an interrupted download."""
    match = _RANGE.match((range_header or "").replace(" ", ""))
    if match is None or match.groups() == ("", ""):
        return Response(200, data, headers)
    first, last = match.groups()
    if first:  # "bytes=N-" or "bytes=N-M"
        start, end = int(first), min(int(last or len(data) - 1), len(data) - 1)
    else:  # "bytes=-N": the last N bytes
        start, end = max(len(data) - int(last), 0), len(data) - 1
    if start >= len(data) or start > end:
        raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
    headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
    return Response(206, data[start : end + 1], headers)


# --------------------------------------------------------------------------- HTTP plumbing


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub: the client pools connections
    timeout = 30  # idle keep-alive connections end on their own
    server: _HTTPServer

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass  # `srv.requests` is the log

    def _dispatch(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        path = unquote(split.path)
        body = self._read_body()  # always drained, so a fault never leaves a half-read request behind
        fault = hub._take_fault(self.command, path)
        if fault is not None and fault.delay:
            time.sleep(fault.delay)
        if fault is not None and fault.drop:
            hub._record(self, path, split.query, None, fault)
            self.close_connection = True  # closed without a byte of response
            return
        if fault is not None and fault.status is not None:
            message = f"Injected fault: HTTP {fault.status}"
            response = error_response(HubError(fault.status, message, headers=dict(fault.headers)))
        else:
            response = hub.app.handle(self._request(split.path, split.query, body))
        hub._record(self, path, split.query, response.status, fault)
        self._write(response, fault)

    def _request(self, raw_path: str, query: str, body: bytes) -> Request:
        segments = [unquote(s) for s in raw_path.split("/") if s]
        method = "GET" if self.command == "HEAD" else self.command
        return Request(method, segments, parse_qs(query), self.headers, body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(chunks)

    def _write(self, response: Response, fault: Fault | None) -> None:
        body = response.body
        if fault is not None and fault.corrupt:
            body = bytes(b ^ 0xFF for b in body)  # same length, so only a checksum notices
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault is not None and fault.truncate:
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True  # the client sees the connection end mid-body
            return
        self.wfile.write(body)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], hub: HubServer):
        super().__init__(address, _Handler)
        self.hub = hub
        self._sockets: set[socket.socket] = set()
        self._sockets_lock = threading.Lock()

    def process_request(self, request, client_address) -> None:
        with self._sockets_lock:
            self._sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._sockets_lock:
            self._sockets.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Ends kept-alive connections, whose handler threads would otherwise linger after close."""
        with self._sockets_lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# --------------------------------------------------------------------------- public API


def _normalize_tokens(tokens: Mapping[str, str] | Iterable[str] | None) -> dict[str, str] | None:
    if tokens is None:
        return None
    mapping = dict(tokens) if isinstance(tokens, Mapping) else {t: "write" for t in tokens}
    bad = {role for role in mapping.values() if role not in ROLES}
    if bad:
        raise ValueError(f"token roles must be one of {ROLES}, got {bad}")
    return mapping


class HubServer:
    """A Hub on 127.0.0.1 for the real `huggingface_hub` client; see the module docstring.

    Args:
        tokens: None disables auth (anyone may read and write everything). Otherwise a mapping
            token -> "read" | "write", or an iterable of write tokens. Anonymous callers then
            see public repos only and cannot write (401); read tokens get 403 on writes; an
            unknown token gets 401 on any request.
        user: the namespace of repos created without one, and the name `whoami` returns.
        port: 0 picks a free port.
        lfs_threshold: files at least this big go to LFS (the Hub uses 10 MB); so do binary
            files and paths the repo's `.gitattributes` marks `filter=lfs` (e.g. *.safetensors).
    """

    def __init__(
        self,
        tokens: Mapping[str, str] | Iterable[str] | None = None,
        *,
        user: str = "test-user",
        host: str = "127.0.0.1",
        port: int = 0,
        lfs_threshold: int = 10 * 1024 * 1024,
    ):
        self.host, self.port = host, port
        self.store = HubStore(user, lfs_threshold)
        self.app = HubApp(self.store, _normalize_tokens(tokens), lambda: self.endpoint)
        self.requests: list[RequestRecord] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> HubServer:
        self._httpd = _HTTPServer((self.host, self.port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.close_connections()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------- faults & log

    def inject(
        self,
        path_regex: str,
        *,
        status: int | None = None,
        drop: bool = False,
        truncate: bool = False,
        corrupt: bool = False,
        delay: float = 0.0,
        headers: Mapping[str, str] | None = None,
        times: int | None = 1,
        method: str | None = None,
    ) -> Fault:
        """Make the next `times` requests (None: all) whose decoded path matches fail.

        `path_regex` is searched (re.search) in the percent-decoded path, without the query;
        `method` ("GET", "HEAD", ...) narrows it further. Faults are tried in the order they
        were injected; a request takes at most one. Effects, checked in this order:
          drop:     close the connection without sending any response
          status:   answer with this status (e.g. 500, or 429 with headers={"Retry-After": "0"})
          truncate: send the real headers and half the body, then close the connection
          corrupt:  send the real headers and a same-length body with every byte flipped
          delay:    sleep this many seconds first (combines with any of the above)
        The returned Fault counts its `hits`.
        """
        if not (drop or truncate or corrupt or delay or status is not None):
            raise ValueError("inject() needs one of status, drop, truncate, corrupt or delay")
        fault = Fault(
            re.compile(path_regex), method, status, drop, truncate, corrupt, delay, dict(headers or {}), times
        )
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def requests_to(self, path_regex: str, method: str | None = None) -> list[RequestRecord]:
        """The logged requests whose decoded path matches, in arrival order."""
        pattern = re.compile(path_regex)
        return [r for r in list(self.requests) if pattern.search(r.path) and method in (None, r.method)]

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            return next((f for f in self.faults if f.take(method, path)), None)

    def _record(self, handler: _Handler, path: str, query: str, status: int | None, fault: Fault | None) -> None:
        # Logged before the response is written, so the client never returns before its request is logged.
        record = RequestRecord(
            handler.command, path, query, status, fault.kind if fault else None,
            {name.lower(): value for name, value in handler.headers.items()},
        )
        with self._lock:
            self.requests.append(record)

    # ----------------------------------------------------------------- direct state access (no HTTP)

    def create_repo(self, repo_id: str, *, private: bool = False, repo_type: str = "model") -> Repo:
        with self.store.lock:
            if self.store.get(repo_type, repo_id) is not None:
                raise ValueError(f"{repo_type} repo {repo_id} exists")
            return self.store.create_repo(repo_type, repo_id, private)

    def commit_files(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        message: str = "seed",
        branch: str = "main",
        repo_type: str = "model",
    ) -> str:
        """Commits `files` (path -> bytes) on top of `branch`, creating the repo if needed; returns the oid."""
        with self.store.lock:
            repo = self.store.get(repo_type, repo_id) or self.store.create_repo(repo_type, repo_id, False)
            head = repo.head(branch)
            blobs = {**head.files, **{p: self.store.blob_for(head, p, d) for p, d in files.items()}}
            return self.store.add_commit(repo, branch, blobs, message, "", head.oid).oid

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        with self.store.lock:
            repo = self.store.get(repo_type, repo_id)
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id}")
        return repo

    def read_file(self, repo_id: str, path: str, *, revision: str = "main", repo_type: str = "model") -> bytes:
        with self.store.lock:
            return self.repo(repo_id, repo_type).resolve(revision).files[path].data


# --------------------------------------------------------------------------- pytest helpers


def hub_server(**kwargs: Any) -> Iterator[HubServer]:
    """Generator body for a pytest fixture: `yield from hub_server(tokens=...)`."""
    with HubServer(**kwargs) as srv:
        yield srv


def isolate_hf_client(monkeypatch: Any) -> None:
    """Point the real client's process-wide settings at a test Hub; pass pytest's `monkeypatch`.

    The client reads these environment variables once, at import time, so the
    module-level constants are set too.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent

    settings = {
        "HF_HUB_DISABLE_XET": True,  # else LFS uploads go to Xet, which HubServer does not serve
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": True,  # token=None must not pick up a real credential
        "HF_HUB_DISABLE_PROGRESS_BARS": True,
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, "1" if value else "0")
        monkeypatch.setattr(constants, name, value)
    # Otherwise the first request of the process fetches https://huggingface.co/api/agent-harnesses.
    monkeypatch.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})
