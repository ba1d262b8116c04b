"""Talking to the Hub: offline mode, retries of transient failures, and client errors as one-line errors.

Transient failures (5xx, 429, 408, dropped connections, timeouts, short downloads) are retried with
exponential backoff on top of the client's own retries: LORA_CONVERT_HUB_RETRIES (default 4) more
attempts, LORA_CONVERT_HUB_BACKOFF (default 1.0) seconds before the first, doubling, at most 30 s.
"""
from __future__ import annotations

import os
import time
from typing import Callable, TypeVar

import httpx2
from huggingface_hub import constants
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, HFValidationError,
                                    LocalEntryNotFoundError, LocalTokenNotFoundError, OfflineModeIsEnabled,
                                    RepositoryNotFoundError, RevisionNotFoundError)

from ..errors import BadInputError, HubAuthError, HubError, HubNetworkError, HubNotFoundError, LoraConvertError
from .addresses import Target

T = TypeVar("T")
RETRIES_ENV, BACKOFF_ENV = "LORA_CONVERT_HUB_RETRIES", "LORA_CONVERT_HUB_BACKOFF"
DEFAULT_RETRIES, DEFAULT_BACKOFF, MAX_DELAY = 4, 1.0, 30.0
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
LOGIN_HINT = "run `hf auth login` (or `huggingface-cli login`), set HF_TOKEN, or pass --token"


def offline_variable() -> str:
    """The variable that decides offline mode, for messages too: HF_HUB_OFFLINE when it is set,
    else the older TRANSFORMERS_OFFLINE when that one is."""
    return "TRANSFORMERS_OFFLINE" if os.environ.get("TRANSFORMERS_OFFLINE") and not os.environ.get(
        "HF_HUB_OFFLINE") else "HF_HUB_OFFLINE"


def offline_mode() -> bool:
    """Is HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set, now or when the client was imported?

    The client reads the variable once, at import; a program that sets it later means it too.
    """
    value = os.environ.get(offline_variable()) or ""
    return constants.is_offline_mode() or value.upper() in constants.ENV_VARS_TRUE_VALUES


def root_cause(exc: BaseException) -> BaseException:
    """The error behind the client's "not in the local cache either" wrappers."""
    while isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def unreachable(error: HubNetworkError) -> httpx2.TransportError | None:
    """The connection failure behind `error` when the endpoint could not be reached at all.

    None when the Hub answered (5xx...) or a proxy is misconfigured: not a reason to go offline.
    """
    cause = root_cause(error.__cause__) if error.__cause__ else error
    if isinstance(cause, httpx2.TransportError) and not isinstance(cause, httpx2.ProxyError):
        return cause
    return None


def call(t: Target, what: str, fn: Callable[[], T]) -> T:
    """Run one Hub operation, retrying transient failures, and turn errors into one line.

    The client retries some requests itself (tree listings, LFS transfers, a 5xx on HEAD) but
    not repo_info, commits, branch creation or a 5xx on GET /resolve: retrying here covers them.
    """
    retries, base = _retry_policy()
    for attempt in range(retries + 1):
        try:
            return fn()
        except LoraConvertError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated below, or re-raised untouched
            cause = root_cause(exc)
            if attempt < retries and _transient(cause):
                time.sleep(_delay(cause, base, attempt))
                continue
            error = translate(cause, t, what, attempt + 1)
            if error is None:
                raise
            raise error from exc
    raise AssertionError("unreachable")


def translate(exc: BaseException, t: Target, what: str, attempts: int = 1) -> LoraConvertError | None:
    """The one-line lora_convert error for a client error, or None when it is not a Hub error."""
    if _short_download(exc):
        return HubNetworkError(f"the download kept ending early while trying to {what}, {attempts} attempt(s); "
                               "check the network and run the command again (it resumes)", t.uri)
    for kinds, make in _TRANSLATIONS:
        if isinstance(exc, kinds):
            return make(exc, t, what, attempts)
    return None


def _retry_policy() -> tuple[int, float]:
    """(extra attempts, first delay in seconds) from the environment."""
    try:
        retries = int(os.environ.get(RETRIES_ENV, DEFAULT_RETRIES))
        base = float(os.environ.get(BACKOFF_ENV, DEFAULT_BACKOFF))
    except ValueError:
        raise BadInputError(f"{RETRIES_ENV} must be an integer and {BACKOFF_ENV} a number of seconds") from None
    return max(retries, 0), max(base, 0.0)


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None) if isinstance(exc, HfHubHTTPError) else None
    return getattr(response, "status_code", None)


