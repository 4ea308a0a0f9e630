"""The one error type to catch: every failure that has a one-line message for the user derives from
`IsearleError` (a bad image, weights that cannot be had, a damaged artifact, a bad caption...).

The app and the CLI catch this one type and show `str(error)`; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class IsearleError(Exception):
    """A failure the user can act on; its message says what to do, in one line."""
