"""The one error type to catch: every failure that has a one-line message for the user derives from
`IsearleError` (a bad image, weights that cannot be had, a damaged artifact, a bad caption...).

The app and the CLI catch this one type and show `str(error)`; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class IsearleError(Exception):
    """A failure the user can act on; its message says what to do, in one line."""


class BadRequest(IsearleError, ValueError):
    """A request the loaded models cannot answer as asked (unknown method or backbone, no phi, no reference)."""


class NotFound(IsearleError, FileNotFoundError):
    """Something the user named is not there (a gallery index, an image folder, a file)."""
