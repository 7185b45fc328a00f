"""Provenance for every output directory: resolved config, package versions, git commit.

Also the atomic-write helpers every stage uses, so that an interrupted or
failed run never leaves a half-written file under its final name.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

PACKAGES = (
    "cellmorph",
    "numpy",
    "pandas",
    "pyarrow",
    "tifffile",
    "torch",
    "torchvision",
    "timm",
    "scikit-learn",
    "scikit-image",
    "pydantic",
)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit of the cellmorph source tree, with ``-dirty`` if it has changes; None outside git."""
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def run_info() -> dict:
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "command": sys.argv,
        "packages": package_versions(),
    }


@contextmanager
def atomic_path(final: Path, suffix: str | None = None):
    """Yield a temporary path beside ``final``; rename it onto ``final`` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix or ".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def created_root(path: Path) -> Path | None:
    """The top-most folder of ``path`` that does not exist yet (None when ``path`` exists):
    what a command that fails before finishing must remove to leave nothing behind."""
    path = Path(path)
    return next((p for p in reversed([path, *path.parents]) if not p.exists()), None)


def require_output_dir(path: Path, what: str = "output folder") -> Path:
    """``path`` as a folder this process can create and write into, else one CellmorphError line.

    Called at the boundary of every command that writes a folder, before any work, so a
    wrong ``--out`` fails at once with the path named, not as a traceback hours later. It
    really creates the folder and a probe file (permission bits say nothing to root, and
    nothing of a read-only file system), then removes whatever it created.
    """
    from cellmorph.errors import CellmorphError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CellmorphError(f"{path}: {what} is an existing file, not a folder")
    created: list[Path] = []
    probe = path
    while not probe.exists() and probe.parent != probe:
        created.append(probe)
        probe = probe.parent
    try:
        for folder in reversed(created):
            folder.mkdir()
        fd, tmp = tempfile.mkstemp(prefix=".cellmorph-write-test.", dir=path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
        reason = exc.strerror or str(exc)
        if isinstance(exc, NotADirectoryError) or (exc.filename and Path(exc.filename).is_file()):
            reason = "a parent is a file, not a folder"
        raise CellmorphError(f"{path}: cannot write the {what}: {reason}{where}") from None
    finally:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                pass
    return path


def require_file(path: Path, what: str, error=None) -> Path:
    """``path`` if it is a file; a folder or a missing path is one error line naming it.

    ``what`` names the expected file ("a CSV file"); ``error`` is the exception class
    (default :class:`~cellmorph.errors.CellmorphError`).
    """
    from cellmorph.errors import CellmorphError

    error = error or CellmorphError
    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: is a directory, expected {what}")
    if not path.is_file():
        raise error(f"{path}: file not found (expected {what})")
    return path


def read_yaml_mapping(path: Path) -> dict:
    """A YAML file whose top level is a mapping; user errors become one-line CellmorphErrors."""
    import yaml

    from cellmorph.errors import CellmorphError

    path = require_file(path, "a YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CellmorphError(f"{path}: invalid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise CellmorphError(f"{path}: expected a mapping at the top level")
    return data


def write_json(path: Path, payload) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def write_csv(path: Path, frame) -> None:
    """A pandas frame as CSV (no index), atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
