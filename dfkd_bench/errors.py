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
    return bounded(" ".join(lines))


QUOTE_LIMIT = 80
"""Characters of a value an error line quotes at most (a 100,000-character --set value is not printed back)."""


def shorten(text: str, limit: int = QUOTE_LIMIT, unit: str = "characters") -> str:
    """``text`` itself, or its first and last characters around "..." with its length when longer than ``limit``."""
    if len(text) <= limit:
        return text
    head = max(1, limit - 20)
    return f"{text[:head]}...{text[-10:]} ({len(text):,} {unit})"


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error line, at most about ``limit`` characters of it."""
    try:
        text = repr(value)
    except ValueError:  # an integer beyond Python's digit limit for str()
        text = f"<an integer of about {value.bit_length() * 0.30103:,.0f} digits>" if isinstance(value, int) else "<?>"
    return shorten(text, limit)


# In an error line: a quoted value, a run of digits, or any run without spaces longer than the limit
# (a path stays whole below 1,000 characters).
# (a quote after a letter is an apostrophe, "the teacher's", not the start of a value)
_LONG_QUOTED = re.compile(r"(?<!\w)'[^'\n]{%d,}'(?!\w)|(?<!\w)\"[^\"\n]{%d,}\"(?!\w)"
                          % (QUOTE_LIMIT, QUOTE_LIMIT))
_LONG_DIGITS = re.compile(r"\d{%d,}" % QUOTE_LIMIT)
_LONG_TOKEN = re.compile(r"\S{1000,}")


def _a_path(quoted: str) -> bool:
    """A quoted file path (a "/" and no white space, under 1,000 characters): kept whole, since the file's
    name is at its end and a path is where to look, not a bad value typed back."""
    return "/" in quoted and len(quoted) < 1000 and not any(c.isspace() for c in quoted[1:-1])


def bounded(message: str) -> str:
    """An error line with every quoted value, number or word longer than about :data:`QUOTE_LIMIT`
    characters cut to its ends (the whole value was the user's own input: they know the rest)."""
    if len(message) <= QUOTE_LIMIT:
        return message
    message = _LONG_DIGITS.sub(lambda m: shorten(m.group(0), QUOTE_LIMIT, "digits"), message)
    message = _LONG_QUOTED.sub(lambda m: m.group(0) if _a_path(m.group(0)) else shorten(m.group(0)), message)
    return _LONG_TOKEN.sub(lambda m: shorten(m.group(0)), message)


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
    try:
        text = _one_line(str(error))
    except ValueError:  # str() of an error about a huge integer can itself fail
        text = type(error).__name__
    return _CLASS_PREFIX.sub("", text) or "unexpected error without a message; rerun with --debug for the traceback"
