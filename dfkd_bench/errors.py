"""One exception type for every error a user can fix.

The CLI prints a :class:`DfkdError` as a single line (``error: ...``) and exits
with status 2, never with a traceback. Its message must say what is wrong and
what to do about it.
"""


class DfkdError(Exception):
    """A user-facing error: bad input, missing data, corrupt checkpoint, ..."""


class DatasetNotFoundError(DfkdError):
    """A dataset root is missing or does not have the expected layout."""


class CheckpointError(DfkdError):
    """A checkpoint cannot be read or does not fit the architecture."""


class ConfigError(DfkdError):
    """A configuration value is unknown or invalid."""
