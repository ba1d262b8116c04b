"""Atomic output: write into a temporary sibling, fsync, then rename into place.

A crash, a kill or an exception at any point leaves the destination either as it
was or complete; never half-written. Two writers racing on the same destination
each rename a complete file/directory, so the survivor is one of them, whole.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
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


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it is fsynced and renamed to `dest`."""
    dest = _target(dest)
    if dest.is_dir() and not dest.is_symlink():
        raise BadInputError("output is an existing directory; a single file was to be written here", dest)
    with _output_errors(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
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
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
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
