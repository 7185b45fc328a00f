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


def process_umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc), else set and reset."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def share_like_new(path: Path) -> None:
    """Give a file or folder made private by ``mkstemp``/``mkdtemp`` (0600/0700) the permissions any new
    file or folder gets under the umask, so colleagues on a shared cluster can read a run."""
    path = Path(path)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~process_umask())


@contextmanager
def atomic_path(final: Path, suffix: str | None = None):
    """Yield a temporary path beside ``final``; rename it onto ``final`` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix or ".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    share_like_new(tmp_path)  # mkstemp's 0600 would otherwise survive the rename
    from cellmorph.errors import disk_full_as_error

    try:
        with disk_full_as_error(writing=final):
            yield tmp_path
            os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary folder beside ``final``; on success it replaces ``final`` (a folder written by
    several files at once, e.g. a Zarr store), else it is removed: readers never see half a folder."""
    import shutil

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    share_like_new(tmp)
    from cellmorph.errors import disk_full_as_error

    try:
        with disk_full_as_error(writing=final):
            yield tmp
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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


def require_not_input(out: Path, **inputs) -> None:
    """Refuse an output folder that is one of the command's input folders.

    ``inputs`` maps option names (``data``, ``model``) to paths; an output written into its own
    tile cache or model bundle would mix into, and may overwrite, what it reads.
    """
    from cellmorph.errors import CellmorphError, option

    target = Path(out).resolve()
    for name, path in inputs.items():
        if path is not None and Path(path).resolve() == target:
            raise CellmorphError(f"{option('out')} {out} is the {option(name)} folder itself; "
                                 f"choose another {option('out')} so the input stays as it was")


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
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CellmorphError(f"{path}: not a UTF-8 text file (byte {exc.start}): expected YAML") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise CellmorphError(f"{path}: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise CellmorphError(f"{path}: expected a mapping at the top level")
    return data


def _yaml_problem(exc) -> str:
    """A YAML parser's error as "line N: problem" (PyYAML's own text spans four lines)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"invalid YAML: {where}{problem}"


def json_safe(value):
    """``value`` with every NaN or infinity replaced by None, so it can be written as strict JSON.

    Python's ``json`` writes bare ``NaN``/``Infinity``, which JSON does not have: a browser's
    ``JSON.parse`` or ``jq`` rejects the whole file. ``null`` is what they read as "no number".
    """
    import math

    if isinstance(value, float):  # numpy's float64 included
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if type(value).__module__ == "numpy" and hasattr(value, "item"):  # numpy scalars and 0-d arrays
        return json_safe(value.item()) if getattr(value, "ndim", 0) == 0 else json_safe(value.tolist())
    return value


def json_text(payload, indent: int | None = 2) -> str:
    """``payload`` as strict JSON: non-finite numbers become ``null``, unknown objects their ``str``."""
    return json.dumps(json_safe(payload), indent=indent, sort_keys=False, default=str, allow_nan=False)


def write_json(path: Path, payload) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(payload) + "\n")


def write_csv(path: Path, frame) -> None:
    """A pandas frame as CSV (no index), atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


LOCK_FILE = ".cellmorph.lock"


@contextmanager
def output_lock(folder: Path, command: str, beside: bool = False):
    """Hold ``folder`` for one writer: a second ``prepare``/``cv``/``train``/``predict`` into the
    same folder fails at once, naming the holder, instead of both reporting success over a mix of
    their outputs.

    The lock is an advisory ``flock`` on ``FOLDER/.cellmorph.lock``, which also records the
    holder's pid, host and command for the error line. The kernel drops a ``flock`` when its
    process dies (kill -9 included), so a lock file left behind by a dead run is stale by
    construction and the next run takes it over; the file is removed on exit.

    ``beside``: the lock file is ``.NAME.cellmorph.lock`` next to the folder, for an output that
    is replaced whole when complete (a model bundle), which would take a lock inside with it.
    """
    from cellmorph.errors import CellmorphError

    folder = Path(folder)
    path = folder.parent / f".{folder.name}{LOCK_FILE}" if beside else folder / LOCK_FILE
    created = created_root(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")
    except OSError as exc:
        raise CellmorphError(f"{path}: cannot create the lock file: {exc.strerror or exc}") from None
    try:
        _hold_lock(handle, folder, command)
        try:
            yield path
        finally:
            try:
                path.unlink()
            except FileNotFoundError:  # the command removed its own output folder on failure
                pass
    finally:
        handle.close()
        # A folder made only to hold the lock of a run that then wrote nothing is not left behind.
        if created is not None:
            for empty in [path.parent, *path.parent.parents]:
                if empty == created.parent:
                    break
                try:
                    empty.rmdir()
                except OSError:  # not empty (the run's output) or already gone
                    break


def _hold_lock(handle, folder: Path, command: str) -> None:
    """Take the ``flock`` of the open lock file ``handle`` and record this process in it."""
    import fcntl
    import socket

    from cellmorph.errors import CellmorphError, option

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        try:
            holder = json.loads(handle.read() or "{}")
        except ValueError:
            holder = {}
        who = ", ".join(f"{k} {holder[k]}" for k in ("command", "pid", "host") if holder.get(k))
        raise CellmorphError(
            f"{folder}: another cellmorph run is writing into this folder ({who or 'holder unknown'}); "
            f"wait for it to finish or choose another {option('out')}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                             "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}) + "\n")
    handle.flush()
