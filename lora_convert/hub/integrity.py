"""What the client does not check: every file against the repo tree's checksums, and every LoRA-Mini module.

The client checks only a download's size, and serves a commit's cached files without asking the
Hub again: a corrupt file is therefore checked here and removed from the cache, so that the next
run downloads it anew.
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Iterator

from huggingface_hub.hf_api import RepoFile

from ..containerspec import MiniFile, open_mini
from ..errors import LoraConvertError


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub lists as the ``oid`` of a non-LFS file.

    >>> git_blob_sha1(b"")
    'e69de29bb2d1d6434b8b29ae775ad8c2e48c5391'
    """
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def matches(entry: RepoFile, path: Path) -> bool:
    """Does the local file have the size and hash the repo tree lists for it?

    LFS files are checked against their sha256; others against their git blob sha1. A listing
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
    """Remove one file from the HF cache (the snapshot entry and the blob behind it); False when the
    cache would not let us (a read-only shared cache).

    One file, not the revision (as the client's delete strategies do): the commit's other files
    and the ref that names it stay, so offline runs can still say which file is missing.
    """
    try:
        blob = cached.resolve() if cached.is_symlink() else None
        cached.unlink(missing_ok=True)
        if blob is not None:
            blob.unlink(missing_ok=True)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def naming(where: str) -> Iterator[None]:
    """lora_convert errors raised inside name `where` (a path or hf:// URI) instead of the file."""
    try:
        yield
    except LoraConvertError as exc:
        raise type(exc)(exc.problem, where) from None


def verify_mini(folder: Path, where: str) -> MiniFile:
    """Make every check loading a LoRA-Mini adapter makes (header, each module, each passthrough
    tensor), without torch. Errors name `where`."""
    with naming(where):
        f = open_mini(folder)
        f.check_all()
    return f


def _digest(path: Path, algorithm: str, prefix: bytes = b"") -> str:
    h = hashlib.new(algorithm, prefix)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer git stores for an LFS file: its git oid is the one the repo tree lists."""
    return b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n" % (sha256.encode(), size)
