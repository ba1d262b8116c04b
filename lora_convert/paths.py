"""Where inputs live: a local path, or ``hf://owner/repo[@revision][/folder]`` on the Hub."""
from __future__ import annotations

import os
from pathlib import Path

HF_SCHEME = "hf://"


def is_hub_uri(path: str | os.PathLike) -> bool:
    return isinstance(path, str) and path.startswith(HF_SCHEME)


def local_path(path: str | os.PathLike, expect: str | None = None) -> Path:
    """A local path for `path`, downloading (and verifying) ``hf://`` inputs first.

    `expect` ("lora-mini" or "adapter") says what a Hub repo must hold (see hub.download_uri);
    the endpoint and token come from HF_ENDPOINT and HF_TOKEN / the saved login. A folder in the
    URI yields that folder of the cached snapshot. With HF_HUB_OFFLINE=1 the HF cache alone answers.

    >>> local_path("./mini")
    PosixPath('mini')
    >>> local_path("hf://me/llama-lora-mini@v1", expect="lora-mini")       # doctest: +SKIP
    PosixPath('~/.cache/huggingface/hub/models--me--llama-lora-mini/snapshots/3f2a…')
    >>> local_path("hf://me/sd-loras@v1/styles/ink")                        # doctest: +SKIP
    PosixPath('~/.cache/huggingface/hub/models--me--sd-loras/snapshots/9c1d…/styles/ink')
    """
    if is_hub_uri(path):
        from .hub import download_uri

        return download_uri(path, expect=expect)
    return Path(path)
