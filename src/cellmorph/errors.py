"""User-facing errors.

Anything a user can cause (bad files, bad metadata, bad configs) raises
:class:`CellmorphError` with one line that names the file or row. The CLI turns
it into that line on stderr and a non-zero exit, with no traceback.
"""

from __future__ import annotations

import re
from contextlib import contextmanager


_OPTION = re.compile("\0([A-Za-z_][A-Za-z0-9_]*)\0")


def option(name: str) -> str:
    """A setting named inside an error message (``name``: its field or argument, e.g. ``"device"``): the library's
    message says ``device``, the command line's the flag it maps that setting to (``--device``). So a notebook user
    reads the argument to change and a shell user the option to give, from one message."""
    return f"\0{name}\0"


class CellmorphError(Exception):
    """An error caused by the user's input, reported as one clear line.

    The line is guaranteed: a message that quotes another library's multi-line text (a YAML
    parser's context, a CSV tokenizer's) is folded onto one line, so the CLI never prints more.
    Settings named with :func:`option` read as their field names here, and as their flags in
    :meth:`command_line_text`.
    """

    exit_code = 2

    def __str__(self) -> str:
        return " ".join(_OPTION.sub(lambda m: m.group(1), super().__str__()).split())

    def command_line_text(self, flags: dict[str, str] | None = None) -> str:
        """The message for the command line: each :func:`option` as its flag (``flags``: field → flag where the
        flag is not ``--`` and the field's name with dashes)."""
        flags = flags or {}
        text = _OPTION.sub(lambda m: flags.get(m.group(1), "--" + m.group(1).replace("_", "-")), super().__str__())
        return " ".join(text.split())


class DiskFullError(CellmorphError):
    """The file system ran out of space (or quota) while writing an output."""

    @classmethod
    def from_os_error(cls, exc: OSError, writing=None) -> "DiskFullError":
        where = writing if writing is not None else exc.filename
        return cls(f"no space left on device writing {where}" if where else "no space left on device")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk or the user's quota is full.

    By errno (ENOSPC, EDQUOT), or by text where a library drops the errno: numpy's ``tofile``
    and ``save`` report a short write as "N requested and M written", pyarrow as its own
    OSError with the C library's message.
    """
    import errno
    import re

    if not isinstance(exc, OSError):
        return False
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return ("No space left on device" in text or "Disk quota exceeded" in text
            or re.search(r"\d+ requested and \d+ written", text) is not None)


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


@contextmanager
def disk_full_as_error(writing=None):
    """A full disk inside the block raises :class:`DiskFullError` (naming ``writing``, else the
    OS error's file), so that a command's clean-up of partial output, which handles
    CellmorphError, also runs when the disk fills outside the atomic-write helpers."""
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError.from_os_error(exc, writing) from None
        raise
