"""One exception type for every bad input the user can fix.

The CLI prints the message of an `AlignKDError` on one line and exits with status 2; anything else is a
bug and keeps its traceback. Messages name the file or field at fault.
"""

import reprlib


class AlignKDError(Exception):
    """A bad input: missing/corrupt file, wrong config, mismatched tokenizer, over-long sample..."""


class ConfigError(AlignKDError):
    """A config file, field or preset is wrong."""


class CheckpointError(AlignKDError):
    """A checkpoint directory is missing, truncated or does not match its config."""


class DataError(AlignKDError):
    """An image, sample, prompt or dataset entry is unusable."""


_SHOWN = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 2, 80, 80, 40
_SHOWN.maxtuple = _SHOWN.maxlist = _SHOWN.maxdict = _SHOWN.maxset = 4


def shown(value) -> str:
    """A user's value as an error message quotes it: repr, cut short. A 392-byte YAML of nested aliases
    ("billion laughs") expands to gigabytes under plain repr()."""
    return _SHOWN.repr(value)
