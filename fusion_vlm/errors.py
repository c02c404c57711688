"""The family of user-facing errors.

Every error that a person can cause with their input -- a config, an image, a
checkpoint, a data file -- derives from :class:`UserError`.  The command line
prints these as one line naming the input; any other exception is a bug and
keeps its traceback.  Each class also derives from ``ValueError`` so library
callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class UserError(ValueError):
    """Bad input from the user; the message is one line that names the input and what is wrong."""


class ConfigError(UserError):
    """A config value or key is invalid; the message names the field."""


class ImageError(UserError):
    """An image that cannot be used: unreadable, truncated, too large or empty."""


class CheckpointError(UserError):
    """A checkpoint or saved model that is missing, damaged or does not match the model."""


class DataError(UserError):
    """A dataset file or record that cannot be used."""


class UsageError(UserError):
    """A command-line argument value that cannot be used; the message names the flag."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder named by the user does not exist (also a ``FileNotFoundError``); the message names it."""


def one_line(text: object) -> str:
    """``str(text)`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


@contextlib.contextmanager
def user_input(kind: type[UserError] = UsageError, what: str | None = None) -> Iterator[None]:
    """Treat ``ValueError`` / ``FileNotFoundError`` raised inside as bad user input.

    Wrap only code that reads or checks what the user gave (a file they named,
    an argument's value): a ``ValueError`` there becomes ``kind``, a
    ``FileNotFoundError`` a :class:`MissingFileError`, with the same message
    on one line (prefixed by ``what``, e.g. the file name, when given). A
    :class:`UserError` passes unchanged; every other exception keeps its
    traceback.
    """
    prefix = f"{what}: " if what else ""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError as err:
        raise MissingFileError(one_line(prefix + str(err))) from err
    except ValueError as err:
        raise kind(one_line(prefix + str(err))) from err


__all__ = ["UserError", "ConfigError", "ImageError", "CheckpointError", "DataError", "UsageError",
           "MissingFileError", "one_line", "user_input"]