def _short_download(exc: BaseException) -> bool:
    """The client's "Consistency check failed" (fewer bytes than announced, after its own retries)."""
    return type(exc) is OSError and str(exc).startswith("Consistency check failed")


def _transient(exc: BaseException) -> bool:
    """Worth another try: dropped/refused connections, timeouts, short downloads, 5xx, 429, 408."""
    return isinstance(exc, httpx2.TransportError) or _status(exc) in TRANSIENT_STATUS or _short_download(exc)


def _delay(exc: BaseException, base: float, attempt: int) -> float:
    retry_after = exc.response.headers.get("Retry-After", "") if _status(exc) else ""
    if retry_after.strip().isdigit():  # a 429/503 that says when: honour it, within reason
        return min(float(retry_after), MAX_DELAY)
    return min(base * 2**attempt, MAX_DELAY)


def _not_found(exc, t: Target, what, attempts) -> HubError:
    if not t.sends_token():
        return HubNotFoundError(f"repository not found on {t.endpoint} (no token was sent: if it is private, "
                                f"{LOGIN_HINT})", t.uri)
    return HubNotFoundError(f"repository not found on {t.endpoint}, or this token cannot see it", t.uri)


def _http(exc, t: Target, what, attempts) -> HubError:
    status = _status(exc)
    server = " ".join(str(getattr(exc, "server_message", None) or "").split())
    detail = f" ({server})" if server else ""
    if status == 401:
        return HubAuthError(f"authentication failed while trying to {what}: the token is missing or invalid{detail}; "
                            f"{LOGIN_HINT}", t.uri)
    if status == 403:
        return HubAuthError(f"permission denied while trying to {what}{detail}: this token cannot write to the "
                            f"repo; use a token with write access ({LOGIN_HINT})", t.uri)
    if status == 404:
        return HubNotFoundError(f"not found (HTTP 404) while trying to {what}{detail}", t.uri)
    if status == 412:
        return HubError(f"the branch moved while trying to {what} (someone pushed meanwhile); run the push again",
                        t.uri)
    if status in TRANSIENT_STATUS:
        return HubNetworkError(f"server error HTTP {status} from {t.endpoint} while trying to {what}, "
                               f"{attempts} attempt(s){detail}; the Hub may be down, try again later", t.uri)
    return HubError(f"the Hub refused to {what}: HTTP {status}{detail}", t.uri)


def _transport(exc, t: Target, what, attempts) -> HubError:
    if isinstance(exc, httpx2.ConnectError):
        how = "cannot connect to"
    elif isinstance(exc, httpx2.TimeoutException):
        how = "timed out talking to"
    else:
        how = "the connection dropped talking to"
    return HubNetworkError(f"{how} {t.endpoint} while trying to {what}, {attempts} attempt(s) ({type(exc).__name__}: "
                           f"{exc}); check the network, HF_ENDPOINT or --endpoint", t.uri)


_TRANSLATIONS: list[tuple[type | tuple[type, ...], Callable[..., LoraConvertError]]] = [
    (GatedRepoError, lambda e, t, w, a: HubAuthError(
        f"gated repository: accept its conditions on the Hub, then {LOGIN_HINT}", t.uri)),
    (RevisionNotFoundError, lambda e, t, w, a: HubNotFoundError(
        f"revision {t.revision!r} not found: not a branch, tag or commit of {t.repo_id}", t.uri)),
    (RepositoryNotFoundError, _not_found),
    (EntryNotFoundError, lambda e, t, w, a: HubNotFoundError(f"file not found while trying to {w}", t.uri)),
    (HfHubHTTPError, _http),
    (httpx2.TransportError, _transport),
    (LocalTokenNotFoundError, lambda e, t, w, a: HubAuthError(f"no token found; {LOGIN_HINT}", t.uri)),
    (OfflineModeIsEnabled, lambda e, t, w, a: HubNetworkError(
        f"HF_HUB_OFFLINE is set, so the Hub cannot be asked to {w}", t.uri)),
    (LocalEntryNotFoundError, lambda e, t, w, a: HubNetworkError(
        f"could not reach {t.endpoint} to {w} and nothing usable is cached", t.uri)),
    (HFValidationError, lambda e, t, w, a: BadInputError(str(e).splitlines()[0], t.uri)),
]
