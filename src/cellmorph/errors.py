"""User-facing errors.

Anything a user can cause (bad files, bad metadata, bad configs) raises
:class:`CellmorphError` with one line that names the file or row. The CLI turns
it into that line on stderr and a non-zero exit, with no traceback.
"""

from __future__ import annotations


class CellmorphError(Exception):
    """An error caused by the user's input, reported as one clear line."""

    exit_code = 2


class BadInputError(CellmorphError):
    """A data file or metadata row that cannot be used."""
