"""Where inputs live: a local path, or ``hf://owner/repo[@revision]`` on the Hub."""
from __future__ import annotations

import os
from pathlib import Path

HF_SCHEME = "hf://"


def is_hub_uri(path: str | os.PathLike) -> bool:
    return isinstance(path, str) and path.startswith(HF_SCHEME)


def local_path(path: str | os.PathLike) -> Path:
    """A local path for `path`, downloading (and verifying) ``hf://`` inputs first."""
    if is_hub_uri(path):
        from .hub import download_uri

        return download_uri(path)
    return Path(path)
