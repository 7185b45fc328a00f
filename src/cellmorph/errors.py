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


def validated(model_cls, data: dict, where: str):
    """Build a pydantic config model; the first validation problem becomes one CellmorphError line."""
    from pydantic import ValidationError

    try:
        return model_cls(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        # A model validator's ValueError has no field and pydantic prefixes its text.
        message = str(first["msg"]).removeprefix("Value error, ")
        raise CellmorphError(f"{where}: {loc}: {message}" if loc else f"{where}: {message}") from None
