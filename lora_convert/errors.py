"""One exception hierarchy for lora_convert.

Every error a user can cause is a :class:`BadInputError` (CLI exit code 2) and
its message is a single line that names the file (or repo) and the problem.
Anything else that escapes is a bug and exits with code 1.
"""
from __future__ import annotations

import os


class LoraConvertError(Exception):
    """Base class of every error raised on purpose by lora_convert."""

    exit_code = 1

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.problem = " ".join(str(message).split())
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)


class BadInputError(LoraConvertError):
    """The input is malformed, inconsistent or unsupported (exit code 2)."""

    exit_code = 2


class OverBudgetError(BadInputError):
    """An output would be larger than the byte budget it was given (nothing was written)."""


class UnsupportedError(BadInputError):
    """The input is well-formed but uses a feature lora_convert does not handle yet."""


class FormatDetectionError(BadInputError):
    """A file matches no known adapter layout, or more than one."""


class IntegrityError(BadInputError):
    """A fingerprint or checksum in a LoRA-Mini file does not match its content."""


class HubError(LoraConvertError):
    """A Hub operation failed; the message says what to do about it."""

    exit_code = 2


class HubNotFoundError(HubError):
    """The repository, revision or file does not exist (or is not visible with this token)."""


class HubAuthError(HubError):
    """The token is missing, invalid, or lacks permission."""


class HubNetworkError(HubError):
    """The endpoint could not be reached or kept failing after retries."""
