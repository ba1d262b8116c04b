"""push / pull / hf:// against a real HTTP Hub on loopback, with the real, unpatched huggingface_hub client.

Only process-wide settings are changed (isolate_hf_client, the client's ENDPOINT / cache constants
and lora_convert's retry environment), so that tests are offline, isolated and fast.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import time
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants

import lora_convert as lc
from lora_convert import container, hub
from lora_convert.hub import modelcard
from lora_convert.errors import (BadInputError, HubAuthError, HubError, HubNetworkError, HubNotFoundError,
                                 IntegrityError)
from helpers.cli import run_cli
from helpers.hub_server import HubServer, isolate_hf_client

# The client passes raw bytes as `data=` to httpx2 for LFS PUTs; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

WRITE, READ = "hf_write_token", "hf_read_token"
REPO = "me/tiny-mini"
SRC = "peft-tiny-llama"
RETRIES = 3
MINI = container.FILE_NAME
REPO_INFO = rf"^/api/models/{REPO}(/revision/[^/]+)?$"  # repo_info, the revision lookup


# --------------------------------------------------------------------------- fixtures


def _point_client_at(monkeypatch, endpoint: str) -> None:
    """What HF_ENDPOINT does at import time: both constants, or hf_hub_download keeps the old host."""
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def srv(monkeypatch, tmp_path):
    isolate_hf_client(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv(hub.RETRIES_ENV, str(RETRIES))
    monkeypatch.setenv(hub.BACKOFF_ENV, "0.01")
    with HubServer(tokens={WRITE: "write", READ: "read"}) as server:
        _point_client_at(monkeypatch, server.endpoint)
        yield server


@pytest.fixture(scope="module")
def minis(tmp_path_factory) -> dict[str, Path]:
    """Two LoRA-Mini directories compressed from the fixture adapter with different seeds."""
    root, out = tmp_path_factory.mktemp("minis"), {}
    adapter = lc.load_adapter(Path(__file__).resolve().parents[1] / "fixtures" / SRC)
    for seed in (7, 8):
        out[f"seed{seed}"] = root / f"seed{seed}"
        lc.save(lc.compress(adapter, outer="random", seed=seed, outer_dim=16, rank=4), out[f"seed{seed}"])
    return out


def _push(srv, local, **kwargs) -> hub.PushResult:
    kwargs.setdefault("token", WRITE)
    return hub.push(local, kwargs.pop("repo", REPO), endpoint=srv.endpoint, **kwargs)


def _pull(srv, dest, **kwargs) -> hub.PullResult:
    kwargs.setdefault("token", WRITE)
    return hub.pull(kwargs.pop("repo", REPO), dest, endpoint=srv.endpoint, **kwargs)


def _commits(srv, repo=REPO) -> list[str]:
    return [r.path for r in srv.requests_to(rf"^/api/models/{repo}/commit/", "POST") if r.status == 200]


def _cli(*args, **env):
    return run_cli(*args, env=env)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _no_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".partial" in p.name]


# --------------------------------------------------------------------------- round trip and model card


def test_push_pull_reconstruct_round_trip(srv, minis, fixtures, tmp_path):
    result = _push(srv, minis["seed7"])
    assert not result.up_to_date and re.fullmatch(r"[0-9a-f]{40}", result.commit)
    assert len(_commits(srv)) == 1  # file, config and card in a single commit
    files = sorted(HfApi(endpoint=srv.endpoint, token=WRITE).list_repo_files(REPO))
    assert files == sorted([".gitattributes", "README.md", container.CONFIG_NAME, MINI])
    assert srv.read_file(REPO, MINI) == (minis["seed7"] / MINI).read_bytes()

    pulled = _pull(srv, tmp_path / "pulled")
    assert pulled.commit == result.commit and pulled.modules == 14
    assert sorted(p.name for p in (tmp_path / "pulled").iterdir()) == sorted(["README.md", container.CONFIG_NAME, MINI])
    original = lc.verify(minis["seed7"], against=fixtures / SRC)
    again = lc.verify(tmp_path / "pulled", against=fixtures / SRC)
    assert [m.rel_error for m in again.modules] == [m.rel_error for m in original.modules]

    res = _cli("reconstruct", f"hf://{REPO}@{result.commit}", "-o", tmp_path / "restored")
    assert res.exit_code == 0, res.output
    restored, mini = lc.load_adapter(tmp_path / "restored"), lc.load(minis["seed7"])
    for name in mini.module_names:
        m, r = mini.module(name), restored.module(name)
        B, A = m.factors()
        expected = m.scale * (B @ A)
        assert torch.allclose(r.scale * (r.up.double() @ r.down.double()), expected, atol=1e-6)


def test_model_card_metadata_and_table(srv, minis):
    _push(srv, minis["seed7"])
    card = ModelCard(srv.read_file(REPO, "README.md").decode())
    assert card.data.library_name == "lora_convert"
    assert card.data.tags == ["lora-mini", "peft", "lora"]
    assert card.data.base_model is None  # the fixture's base_model_name_or_path is null
    report = lc.verify(minis["seed7"])
    for row in ("| original size | 62,880 bytes |", f"| compressed size | {report.compressed_bytes:,} bytes |",
                f"| ratio | {62880 / report.compressed_bytes:.1f}× |", "| outer source | random (seed 7), outer 16×16 |",
                f"retained energy {100 * report.retained_energy:.2f}%", f"relative error {report.rel_error:.3e}"):
        assert row in card.text


def test_model_card_base_model_and_user_readme(minis, tmp_path):
    mini = lc.load(minis["seed7"])
    mini.source_config = {**mini.source_config, "base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}
    data = modelcard.card_data(mini)
    assert (data.base_model, data.library_name) == ("meta-llama/Llama-2-7b-hf", "lora_convert")
    mini.source_config["base_model_name_or_path"] = "/home/me/llama"  # a local path is no base_model
    assert modelcard.card_data(mini).base_model is None

    own = "---\nlicense: mit\ntags:\n- mine\n---\n# My adapter\nHand-written.\n"
    merged = modelcard.merge_card(own, mini)
    card = ModelCard(merged)
    assert card.data.license == "mit" and card.data.tags == ["mine", "lora-mini", "peft", "lora"]
    assert card.text.strip() == "# My adapter\nHand-written."
    assert modelcard.merge_card(merged, mini) == merged  # nothing missing: left byte for byte


def test_identical_push_makes_no_second_commit(srv, minis, tmp_path):
    first = _push(srv, minis["seed7"])
    second = _push(srv, minis["seed7"])
    assert second.up_to_date and second.commit == first.commit
    assert "already up to date" in second.describe()
    assert len(_commits(srv)) == 1
    # A pulled copy (with its generated card) and the bare file (config regenerated) are the same content too.
    _pull(srv, tmp_path / "copy")
    assert _push(srv, tmp_path / "copy").up_to_date
    assert _push(srv, minis["seed7"] / MINI).up_to_date


# --------------------------------------------------------------------------- revisions


def test_revision_pin_commit_tag_and_branch(srv, minis, tmp_path):
    v1 = _push(srv, minis["seed7"]).commit
    HfApi(endpoint=srv.endpoint, token=WRITE).create_tag(REPO, tag="v1", revision=v1)
    v2 = _push(srv, minis["seed8"], commit_message="seed 8").commit
    assert v2 != v1
    seed7, seed8 = ((minis[s] / MINI).read_bytes() for s in ("seed7", "seed8"))

    assert _pull(srv, tmp_path / "by-sha", revision=v1).commit == v1
    assert (tmp_path / "by-sha" / MINI).read_bytes() == seed7
    assert _pull(srv, tmp_path / "by-tag", revision="v1").commit == v1
    assert (tmp_path / "by-tag" / MINI).read_bytes() == seed7
    assert _pull(srv, tmp_path / "main").commit == v2
    assert (tmp_path / "main" / MINI).read_bytes() == seed8

    pushed = _push(srv, minis["seed7"], revision="stable")  # a new branch, from main
    assert pushed.created_branch and not pushed.up_to_date
    assert _pull(srv, tmp_path / "stable", revision="stable").commit == pushed.commit
    assert (tmp_path / "stable" / MINI).read_bytes() == seed7
    assert srv.read_file(REPO, MINI) == seed8  # main untouched
    assert _push(srv, minis["seed7"], revision="stable").up_to_date

    snapshot = hub.download_uri(f"hf://{REPO}@v1", token=WRITE)
    assert snapshot.name == v1 and (snapshot / MINI).read_bytes() == seed7
    with pytest.raises(BadInputError, match="must name a branch"):
        _push(srv, minis["seed8"], revision="v1")


def test_revision_and_repo_not_found(srv, minis, tmp_path):
    _push(srv, minis["seed7"])
    with pytest.raises(HubNotFoundError, match=r"revision 'nope' not found"):
        _pull(srv, tmp_path / "x", revision="nope")
    with pytest.raises(HubNotFoundError, match="repository not found"):
        _pull(srv, tmp_path / "x", repo="me/missing")
    assert not (tmp_path / "x").exists()


def test_not_a_lora_mini_repo(srv, fixtures, tmp_path):
    srv.commit_files("someone/their-lora", {p.name: p.read_bytes() for p in (fixtures / SRC).iterdir()})
    with pytest.raises(BadInputError, match="not a LoRA-Mini repo"):
        _pull(srv, tmp_path / "x", repo="someone/their-lora", token=False)
    res = _cli("reconstruct", "hf://someone/their-lora", "-o", tmp_path / "y")
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "not a LoRA-Mini repo" in res.stderr


# --------------------------------------------------------------------------- tokens and permissions


def test_private_repo_tokens_and_permissions(srv, minis, tmp_path, monkeypatch):
    _push(srv, minis["seed7"], private=True)
    with pytest.raises(HubNotFoundError, match="no token was sent.*hf auth login.*HF_TOKEN"):
        _pull(srv, tmp_path / "x", token=False)
    assert _pull(srv, tmp_path / "read", token=READ).modules == 14
    with pytest.raises(HubAuthError, match="permission denied.*write access"):
        _push(srv, minis["seed8"], token=READ)
    with monkeypatch.context() as m:  # --endpoint other than HF_ENDPOINT's: same answer
        m.setattr(constants, "ENDPOINT", "https://huggingface.co")
        with pytest.raises(HubAuthError, match="permission denied"):
            _push(srv, minis["seed8"], token=READ)
    with pytest.raises(HubAuthError, match="token is missing or invalid.*huggingface-cli login"):
        _pull(srv, tmp_path / "x", token="hf_bogus")
    with pytest.raises(HubAuthError):
        _push(srv, minis["seed8"], repo="me/other", token=False)
    assert not (tmp_path / "x").exists()
    assert len(_commits(srv)) == 1

    # token=None: the client's own lookup, HF_TOKEN first (implicit tokens re-enabled for this).
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.setenv("HF_TOKEN", READ)
    assert _pull(srv, tmp_path / "env", token=None).modules == 14


# --------------------------------------------------------------------------- retries and transient failures


def test_5xx_and_429_bursts_are_retried(srv, minis, tmp_path):
    _push(srv, minis["seed7"])
    srv.requests.clear()
    srv.inject(REPO_INFO, status=500, times=2)
    srv.inject(rf"/resolve/.*/{MINI}$", method="GET", status=503)  # the client itself does not retry this
    srv.inject(r"/paths-info/", status=429, headers={"Retry-After": "0"})
    assert _pull(srv, tmp_path / "out").modules == 14
    assert [r.status for r in srv.requests_to(REPO_INFO)] == [500, 500, 200]
    assert [r.status for r in srv.requests_to(rf"/resolve/.*/{MINI}$", "GET")] == [503, 200]


def test_401_and_404_are_not_retried(srv, minis, tmp_path):
    _push(srv, minis["seed7"])
    srv.requests.clear()
    srv.inject(REPO_INFO, status=401, times=3)
    with pytest.raises(HubError):  # the client calls it RepositoryNotFound or a bad token, by message
        _pull(srv, tmp_path / "x")
    srv.clear_faults()
    srv.inject(r"/paths-info/", status=404, times=3)
    with pytest.raises(HubNotFoundError, match="HTTP 404"):
        _pull(srv, tmp_path / "x")
    assert len(srv.requests_to(REPO_INFO)) == 2 and len(srv.requests_to(r"/paths-info/")) == 1
    assert not (tmp_path / "x").exists()


def test_persistent_server_error_is_one_clear_line(srv, minis, tmp_path):
    _push(srv, minis["seed7"])
    srv.requests.clear()
    srv.inject(REPO_INFO, status=500, times=None)
    with pytest.raises(HubNetworkError) as err:
        _pull(srv, tmp_path / "x")
    message = str(err.value)
    assert "\n" not in message and "server error HTTP 500" in message and f"{RETRIES + 1} attempt(s)" in message
    assert len(srv.requests_to(REPO_INFO)) == RETRIES + 1

    res = _cli("pull", REPO, "-o", tmp_path / "x", "--token", WRITE, "--endpoint", srv.endpoint)
    assert res.exit_code == 2 and res.stderr.startswith("error: hf://me/tiny-mini: server error HTTP 500")
    assert "Traceback" not in res.output and not (tmp_path / "x").exists()


def test_dropped_connections_mid_download_and_mid_upload(srv, minis, tmp_path):
    srv.inject(r"/commit/main$", drop=True)  # the commit POST: a single attempt in the client
    pushed = _push(srv, minis["seed7"])
    assert [r.fault for r in srv.requests_to(r"/commit/main$")] == ["drop", None]
    assert len(_commits(srv)) == 1 and srv.repo(REPO).branches["main"] == pushed.commit

    srv.inject(r"/resolve/", method="HEAD", drop=True)  # escapes the client as RemoteProtocolError
    srv.inject(rf"/resolve/.*/{MINI}$", method="GET", truncate=True)  # cut mid-body: the client resumes
    assert _pull(srv, tmp_path / "out").modules == 14

    shutil.rmtree(constants.HF_HUB_CACHE)
    srv.inject(r"/resolve/", method="HEAD", drop=True, times=None)
    with pytest.raises(HubNetworkError, match="connection dropped"):
        _pull(srv, tmp_path / "never")
    assert not (tmp_path / "never").exists() and not _no_leftovers(tmp_path)


def test_connection_refused_is_a_network_error(minis, tmp_path, monkeypatch):
    isolate_hf_client(monkeypatch)
    monkeypatch.setenv(hub.RETRIES_ENV, "1")
    monkeypatch.setenv(hub.BACKOFF_ENV, "0")
    closed = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(HubNetworkError, match=f"cannot connect to {closed}.*HF_ENDPOINT"):
        hub.pull(REPO, tmp_path / "x", endpoint=closed, token=WRITE, cache_dir=tmp_path / "cache")
    res = _cli("push", minis["seed7"], REPO, "--endpoint", closed, "--token", WRITE)
    assert res.exit_code == 2 and "cannot connect" in res.stderr and "Traceback" not in res.output


# --------------------------------------------------------------------------- integrity


def test_corrupt_download_is_rejected_evicted_and_retry_succeeds(srv, minis, tmp_path):
    _push(srv, minis["seed7"])
    srv.inject(rf"/resolve/.*/{MINI}$", method="GET", corrupt=True)  # same length: only a checksum notices
    with pytest.raises(IntegrityError, match=f"downloaded {MINI} does not match"):
        _pull(srv, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not _no_leftovers(tmp_path)
    cache = Path(constants.HF_HUB_CACHE) / "models--me--tiny-mini"
    assert not list(cache.glob(f"snapshots/*/{MINI}"))  # evicted: link and blob
    good = hashlib.sha256((minis["seed7"] / MINI).read_bytes()).hexdigest()
    assert not [b for b in (cache / "blobs").iterdir() if b.name == good]

    assert _pull(srv, tmp_path / "out").modules == 14
    assert (tmp_path / "out" / MINI).read_bytes() == (minis["seed7"] / MINI).read_bytes()
    assert len(srv.requests_to(rf"/resolve/.*/{MINI}$", "GET")) == 2


def test_corrupt_cache_entry_is_caught_on_hf_uri(srv, minis):
    commit = _push(srv, minis["seed7"]).commit
    snapshot = hub.download_uri(f"hf://{REPO}", token=WRITE)
    blob = (snapshot / MINI).resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # bit rot in the cache: the client would serve it as is
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=f"hf://{REPO}@{commit}"):
        hub.download_uri(f"hf://{REPO}", token=WRITE)
    assert (hub.download_uri(f"hf://{REPO}", token=WRITE) / MINI).read_bytes() == (minis["seed7"] / MINI).read_bytes()


def test_push_refuses_a_corrupt_local_adapter_before_any_request(srv, minis, tmp_path):
    local = tmp_path / "bad"
    shutil.copytree(minis["seed7"], local)
    data = bytearray((local / MINI).read_bytes())
    data[-1] ^= 0xFF  # inside the last tensor's data
    (local / MINI).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="SHA-256"):
        _push(srv, local)
    with pytest.raises(BadInputError, match="no LoRA-Mini file"):
        _push(srv, tmp_path)
    assert srv.requests == []


# --------------------------------------------------------------------------- hf:// inputs and the CLI


def test_compress_inspect_verify_from_hf_uris(srv, fixtures, minis, tmp_path):
    srv.commit_files("someone/their-lora", {p.name: p.read_bytes() for p in (fixtures / SRC).iterdir()})
    res = _cli("compress", "hf://someone/their-lora", "-o", tmp_path / "mini", "--seed", "7", "--outer-dim", "16",
               "--rank", "4", "--json")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "mini" / MINI).read_bytes() == (minis["seed7"] / MINI).read_bytes()
    fetched = {r.path.rsplit("/", 1)[-1] for r in srv.requests_to(r"/resolve/", "GET")}
    assert fetched == {"adapter_config.json", "adapter_model.safetensors"}  # adapter files only, no README

    srv.commit_files("me/public-mini", {p.name: p.read_bytes() for p in minis["seed7"].iterdir()})
    res = _cli("inspect", "hf://me/public-mini")
    assert res.exit_code == 0 and "LoRA-Mini file from a peft adapter, 14 modules" in res.stdout
    res = _cli("verify", "hf://me/public-mini", "--against", "hf://someone/their-lora")
    assert res.exit_code == 0 and "integrity: OK" in res.stdout


_INSPECT_LIGHT = """
import sys
from lora_convert.cli import main
for uri in sys.argv[1:]:
    try:
        main.main(["inspect", uri], standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise
    print("HEAVY", ",".join(m for m in ("torch", "transformers") if m in sys.modules))
"""


def test_inspect_of_hf_uris_imports_neither_torch_nor_transformers(srv, fixtures, minis, tmp_path):
    """`inspect hf://...` downloads and checks every file and module, in a process that never loads
    torch: a LoRA-Mini repo and a PEFT adapter repo."""
    srv.commit_files("me/public-mini", {p.name: p.read_bytes() for p in minis["seed7"].iterdir()})
    srv.commit_files("someone/their-lora", {p.name: p.read_bytes() for p in (fixtures / SRC).iterdir()})
    env = {**os.environ, "HF_ENDPOINT": srv.endpoint, "HF_HUB_CACHE": constants.HF_HUB_CACHE,
           "HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", _INSPECT_LIGHT, "hf://me/public-mini", "hf://someone/their-lora"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    mini, peft = proc.stdout.split("HEAVY")[:2]
    assert "LoRA-Mini file from a peft adapter, 14 modules" in mini and "PEFT LoRA adapter, 14 LoRA modules" in peft
    assert [line for line in proc.stdout.splitlines() if line.startswith("HEAVY")] == ["HEAVY "] * 2, proc.stdout


def test_cli_push_pull_and_exit_codes(srv, minis, tmp_path):
    common = ["--token", WRITE, "--endpoint", srv.endpoint]
    res = _cli("push", minis["seed7"], REPO, "--private", "-m", "first", *common)
    assert res.exit_code == 0 and res.stdout.startswith(f"pushed to hf://{REPO}@main (commit ")
    assert HfApi(endpoint=srv.endpoint, token=WRITE).list_repo_commits(REPO)[0].title == "first"
    res = _cli("push", minis["seed7"], REPO, *common)
    assert res.exit_code == 0 and "already up to date" in res.stdout
    res = _cli("push", minis["seed8"], REPO, "--revision", "exp", *common)
    assert res.exit_code == 0 and f"hf://{REPO}@exp" in res.stdout

    res = _cli("pull", REPO, "-o", tmp_path / "out", "--revision", "exp", *common)
    assert res.exit_code == 0 and "14 modules, all outer fingerprints and checksums verified" in res.stdout
    assert (tmp_path / "out" / MINI).read_bytes() == (minis["seed8"] / MINI).read_bytes()
    res = _cli("pull", f"hf://{REPO}@main", "-o", tmp_path / "uri", *common)
    assert res.exit_code == 0 and (tmp_path / "uri" / MINI).read_bytes() == (minis["seed7"] / MINI).read_bytes()

    for args in (["pull", "me/missing", "-o", tmp_path / "m", *common],
                 ["pull", REPO, "-o", tmp_path / "m", "--revision", "nope", *common],
                 ["pull", REPO, "-o", tmp_path / "m", "--endpoint", srv.endpoint],
                 ["push", minis["seed8"], REPO, "--token", READ, "--endpoint", srv.endpoint],
                 ["push", tmp_path / "nothing-here", REPO, *common],
                 ["pull", "not a repo id!", "-o", tmp_path / "m", *common]):
        res = _cli(*args)
        assert res.exit_code == 2, (args, res.output)
        assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1 and "Traceback" not in res.output
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- offline and unreachable: the HF cache


def _cache_of(repo: str) -> Path:
    return Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))


def _flip_last_byte(path: Path) -> None:
    blob = path.resolve()  # the cache's blob behind the snapshot link
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))


def test_offline_serves_cached_revisions_without_any_request(srv, minis, tmp_path, monkeypatch):
    v1 = _push(srv, minis["seed7"]).commit
    HfApi(endpoint=srv.endpoint, token=WRITE).create_tag(REPO, tag="v1", revision=v1)
    v2 = _push(srv, minis["seed8"]).commit
    _pull(srv, tmp_path / "online")                              # caches main -> v2
    hub.download_uri(f"hf://{REPO}@v1", token=WRITE)             # caches the tag v1
    assert (_cache_of(REPO) / "refs" / "main").read_text() == v2
    srv.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # after import: the client's own constant still says online
    assert not constants.HF_HUB_OFFLINE

    seed7, seed8 = ((minis[s] / MINI).read_bytes() for s in ("seed7", "seed8"))
    for revision, commit, data in ((None, v2, seed8), ("v1", v1, seed7), (v1, v1, seed7)):
        dest = tmp_path / f"offline-{revision}"
        assert _pull(srv, dest, revision=revision).commit == commit and (dest / MINI).read_bytes() == data
    assert hub.download_uri(f"hf://{REPO}@v1").name == v1
    res = _cli("reconstruct", f"hf://{REPO}@v1", "-o", tmp_path / "restored")
    assert res.exit_code == 0 and (tmp_path / "restored" / "adapter_model.safetensors").is_file(), res.output
    assert srv.requests == []  # not one request, though the endpoint is up

    with pytest.raises(HubNetworkError, match=r"HF_HUB_OFFLINE is set, and revision 'v9' is not in the HF cache"):
        _pull(srv, tmp_path / "x", revision="v9")
    res = _cli("reconstruct", "hf://me/never-fetched", "-o", tmp_path / "x")
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.output
    assert "HF_HUB_OFFLINE is set, and revision 'main' is not in the HF cache" in res.stderr
    with pytest.raises(HubNetworkError, match="HF_HUB_OFFLINE is set, so nothing can be pushed"):
        _push(srv, minis["seed7"], revision="other")
    assert srv.requests == [] and not (tmp_path / "x").exists()


def test_offline_checks_files_against_the_cached_tree(srv, fixtures, tmp_path, monkeypatch):
    srv.commit_files("someone/their-lora", {p.name: p.read_bytes() for p in (fixtures / SRC).iterdir()})
    online = hub.download_uri("hf://someone/their-lora")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.download_uri("hf://someone/their-lora") == online  # LFS and plain files both match the tree

    _flip_last_byte(online / "adapter_model.safetensors")  # same size: only a checksum notices
    with pytest.raises(IntegrityError, match="adapter_model.safetensors does not match the repo's checksum"):
        hub.download_uri("hf://someone/their-lora")
    with pytest.raises(HubNetworkError, match="the cached revision 'main' lacks adapter_model.safetensors"):
        hub.download_uri("hf://someone/their-lora")  # evicted, and offline nothing can replace it


def test_offline_without_a_cached_tree_relies_on_the_lora_mini_checks(srv, minis, tmp_path, monkeypatch):
    """A cache written by an older client or by hf_hub_download has no trees/: LoRA-Mini files check themselves."""
    commit = _push(srv, minis["seed7"]).commit
    _pull(srv, tmp_path / "online")
    old = tmp_path / "old-cache"
    shutil.copytree(constants.HF_HUB_CACHE, old, symlinks=True, ignore=shutil.ignore_patterns("trees"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _pull(srv, tmp_path / "a", cache_dir=old).commit == commit
    _flip_last_byte(old / "models--me--tiny-mini" / "snapshots" / commit / MINI)  # inside the last tensor
    with pytest.raises(IntegrityError, match="SHA-256"):
        _pull(srv, tmp_path / "b", cache_dir=old)
    assert not (tmp_path / "b").exists()


def test_unreachable_endpoint_falls_back_to_the_cache_with_one_warning(srv, minis, tmp_path, caplog):
    commit = _push(srv, minis["seed7"]).commit
    _pull(srv, tmp_path / "online")
    closed = f"http://127.0.0.1:{_free_port()}"
    with caplog.at_level("WARNING", logger="lora_convert.hub"):
        result = hub.pull(REPO, tmp_path / "out", endpoint=closed, token=WRITE)
    assert result.commit == commit and (tmp_path / "out" / MINI).read_bytes() == (minis["seed7"] / MINI).read_bytes()
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: hf://{REPO}: cannot reach {closed} (ConnectError); using commit {commit[:12]} from the HF cache"]

    with pytest.raises(HubNetworkError, match=rf"cannot connect to {closed}.*and revision 'v9' is not in the HF cache"):
        hub.pull(REPO, tmp_path / "x", revision="v9", endpoint=closed, token=WRITE)
    # An answer from the Hub is no reason to fall back, even with the revision cached.
    srv.inject(REPO_INFO, status=503, times=None)
    with pytest.raises(HubNetworkError, match="server error HTTP 503"):
        _pull(srv, tmp_path / "x")
    srv.clear_faults()
    with pytest.raises(HubAuthError, match="token is missing or invalid"):
        _pull(srv, tmp_path / "x", token="hf_bogus")
    assert not (tmp_path / "x").exists()


def test_cli_on_a_stopped_hub_prints_one_warning_line(srv, minis, tmp_path):
    """In a real process: no logging set up, so the warning is one bare line on stderr."""
    _push(srv, minis["seed7"])
    _pull(srv, tmp_path / "online")
    endpoint = srv.endpoint
    srv.close()  # the Hub goes away; the cache stays
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_CACHE": constants.HF_HUB_CACHE,
           "HF_HOME": str(tmp_path / "hf-home"), hub.RETRIES_ENV: "0"}
    proc = subprocess.run([sys.executable, "-m", "lora_convert.cli", "inspect", f"hf://{REPO}"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "14 modules" in proc.stdout, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(
        f"warning: hf://{REPO}: cannot reach {endpoint} (ConnectError); using commit ")


# --------------------------------------------------------------------------- hf:// subfolders


def test_uri_forms_round_trip_and_bad_ones_are_one_line():
    for uri, (repo, revision, sub) in {
        "hf://me/loras": ("me/loras", None, ""),
        "hf://me/loras@v1/styles/ink": ("me/loras", "v1", "styles/ink"),
        "hf://me/loras/styles/ink": ("me/loras", None, "styles/ink"),
        "hf://me/loras@feature%2Fx/ink": ("me/loras", "feature/x", "ink"),
        "hf://me/loras@refs/pr/3/ink": ("me/loras", "refs/pr/3", "ink"),
    }.items():
        t = hub.parse_uri(uri)
        assert (t.repo_id, t.revision, t.subfolder) == (repo, revision, sub) and t.uri == uri
        assert hub.parse_uri(hub.format_uri(repo, revision, sub)) == t
    for uri, problem in {
        "hf://me/loras/styles@v1": "'@' after the path: the revision goes right after the repo id",
        "hf://me/loras/../other": "'.' and '..' are not allowed",
        "hf://me/loras/a//b": "empty segments",
        "hf://datasets/me/data/sub": "only model repos hold adapters",
        "hf://spaces/me/app": "only model repos hold adapters",
    }.items():
        with pytest.raises(BadInputError, match=re.escape(problem)) as err:
            hub.parse_uri(uri)
        assert str(err.value).startswith(f"{uri}: ") and "\n" not in str(err.value)


def test_hf_uri_subfolders_pull_download_and_cli(srv, minis, fixtures, tmp_path, monkeypatch):
    files = {f"styles/ink/{p.name}": p.read_bytes() for p in minis["seed7"].iterdir()}
    files.update({f"styles/pen/{p.name}": p.read_bytes() for p in (fixtures / SRC).iterdir()})
    files.update({"README.md": b"# several LoRAs\n", "styles/pen/old/adapter_model.safetensors": b"not read"})
    commit = srv.commit_files("me/loras", files)

    pulled = hub.pull("hf://me/loras@main/styles/ink", tmp_path / "ink", endpoint=srv.endpoint)
    assert (pulled.commit, pulled.modules, pulled.subfolder) == (commit, 14, "styles/ink")
    assert pulled.describe().startswith(f"pulled hf://me/loras@main/styles/ink (commit {commit[:12]})")
    assert sorted(p.name for p in (tmp_path / "ink").iterdir()) == [MINI, container.CONFIG_NAME]  # not ../README.md
    assert (tmp_path / "ink" / MINI).read_bytes() == (minis["seed7"] / MINI).read_bytes()

    srv.requests.clear()
    pen = hub.download_uri("hf://me/loras/styles/pen")
    assert pen == _cache_of("me/loras") / "snapshots" / commit / "styles" / "pen"
    assert sorted(p.name for p in pen.iterdir() if p.is_file()) == ["adapter_config.json", "adapter_model.safetensors"]
    fetched = {r.path.split("/resolve/", 1)[1] for r in srv.requests_to(r"/resolve/", "GET")}
    assert fetched == {f"{commit}/styles/pen/adapter_config.json", f"{commit}/styles/pen/adapter_model.safetensors"}

    res = _cli("compress", "hf://me/loras/styles/pen", "-o", tmp_path / "mini", "--seed", "7", "--outer-dim", "16",
               "--rank", "4")
    assert res.exit_code == 0 and (tmp_path / "mini" / MINI).read_bytes() == (minis["seed7"] / MINI).read_bytes()
    res = _cli("inspect", f"hf://me/loras@{commit}/styles/ink")
    assert res.exit_code == 0 and "14 modules" in res.stdout, res.output

    for args, problem in (
        (["inspect", "hf://me/loras/styles/none"], "hf://me/loras/styles/none: no folder 'styles/none' in the repo"),
        (["pull", "hf://me/loras/styles/pen", "-o", tmp_path / "x"],
         "not a LoRA-Mini folder: no lora_mini.safetensors in styles/pen/ at this revision"),
        (["pull", "hf://me/loras/styles@v1", "-o", tmp_path / "x"], "'@' after the path"),
        (["push", minis["seed7"], "hf://me/loras/styles/ink", "--token", WRITE], "a folder inside it is not supported"),
    ):
        res = _cli(*args)
        assert res.exit_code == 2 and res.stderr.count("\n") == 1 and problem in res.stderr, (args, res.output)
    assert not (tmp_path / "x").exists() and srv.repo("me/loras").branches["main"] == commit

    srv.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a subfolder is served from the cache like the top of a repo
    assert hub.download_uri("hf://me/loras/styles/pen") == pen
    assert hub.pull("hf://me/loras/styles/ink", tmp_path / "ink-offline").commit == commit
    assert srv.requests == []


def test_a_silent_endpoint_times_out_into_the_cache(srv, minis, tmp_path, monkeypatch, caplog):
    """A socket that accepts and never answers (a firewall dropping packets): the first request
    times out instead of hanging, and the cached commit is used."""
    commit = _push(srv, minis["seed7"]).commit
    _pull(srv, tmp_path / "online")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 0.5)
        monkeypatch.setenv(hub.RETRIES_ENV, "0")
        started = time.monotonic()
        with caplog.at_level("WARNING", logger="lora_convert.hub"):
            result = hub.pull(REPO, tmp_path / "out", endpoint=endpoint, token=WRITE)
    assert time.monotonic() - started < 30
    assert result.commit == commit and "ReadTimeout" in caplog.records[0].getMessage()


def test_corrupt_file_in_a_read_only_cache_is_one_integrity_error(srv, minis, tmp_path, monkeypatch):
    """Shared caches are often read-only: the file cannot be evicted, and the error says so."""
    commit = _push(srv, minis["seed7"]).commit
    snapshot = hub.download_uri(f"hf://{REPO}", token=WRITE)
    _flip_last_byte(snapshot / MINI)
    real_unlink = Path.unlink

    def read_only(path, *args, **kwargs):
        if str(path).startswith(constants.HF_HUB_CACHE):
            raise OSError(30, "Read-only file system", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(IntegrityError, match=rf"@{commit}: downloaded {MINI} does not match.*cache is read-only: "
                                             rf"remove .*{MINI}"):
        hub.download_uri(f"hf://{REPO}", token=WRITE)


@pytest.mark.parametrize("revision", [".", "..", "a/../b", "/abs", "a//b", "C:\\x"])
def test_dot_and_path_like_revisions_are_refused(revision):
    with pytest.raises(lc.BadInputError, match="invalid revision"):
        hub.pull(REPO, "never-written", revision=revision)
    assert not Path("never-written").exists()
