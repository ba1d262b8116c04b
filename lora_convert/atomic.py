"""Atomic output: write into a temporary sibling, fsync, then rename into place.

A crash, a kill or an exception at any point leaves the destination either as it
was or complete; never half-written. Two writers racing on the same destination
each rename a complete file/directory, so the survivor is one of them, whole.

Temporaries are named `.NAME.HOST.PIDNS.PID.XXXXXXXX.partial` after their writer, so that the
next write to NAME can remove those a killed writer left (SIGKILL, power loss): see
_clean_stale_partials.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import BadInputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file below `path` (and the directories) before it is published."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb+") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))


@contextlib.contextmanager
def _output_errors(dest: Path) -> Iterator[None]:
    """OS errors while creating or publishing an output are the user's path problem: one line."""
    try:
        yield
    except OSError as exc:
        raise BadInputError(f"cannot write output ({exc.strerror or exc})", dest) from None


def _target(dest: str | os.PathLike) -> Path:
    dest = Path(dest).absolute()
    if dest.name in ("", ".", ".."):
        raise BadInputError("output must name a new or previous output, not the current or a parent "
                            "directory", dest)
    return dest


def _host() -> str:
    # dots go too: the owner fields of a partial's name are then split on dots without ambiguity
    return re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname()) or "_"


def _pid_ns() -> str:
    """This process's pid namespace: containers sharing a host name and a volume have their own pids."""
    with contextlib.suppress(OSError):
        ns = os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
        if ns.isdigit():
            return ns
    return "0"


_NAME_MAX = 255  # bytes in one path component on common filesystems


def _machine() -> str:
    """HOST.PIDNS: who, besides a pid, wrote a partial."""
    return f"{_host()}.{_pid_ns()}"


def _partial_prefix(dest: Path) -> str:
    """The temporary's name up to mkstemp's 8 random characters and the suffix. A name too long
    for its owner fields falls back to the owner-less form (never cleaned up, as before)."""
    owned = f".{dest.name}.{_machine()}.{os.getpid()}."
    fits = len(os.fsencode(owned)) + 8 + len(".partial") <= _NAME_MAX
    return owned if fits else f".{dest.name}."


# Margin for the rounding of /proc's boot time (whole seconds) and small wall-clock steps.
_CLOCK_SLACK = 10.0


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError(errno.ENOENT, "no btime in /proc/stat")


def _may_be_writing(pid: int, changed: float) -> bool:
    """Whether process `pid` of this host may still own a partial last changed at `changed`.

    A live pid can be a new process that reused a dead writer's pid: it is not the owner when it
    started after the partial last changed (ctime, which unlike mtime cannot be set back)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: alive, another user's
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True  # no /proc (macOS) or hidden: a reused pid cannot be told apart, keep it
    if fields[0] == "Z":
        return False  # a zombie never writes again
    started = _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return changed >= started - _CLOCK_SLACK


def _is_stale_partial(entry: os.DirEntry, ours: re.Pattern) -> bool:
    """An entry matching `ours` (a partial of one destination written on this host and pid
    namespace) whose writer is gone. Other hosts' partials (a shared filesystem) and old
    owner-less names never match."""
    m = ours.fullmatch(entry.name)
    if not m or int(m[1]) <= 0:  # kill(0) is the process group
        return False
    return not _may_be_writing(int(m[1]), entry.stat(follow_symlinks=False).st_ctime)


def _clean_stale_partials(dest: Path) -> None:
    """Remove the partials of `dest` that killed writers left, as huggingface_hub does `.incomplete`s.

    Best effort: whatever goes wrong leaves the entry, never fails the write. Symlinks are not
    ours (we never make them) and are neither followed nor removed."""
    if os.name != "posix":
        return  # os.kill(pid, 0) would terminate the process on Windows
    ours = re.compile(re.escape(f".{dest.name}.{_machine()}.") + r"([0-9]+)\.[a-z0-9_]{8}\.partial")
    with contextlib.suppress(OSError), os.scandir(dest.parent) as entries:
        for entry in entries:
            with contextlib.suppress(Exception):
                if not _is_stale_partial(entry, ours):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)  # refuses a symlink swapped in meanwhile
                elif entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it is fsynced and renamed to `dest`."""
    dest = _target(dest)
    if dest.is_dir() and not dest.is_symlink():
        raise BadInputError("output is an existing directory; a single file was to be written here", dest)
    with _output_errors(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale_partials(dest)
        fd, tmp = tempfile.mkstemp(prefix=_partial_prefix(dest), suffix=".partial", dir=dest.parent)
        os.close(fd)
        tmp = Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would leak into the published file
    try:
        yield tmp
        with _output_errors(dest):
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `dest`; on success it replaces `dest` whole.

    An existing `dest` is replaced only when it looks like a previous output of the same kind
    (plain files, all of which the new output rewrites): nothing else is ever deleted.
    """
    dest = _target(dest)
    with _output_errors(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale_partials(dest)
        tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(dest), suffix=".partial", dir=dest.parent))
        os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        _check_replaceable(tmp, dest)
        with _output_errors(dest):
            fsync_tree(tmp)
            _publish_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_replaceable(new: Path, dest: Path) -> None:
    if not os.path.lexists(dest):
        return
    if not dest.is_dir() or dest.is_symlink():
        raise BadInputError("output exists and is not a directory; remove it or choose another path", dest)
    old = set(os.listdir(dest))
    foreign = sorted(n for n in old if (dest / n).is_dir() or n not in set(os.listdir(new)))
    if foreign:
        raise BadInputError(f"output directory exists and holds {', '.join(foreign[:3])}, which this output "
                            "would delete; remove it or choose another path", dest)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE).

    False where that is unavailable (other OS, old kernel or libc, a filesystem without it);
    the caller then falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _publish_dir(tmp: Path, dest: Path) -> None:
    """Put the finished directory `tmp` at `dest` so that `dest` is never missing or mixed.

    A new `dest` is one rename. An existing one is swapped with `tmp` atomically where the
    kernel can (the old content then sits at `tmp` and is removed), else moved aside first,
    which leaves a moment without `dest` (the old content is then in a `.old` sibling).
    Concurrent publishers each retry until their rename lands: the survivor is one of them, whole.
    """
    for _ in range(100):
        if not os.path.lexists(dest):
            try:
                os.replace(tmp, dest)
                break
            except OSError as exc:  # someone published in between: go round and swap instead
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                    raise
                continue
        if _exchange(tmp, dest):
            _remove(tmp)  # now the previous content
            break
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        old.rmdir()
        try:
            os.replace(dest, old)
        except FileNotFoundError:
            continue
        try:
            os.replace(tmp, dest)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise
            continue
        finally:
            _remove(old)
        break
    else:
        raise OSError(errno.EBUSY, f"could not publish {dest}: other writers kept replacing it")
    _fsync_dir(dest.parent)


@contextlib.contextmanager
def atomic_output(dest: str | os.PathLike, is_dir: bool) -> Iterator[Path]:
    """atomic_dir or atomic_file, chosen by the caller's notion of the destination."""
    cm = atomic_dir(dest) if is_dir else atomic_file(dest)
    with cm as tmp:
        yield tmp
