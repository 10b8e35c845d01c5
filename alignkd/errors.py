"""One exception type for every bad input the user can fix.

The CLI prints the message of an `AlignKDError` on one line and exits with status 2; anything else is a
bug and keeps its traceback. Messages name the file or field at fault.
"""


class AlignKDError(Exception):
    """A bad input: missing/corrupt file, wrong config, mismatched tokenizer, over-long sample..."""


class ConfigError(AlignKDError):
    """A config file, field or preset is wrong."""


class CheckpointError(AlignKDError):
    """A checkpoint directory is missing, truncated or does not match its config."""


class DataError(AlignKDError):
    """An image, sample, prompt or dataset entry is unusable."""
