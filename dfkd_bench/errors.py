"""One exception type for every error a user can fix.

The CLI prints a :class:`DfkdError` as a single line (``error: ...``) and exits
with status 2, never with a traceback. Its message must say what is wrong and
what to do about it, and never names an exception class.
"""

from __future__ import annotations

import re

# torch's DataLoader re-raises an error of a worker process as the same type with the message
# "Caught X in DataLoader worker process N.\nOriginal Traceback ...\n<module>.X: <message>".
_WORKER_WRAPPED = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback", re.S)
_CLASS_PREFIX = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt):\s+")


def _one_line(message: str) -> str:
    if _WORKER_WRAPPED.match(message):
        lines = [line for line in message.splitlines() if line.strip()]
        message = _CLASS_PREFIX.sub("", lines[-1].strip()) if lines else message
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " ".join(lines)


class DfkdError(Exception):
    """A user-facing error: bad input, missing data, corrupt checkpoint, ...

    ``str()`` is always one line: a message raised in a DataLoader worker comes back
    wrapped in a traceback, which is reduced to the original message.
    """

    def __str__(self) -> str:
        return _one_line(super().__str__())


class DatasetNotFoundError(DfkdError):
    """A dataset root is missing or does not have the expected layout."""


class DataError(DfkdError):
    """A data file exists but cannot be read (a truncated or corrupt image ...)."""


class CheckpointError(DfkdError):
    """A checkpoint cannot be read or does not fit the architecture."""


class ConfigError(DfkdError):
    """A configuration value is unknown or invalid."""


def user_message(error: BaseException) -> str:
    """One line for a user: a :class:`DfkdError`'s message as it is; for an operating-system error
    its reason and file; otherwise the first line of the message, without the exception's class name."""
    if isinstance(error, DfkdError):
        return str(error)
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    text = _one_line(str(error))
    return _CLASS_PREFIX.sub("", text) or "unexpected error without a message; rerun with --debug for the traceback"
