"""Atomic output: a SIGKILL in the middle of a large compress leaves the output path
either absent or complete and verifiable; concurrent writers never leave a mixed output."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers.cli import run_cli
from lora_convert import atomic
from lora_convert.atomic import atomic_dir, atomic_file

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # several run at once on few cores


def write_big_adapter(dest: Path, modules: int = 10, dim: int = 65536, r: int = 8) -> Path:
    """A PEFT adapter of modules × 4 MB (fp32 factors): wide and low-rank, so it is large on disk
    but cheap to compress (the cost grows with dim·r², the size with dim·r)."""
    dest.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(modules):
        key = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, dim, generator=g) * 0.01
        tensors[f"{key}.lora_B.weight"] = torch.randn(dim, r, generator=g) * 0.01
    save_file(tensors, dest / "adapter_model.safetensors", metadata={"format": "pt"})
    (dest / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": %d, "lora_alpha": %d, "target_modules": ["q_proj"]}' % (r, r))
    return dest


@pytest.fixture(scope="module")
def big_adapter(tmp_path_factory) -> Path:
    return write_big_adapter(tmp_path_factory.mktemp("big") / "adapter")


def compress_cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lora_convert.cli", "compress", str(src), "-o", str(out), *extra]


def verify(path: Path):
    return run_cli("verify", path)


def partials(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.*"))


def spool_bytes(parent: Path, name: str) -> int:
    """Bytes written so far by a compress into `parent/name` (its temp dir's or file's spool)."""
    total = 0
    for p in partials(parent, name):
        for f in ([p] if p.is_file() else p.rglob("*")):
            try:
                total += f.stat().st_size
            except FileNotFoundError:
                pass
    return total


def test_sigkill_mid_compress_leaves_nothing_or_a_complete_file(big_adapter, tmp_path):
    """Compresses of a 40 MB adapter (svd outers: a 40 MB output), killed with SIGKILL at
    different moments: as soon as the temporary output appears, half-way through writing, and
    half-way through replacing an existing complete output (which must survive intact)."""
    src = big_adapter
    total = sum(f.stat().st_size for f in src.iterdir())
    existing = tmp_path / "existing.safetensors"
    res = run_cli("compress", src, "-o", existing, "--outer-dim", "4")
    assert res.exit_code == 0, res.output
    before = existing.read_bytes()
    # (output, kill when this many bytes of temporary output exist)
    scenarios = [(tmp_path / "a", 0), (tmp_path / "b.safetensors", total // 2), (existing, total // 2)]
    procs = [[subprocess.Popen(compress_cmd(src, out, "--outer", "svd"), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL), out, threshold, False] for out, threshold in scenarios]
    deadline = time.monotonic() + 300
    while any(p[0].poll() is None for p in procs) and time.monotonic() < deadline:
        for entry in procs:
            proc, out, threshold, killed = entry
            if not killed and proc.poll() is None and partials(out.parent, out.name) \
                    and spool_bytes(out.parent, out.name) >= threshold:
                proc.send_signal(signal.SIGKILL)
                entry[3] = True
        time.sleep(0.002)
    outcomes = []
    for proc, out, threshold, killed in procs:
        proc.wait(timeout=60)
        outcomes.append((out.name, threshold, proc.returncode))
        if out.exists():
            res = verify(out)
            assert res.exit_code == 0, f"{out} is not a complete LoRA-Mini file: {res.output}"
        if out == existing:
            assert out.exists(), "a killed rewrite lost the previous output"
            if proc.returncode == -signal.SIGKILL:
                assert out.read_bytes() == before, "a killed rewrite changed the previous output"
        elif proc.returncode == -signal.SIGKILL:
            assert not out.exists() or verify(out).exit_code == 0
    assert any(o[2] == -signal.SIGKILL for o in outcomes), f"nothing was killed mid-way: {outcomes}"
    # a later run into the same output works despite the dead writer's leftovers
    out = scenarios[0][0]
    res = run_cli("compress", src, "-o", out, "--outer-dim", "4")
    assert res.exit_code == 0 and verify(out).exit_code == 0


def test_concurrent_writers_never_mix(tmp_path, fixtures):
    """Two processes compress the same adapter with different seeds into the same output at the
    same time (a directory and a single file, four processes in all): all succeed, and each
    result verifies and equals one of the two runs' outputs, with no temporary files left."""
    src = fixtures / "peft-tiny-llama"
    targets = ["mini", "mini.safetensors"]
    refs = {}
    for target in targets:
        for seed in (1, 2):
            ref = tmp_path / f"ref{seed}" / target
            res = run_cli("compress", src, "-o", ref, "--seed", seed)
            assert res.exit_code == 0, res.output
            refs[target, seed] = snapshot(ref)
    procs = [subprocess.Popen(compress_cmd(src, tmp_path / "shared" / target, "--seed", str(seed)), env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for target in targets for seed in (1, 2)]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
    for target in targets:
        out = tmp_path / "shared" / target
        assert verify(out).exit_code == 0
        assert snapshot(out) in (refs[target, 1], refs[target, 2])
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == sorted(targets), "temporary files left"


def snapshot(path: Path) -> dict:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_racing_publishers_in_threads(tmp_path, kind):
    """Many threads publish complete versions of the same destination at once, repeatedly:
    every publish succeeds and the destination is always exactly one version, never mixed."""
    dest = tmp_path / ("out" if kind == "dir" else "out.bin")
    writers, rounds = 6, 15
    errors, seen = [], []
    stop = threading.Event()

    def write(i: int, barrier: threading.Barrier) -> None:
        try:
            barrier.wait()
            if kind == "dir":
                with atomic_dir(dest) as tmp:
                    for part in ("a", "b", "c"):
                        (tmp / part).write_text(f"{i}" * 1000)
            else:
                with atomic_file(dest) as tmp:
                    tmp.write_text(f"{i}" * 3000)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def read_at(dir_fd: int, name: str) -> str:
        fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
        with os.fdopen(fd) as fh:
            return fh.read()

    def watch() -> None:
        """Read the destination as one snapshot: its files through one directory handle."""
        while not stop.is_set():
            try:
                if kind == "dir":
                    dir_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        parts = {read_at(dir_fd, p) for p in ("a", "b", "c")}
                    finally:
                        os.close(dir_fd)
                else:
                    parts = {dest.read_text()}
            except (FileNotFoundError, NotADirectoryError):
                continue  # before the first publish, or an old version removed while reading it
            seen.append(len(parts) == 1 and len(next(iter(parts))) in (1000, 3000))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(rounds):
            barrier = threading.Barrier(writers)
            threads = [threading.Thread(target=write, args=(i, barrier)) for i in range(writers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        stop.set()
        watcher.join()
    assert not errors, errors
    assert all(seen), "a reader saw a mixed or partial destination"
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]


def test_failed_write_leaves_previous_output(tmp_path):
    dest = tmp_path / "out"
    with atomic_dir(dest) as tmp:
        (tmp / "f").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "f").write_text("new, half")
            raise RuntimeError("boom")
    assert (dest / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("verb", ["compress", "convert", "reconstruct"])
def test_output_never_replaces_its_input(tmp_path, fixtures, verb):
    """Publishing replaces whatever is at the output path: the input (or a directory holding
    it) as output would be deleted once the output is complete. Refused, input untouched."""
    import shutil

    src = tmp_path / "adapter"
    shutil.copytree(fixtures / "peft-tiny-llama", src)
    if verb == "reconstruct":
        assert run_cli("compress", fixtures / "peft-tiny-llama", "-o", src / "mini").exit_code == 0
        src = src / "mini"
    before = snapshot(tmp_path)
    extra = ["--to", "peft"] if verb == "convert" else []
    for out in (src, src.parent, src / "."):
        res = run_cli(verb, src, "-o", out, *extra)
        assert res.exit_code == 2 and "would replace the input" in res.stderr, res.output
        assert res.stderr.count("\n") == 1
    own_file = next(p for p in sorted(src.iterdir()) if p.suffix == ".safetensors")
    linked = src / "linked.json"  # as in an HF cache snapshot: the entry is a link to a blob elsewhere
    linked.symlink_to(tmp_path / "blob.json")
    (tmp_path / "blob.json").write_text("{}")
    before = snapshot(tmp_path)
    config = next(p for p in sorted(src.iterdir()) if p.name.endswith("config.json"))
    for inp, out in ((src, own_file), (src, src / "new.safetensors"), (src, linked),
                     (config, own_file), (own_file, src / "other.json")):  # the input named by one of its files
        res = run_cli(verb, inp, "-o", out, *extra)
        assert res.exit_code == 2 and "among the files of the input" in res.stderr, (inp, out, res.output)
        assert res.stderr.count("\n") == 1
    assert snapshot(tmp_path) == before
    # a new folder inside, or anything deeper, is never read as part of the input
    res = run_cli(verb, src, "-o", src / "sub" / "out", *extra)
    assert res.exit_code == 0, res.output


# A writer that stops half-way through its atomic write and prints its temporary path.
HALF_WRITER = """
import sys, time
from pathlib import Path
from lora_convert.atomic import atomic_dir, atomic_file
kind, dest = sys.argv[1:]
with (atomic_dir if kind == "dir" else atomic_file)(dest) as tmp:
    (tmp / "half" if kind == "dir" else tmp).write_bytes(b"x" * 4096)
    print(tmp, flush=True)
    time.sleep(60)
"""


def start_half_writer(kind: str, dest: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", HALF_WRITER, kind, str(dest)], env=ENV,
                            stdout=subprocess.PIPE, text=True)
    partial = Path(proc.stdout.readline().strip())
    assert partial.exists() and str(proc.pid) in partial.name.split("."), partial
    return proc, partial


def write(kind: str, dest: Path, text: str = "done") -> None:
    if kind == "dir":
        with atomic_dir(dest) as tmp:
            (tmp / "f").write_text(text)
    else:
        with atomic_file(dest) as tmp:
            tmp.write_text(text)


def partial_path(dest: Path, pid: int, host: str | None = None, ns: str | None = None,
                 rand: str = "abcd_123") -> Path:
    """Where process `pid` of `host` would put its partial of `dest`."""
    owner = f"{host or atomic._host()}.{ns or atomic._pid_ns()}.{pid}"
    return dest.parent / f".{dest.name}.{owner}.{rand}.partial"


def fake_partial(dest: Path, pid: int, **owner) -> Path:
    partial = partial_path(dest, pid, **owner)
    partial.mkdir()
    (partial / "half").write_text("x")
    return partial


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_killed_writers_partial_is_removed_by_the_next_write(tmp_path, kind):
    dest = tmp_path / "out"
    proc, partial = start_half_writer(kind, dest)
    proc.kill()
    proc.wait()
    assert partial.exists(), "SIGKILL left nothing to clean up"
    write(kind, dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (dest / "f" if kind == "dir" else dest).read_text() == "done"


def test_live_writers_partial_survives(tmp_path):
    dest = tmp_path / "out"
    proc, partial = start_half_writer("dir", dest)
    try:
        write("dir", dest)
        assert (partial / "half").exists(), "a live writer's partial was removed"
        assert (dest / "f").read_text() == "done"
    finally:
        proc.kill()
        proc.wait()


def test_partial_older_than_its_live_pid_is_removed(tmp_path, monkeypatch):
    """A live pid that started after the partial last changed reused a dead writer's pid (after a
    reboot, say): here the test's own pid, with the boot moved an hour into the future."""
    dest = tmp_path / "out"
    partial = fake_partial(dest, os.getpid())
    write("dir", dest)
    assert partial.exists(), "the live owner's partial was removed"
    monkeypatch.setattr(atomic, "_boot_time", lambda: time.time() + 3600)
    write("dir", dest)
    assert not partial.exists(), "a partial older than the process now holding its pid survived"


def test_only_this_hosts_dead_writers_partials_of_this_dest_are_removed(tmp_path):
    dest = tmp_path / "out"
    pid = dead_pid()
    mine = fake_partial(dest, pid)
    kept = [fake_partial(dest, pid, host="otherhost"),  # a shared filesystem: its pids mean nothing here
            fake_partial(dest, pid, ns="1"),  # another container on this host
            fake_partial(tmp_path / "out.bin", pid),  # another destination
            Path(tempfile.mkdtemp(prefix=".out.", suffix=".partial", dir=tmp_path))]  # old name, no owner
    write("dir", dest)
    assert not mine.exists(), "a dead writer's partial survived"
    assert all(p.exists() for p in kept), [p.name for p in kept if not p.exists()]


def test_symlink_named_like_a_stale_partial_is_neither_followed_nor_removed(tmp_path):
    dest = tmp_path / "out"
    pid = dead_pid()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("keep")
    (tmp_path / "victim.txt").write_text("keep")
    links = [partial_path(dest, pid, rand="link0000"), partial_path(dest, pid, rand="link0001")]
    links[0].symlink_to(victim)
    links[1].symlink_to(tmp_path / "victim.txt")
    real = fake_partial(dest, pid)
    write("dir", dest)
    assert not real.exists(), "cleanup did not run"
    assert all(link.is_symlink() for link in links)
    assert (victim / "keep").read_text() == "keep" and (tmp_path / "victim.txt").read_text() == "keep"


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_long_output_names_still_write(tmp_path, kind):
    """Owner fields must not push a temporary past the 255-byte name limit: such names keep the
    owner-less form."""
    dest = tmp_path / ("n" * (254 - len(".") - 8 - len(".partial") - len(".")))  # fits owner-less only
    write(kind, dest)
    assert (dest / "f" if kind == "dir" else dest).read_text() == "done"
    assert [p.name for p in tmp_path.iterdir()] == [dest.name]


def test_sigterm_mid_compress_unwinds_and_leaves_nothing(big_adapter, tmp_path):
    """SIGTERM (what `kill`, systemd and job schedulers send) unwinds like Ctrl-C: one line,
    exit 128+15, no output and no .partial left behind."""
    out = tmp_path / "out"
    proc = subprocess.Popen(compress_cmd(big_adapter, out, "--outer", "svd"), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not spool_bytes(tmp_path, "out") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the compress finished before the signal arrived")
    assert proc.returncode == 128 + signal.SIGTERM and err.strip() == "error: terminated by SIGTERM", err
    assert not out.exists() and not partials(tmp_path, "out")


def test_cli_in_process_leaves_signal_handlers_as_it_found_them():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    assert run_cli("--help").exit_code == 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before
