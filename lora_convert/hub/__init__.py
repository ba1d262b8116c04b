"""Share adapters on the Hugging Face Hub (or any Hub-compatible endpoint), verified end to end.

Built on the real ``huggingface_hub`` client and its conventions: the token comes from
``token=``, else ``HF_TOKEN`` or the saved login (``hf auth login`` / ``huggingface-cli login``);
the endpoint from ``endpoint=``, else ``HF_ENDPOINT``; downloads land in the HF cache
(``HF_HOME`` / ``HF_HUB_CACHE``); a revision is a branch, a tag or a commit sha.

    >>> from lora_convert import hub                                        # doctest: +SKIP
    >>> hub.push("./mini", "me/llama-lora-mini", private=True).commit        # doctest: +SKIP
    '3f2a…'
    >>> hub.pull("me/llama-lora-mini", "./mini-copy", revision="v1").path    # doctest: +SKIP
    PosixPath('mini-copy')
    >>> hub.download_uri("hf://me/sd-loras@v1/styles/ink")                   # doctest: +SKIP
    PosixPath('~/.cache/huggingface/hub/models--me--sd-loras/snapshots/9c1d…/styles/ink')

One module per job:

- ``addresses``: ``hf://owner/repo[@rev][/path]`` (huggingface_hub's HfFileSystem grammar) and the
  Target (repo, revision, folder, endpoint, token) every operation works on;
- ``retry``: offline mode, retries of transient failures, client errors as one-line errors
  (HubNotFoundError, HubAuthError, HubNetworkError, HubError, BadInputError);
- ``integrity``: what the client does not check: each file's sha256 / git oid, every LoRA-Mini module;
- ``download``: pull, download_uri and local_path, through the HF cache, offline from it;
- ``upload``: push, one idempotent commit of the file, its summary config and the model card;
- ``modelcard``: the generated README.md.

With HF_HUB_OFFLINE=1 no request is made: the revision and its files come from the HF cache.
When the endpoint cannot be reached at all, the cache is used the same way and one warning line
(logger ``lora_convert.hub``) says so; any answer from the Hub (404, 401, 5xx) is reported as it is.
"""
from __future__ import annotations

from .addresses import HF_SCHEME, Target, format_uri, is_hub_uri, parse_uri
from .download import PullResult, download_uri, local_path, pull
from .upload import PushResult, push
from .retry import BACKOFF_ENV, RETRIES_ENV

__all__ = ["push", "pull", "download_uri", "local_path", "is_hub_uri", "parse_uri", "format_uri", "PushResult",
           "PullResult", "Target", "HF_SCHEME", "RETRIES_ENV", "BACKOFF_ENV"]
