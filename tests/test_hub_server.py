"""The loopback Hub (helpers.hub_server) against the real, unpatched huggingface_hub client.

Client behaviours these tests pin down (huggingface_hub 2.4.0), which tests built on HubServer rely on:
- hf_hub_download's HEAD /resolve is tried once; after a 5xx with nothing cached it is retried through
  http_backoff (up to 5 retries, sleeping 1, 2, 4, 8, 8 s). A HEAD whose connection drops is not
  retried: httpx2.RemoteProtocolError escapes hf_hub_download as is.
- hf_hub_download's GET /resolve is not retried on 5xx (only 408/429): the HfHubHTTPError surfaces.
  A connection lost (or cut mid-body) is retried after 1 s, up to 5 times, with `Range: bytes=N-` where N
  counts only the bytes already handed over in 10 MB chunks (so small files start again from 0).
- The client checks only the size of what it downloads, never its hash: corrupt bytes end up in the cache.
- list_repo_tree, preupload and the LFS batch/PUT/verify calls go through http_backoff (5xx and dropped
  connections are retried); repo_info, create_repo, the commit POST, tags and branches are single attempts.
- snapshot_download turns a failed repo_info (other than 401/404) into LocalEntryNotFoundError.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from helpers.hub_server import HubServer, hub_server, isolate_hf_client

# The client itself passes raw bytes as `data=` to httpx2 (LFS PUTs); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

WRITE, READ = "hf_write_token", "hf_read_token"
REPO = "me/tiny-adapter"
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def srv(monkeypatch):
    isolate_hf_client(monkeypatch)
    yield from hub_server(tokens={WRITE: "write", READ: "read"})


@pytest.fixture
def api(srv):
    return HfApi(endpoint=srv.endpoint, token=WRITE)


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}')
    (folder / WEIGHTS).write_bytes(os.urandom(4096))
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n# tiny\n")  # exercises validate-yaml
    return folder


def _upload(api: HfApi, folder: Path, message: str = "Upload adapter", **kwargs) -> str:
    return api.upload_folder(repo_id=REPO, folder_path=folder, commit_message=message, **kwargs).oid


def _download(srv: HubServer, cache: Path, revision: str, filename: str = WEIGHTS, **kwargs) -> bytes:
    kwargs.setdefault("token", False)
    path = hf_hub_download(REPO, filename, revision=revision, endpoint=srv.endpoint, cache_dir=cache, **kwargs)
    return Path(path).read_bytes()


def _statuses(srv: HubServer, path_regex: str, method: str) -> list[int | None]:
    return [r.status for r in srv.requests_to(path_regex, method)]


def test_upload_folder_is_one_commit_with_lfs_weights(srv, api, adapter_dir):
    api.create_repo(REPO)
    oid = _upload(api, adapter_dir)

    assert re.fullmatch(r"[0-9a-f]{40}", oid)
    assert sorted(api.list_repo_files(REPO)) == [".gitattributes", "README.md", "adapter_config.json", WEIGHTS]
    assert api.repo_info(REPO, revision=oid).sha == oid == api.repo_info(REPO).sha
    assert [c.title for c in api.list_repo_commits(REPO)] == ["Upload adapter", "initial commit"]
    assert len(srv.requests_to(r"/commit/main$", "POST")) == 1
    # *.safetensors is LFS per the default .gitattributes: uploaded through the batch API, listed with its sha256.
    weights = {f.path: f for f in api.list_repo_tree(REPO)}[WEIGHTS]
    assert weights.lfs.sha256 == hashlib.sha256((adapter_dir / WEIGHTS).read_bytes()).hexdigest()
    assert srv.requests_to(r"^/__lfs/[0-9a-f]{64}$", "PUT")
    assert srv.read_file(REPO, WEIGHTS) == (adapter_dir / WEIGHTS).read_bytes()


def test_create_repo_conflict_and_exist_ok(api):
    api.create_repo(REPO)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO


def test_reuploading_identical_content_makes_no_commit(srv, api, adapter_dir):
    api.create_repo(REPO)
    first = _upload(api, adapter_dir)
    second = _upload(api, adapter_dir, message="same again")

    assert second == first  # the client compares preupload's `oid`s and skips the empty commit
    assert len(srv.requests_to(r"/commit/main$", "POST")) == 1
    assert len(api.list_repo_commits(REPO)) == 2


def test_downloads_pinned_to_commit_branch_and_tag(srv, api, adapter_dir, tmp_path):
    api.create_repo(REPO)
    v1 = (adapter_dir / WEIGHTS).read_bytes()
    oid1 = _upload(api, adapter_dir)
    api.create_tag(REPO, tag="v1", revision=oid1)
    api.create_branch(REPO, branch="stable", revision=oid1)
    (adapter_dir / WEIGHTS).write_bytes(b"v2" * 100)
    oid2 = _upload(api, adapter_dir, message="v2")
    cache = tmp_path / "cache"

    assert oid2 != oid1
    assert _download(srv, cache, oid1) == _download(srv, cache, "v1") == _download(srv, cache, "stable") == v1
    assert _download(srv, cache, "main") == b"v2" * 100
    # LFS files are cached under their sha256 (the ETag), regular files under their git blob oid.
    blobs = {p.name for p in (cache / "models--me--tiny-adapter" / "blobs").iterdir()}
    assert hashlib.sha256(v1).hexdigest() in blobs

    for revision in (oid1, "stable", "v1"):
        snapshot = Path(snapshot_download(REPO, revision=revision, endpoint=srv.endpoint, cache_dir=cache, token=False))
        assert snapshot.name == oid1
        assert (snapshot / WEIGHTS).read_bytes() == v1
    assert (cache / "models--me--tiny-adapter" / "refs" / "stable").read_text() == oid1


def test_commit_operations_delete_and_parent_commit(api):
    api.create_repo(REPO)
    add = [CommitOperationAdd("a/x.txt", b"x"), CommitOperationAdd("a/y.txt", b"y")]
    base = api.create_commit(REPO, add, commit_message="add").oid
    api.create_commit(REPO, [CommitOperationDelete("a/x.txt")], commit_message="rm", parent_commit=base)
    assert sorted(api.list_repo_files(REPO)) == [".gitattributes", "a/y.txt"]

    with pytest.raises(HfHubHTTPError) as stale:  # main moved on since `base`
        api.create_commit(REPO, [CommitOperationDelete("a/")], commit_message="rm dir", parent_commit=base)
    assert stale.value.response.status_code == 412
    with pytest.raises(EntryNotFoundError):
        api.create_commit(REPO, [CommitOperationDelete("nope.txt")], commit_message="rm missing")


def test_seeded_repo_is_served(srv, tmp_path):
    oid = srv.commit_files("org/base", {"config.json": b"{}", "w.safetensors": b"\0" * 64})
    api = HfApi(endpoint=srv.endpoint, token=False)
    assert api.repo_info("org/base").sha == oid
    path = hf_hub_download("org/base", "w.safetensors", endpoint=srv.endpoint, cache_dir=tmp_path, token=False)
    assert Path(path).read_bytes() == b"\0" * 64


def test_missing_repo_revision_and_file(srv, api, adapter_dir, tmp_path):
    api.create_repo(REPO)
    _upload(api, adapter_dir)
    cache = tmp_path / "cache"

    with pytest.raises(RepositoryNotFoundError) as missing:
        api.repo_info("me/nope")
    assert missing.value.response.status_code == 404  # 401 when anonymous, as on the Hub
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("me/nope", WEIGHTS, endpoint=srv.endpoint, cache_dir=cache, token=False)
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(REPO, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        _download(srv, cache, "f" * 40, force_download=True)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="no-such-tag", endpoint=srv.endpoint, cache_dir=cache, token=False)
    with pytest.raises(EntryNotFoundError):
        _download(srv, cache, "main", filename="missing.bin")


def test_auth_private_repos_and_read_only_tokens(srv, api, adapter_dir, tmp_path):
    api.create_repo(REPO, private=True)
    _upload(api, adapter_dir)
    anonymous = HfApi(endpoint=srv.endpoint, token=False)
    reader = HfApi(endpoint=srv.endpoint, token=READ)

    with pytest.raises(RepositoryNotFoundError) as hidden:
        anonymous.repo_info(REPO)
    assert hidden.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        _download(srv, tmp_path, "main")
    assert _download(srv, tmp_path, "main", token=READ) == (adapter_dir / WEIGHTS).read_bytes()

    with pytest.raises(HfHubHTTPError) as forbidden:
        reader.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert forbidden.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as bad_token:
        HfApi(endpoint=srv.endpoint, token="hf_bogus").repo_info(REPO)
    assert bad_token.value.response.status_code == 401
    assert not isinstance(bad_token.value, RepositoryNotFoundError)
    with pytest.raises(HfHubHTTPError) as unauthenticated:
        anonymous.create_repo("me/other")
    assert unauthenticated.value.response.status_code == 401


def test_head_5xx_burst_is_retried_but_get_5xx_is_not(srv, api, adapter_dir, tmp_path):
    api.create_repo(REPO)
    _upload(api, adapter_dir)
    srv.inject(r"/resolve/", method="HEAD", status=500, times=2)

    assert _download(srv, tmp_path / "a", "main") == (adapter_dir / WEIGHTS).read_bytes()
    assert _statuses(srv, r"/resolve/", "HEAD") == [500, 500, 200]  # one plain try, then http_backoff

    srv.inject(r"/resolve/", method="GET", status=503)
    with pytest.raises(HfHubHTTPError) as err:
        _download(srv, tmp_path / "b", "main")
    assert err.value.response.status_code == 503


def test_api_listing_retries_5xx_and_dropped_connections(srv, api, adapter_dir):
    api.create_repo(REPO)
    _upload(api, adapter_dir)
    flaky = srv.inject(r"/tree/", status=502)
    assert WEIGHTS in api.list_repo_files(REPO)
    dropped = srv.inject(r"/tree/", drop=True)
    assert WEIGHTS in api.list_repo_files(REPO)

    assert (flaky.hits, dropped.hits) == (1, 1)
    assert [(r.status, r.fault) for r in srv.requests_to(r"/tree/")] == [
        (502, "status:502"), (200, None), (None, "drop"), (200, None)
    ]


def test_single_attempt_calls_surface_errors(srv, api, adapter_dir, tmp_path):
    api.create_repo(REPO)
    _upload(api, adapter_dir)

    srv.inject(r"/commit/main$", status=500)
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert err.value.response.status_code == 500
    srv.inject(r"^/api/models/me/tiny-adapter$", drop=True)
    with pytest.raises(httpx2.RemoteProtocolError):
        api.repo_info(REPO)
    srv.inject(r"/resolve/", method="HEAD", drop=True)
    with pytest.raises(httpx2.RemoteProtocolError):
        _download(srv, tmp_path, "main")
    srv.inject(r"/revision/main$", status=500)
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download(REPO, endpoint=srv.endpoint, cache_dir=tmp_path, token=False)
    assert [r.fault for r in srv.requests if r.fault] == ["status:500", "drop", "drop", "status:500"]


def test_download_cut_mid_body_is_retried(srv, api, adapter_dir, tmp_path):
    api.create_repo(REPO)
    _upload(api, adapter_dir)
    srv.inject(r"/resolve/", method="GET", truncate=True)

    assert _download(srv, tmp_path, "main") == (adapter_dir / WEIGHTS).read_bytes()
    gets = srv.requests_to(r"/resolve/", "GET")
    assert [(r.status, r.fault) for r in gets] == [(200, "truncate"), (200, None)]
    # The 2 KiB received were still in httpx's 10 MB read buffer, so nothing was resumable: no Range.
    assert "range" not in gets[1].headers


def test_resolve_honours_range(srv):
    srv.commit_files(REPO, {"blob.bin": bytes(range(100))})
    url = f"{srv.endpoint}/{REPO}/resolve/main/blob.bin"

    partial = httpx2.get(url, headers={"Range": "bytes=90-"})
    assert (partial.status_code, partial.content) == (206, bytes(range(90, 100)))
    assert partial.headers["Content-Range"] == "bytes 90-99/100"
    assert httpx2.get(url, headers={"Range": "bytes=-3"}).content == bytes([97, 98, 99])
    assert httpx2.get(url, headers={"Range": "bytes=100-"}).status_code == 416


def test_corrupt_bytes_pass_the_client_unnoticed(srv, api, adapter_dir, tmp_path):
    api.create_repo(REPO)
    _upload(api, adapter_dir)
    srv.inject(r"/resolve/", method="GET", corrupt=True)

    data = _download(srv, tmp_path, "main")
    assert len(data) == 4096 and data != (adapter_dir / WEIGHTS).read_bytes()  # callers must check the sha256


def test_lfs_put_5xx_is_retried(srv, api, adapter_dir):
    api.create_repo(REPO)
    srv.inject(r"^/__lfs/[0-9a-f]{64}$", method="PUT", status=500)

    _upload(api, adapter_dir)
    assert _statuses(srv, r"^/__lfs/[0-9a-f]{64}$", "PUT") == [500, 200]
    assert srv.read_file(REPO, WEIGHTS) == (adapter_dir / WEIGHTS).read_bytes()
