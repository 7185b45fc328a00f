"""``cellmorph download bbbc021``: fetch BBBC021 from the Broad Bioimage Benchmark Collection.

Only the metadata CSVs and the plate archives that the paper's MoA subset needs
are fetched (49 of the 55 plates), unless ``all_plates`` or an explicit plate
list is given. Everything is restartable:

* each file is downloaded into ``<name>.part``; a rerun asks the server for the
  rest (``Range: bytes=<have>-``) and appends when it answers ``206``, or starts
  over when it answers ``200``. Dropped connections are resumed at once;
  connection errors are retried with exponential backoff;
* sizes are checked against ``Content-Length`` / ``Content-Range``; only a
  complete file is renamed to its final name;
* each plate is unpacked into a temporary folder inside ``root`` and renamed
  into place (``root/WeekN/WeekN_<plate>``, the ``Image_PathName_*`` value) with
  a ``.complete`` marker, so a half-unpacked plate never looks done and a rerun
  skips finished plates without touching the network.

HTTP uses only :mod:`urllib.request`. ``file://`` base URLs work too (a local
mirror), without resume.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cellmorph.data.bbbc021 import (
    CHANNELS,
    COMPOUND_CSV,
    IMAGE_CSV,
    MOA_CSV,
    moa_subset_plates,
    read_image_csv,
)
from cellmorph.errors import CellmorphError
from cellmorph.runinfo import require_output_dir

DEFAULT_BASE_URL = "https://data.broadinstitute.org/bbbc/BBBC021/"
METADATA_FILES: tuple[str, ...] = (IMAGE_CSV, COMPOUND_CSV, MOA_CSV)
ARCHIVE_TEMPLATE = "BBBC021_v1_images_{plate}.zip"
COMPLETE_MARKER = ".complete"
DATASETS: tuple[str, ...] = ("bbbc021",)

# First retry waits BACKOFF_SECONDS, then twice as long each time, at most BACKOFF_MAX.
BACKOFF_SECONDS = 1.0
BACKOFF_MAX = 30.0
# A response that delivered new bytes before the connection dropped is resumed at
# once and does not use up a retry; this caps how many such resumes one file gets.
MAX_RESUMES = 100
CHUNK_BYTES = 1 << 20

ProgressCallback = Callable[[int, "int | None"], None]
"""Called as ``progress(bytes_on_disk, total_bytes_or_None)`` while a file downloads."""

_HINT = "check your connection or pass --base-url for a mirror"
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)
_RETRYABLE_HTTP = frozenset({408, 425, 429})


# --------------------------------------------------------------------------- fetch
@dataclass
class _Fetched:
    path: Path
    skipped: bool
    bytes_received: int


class _Retry(Exception):
    """Internal: abandon this attempt and go round the retry loop."""


def _user_agent() -> str:
    from cellmorph import __version__

    return f"cellmorph/{__version__} (+urllib)"


def _int_header(headers, name: str) -> int | None:
    value = headers.get(name) if headers is not None else None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _reason(exc: BaseException) -> str:
    """A short, traceback-free description of a network error."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        inner = exc.reason
        return _reason(inner) if isinstance(inner, BaseException) else str(inner)
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _part_size(part: Path) -> int:
    try:
        return part.stat().st_size
    except FileNotFoundError:
        return 0


@dataclass
class _Attempt:
    """What one request of :func:`_fetch` did: whether the file is complete, the bytes it wrote (counted as
    they arrive, so a connection that drops mid-file still counts them), and why it stopped short."""

    complete: bool = False
    received: int = 0
    mismatch: tuple[int, int] | None = None  # a size problem: (got, expected)
    error: str = "no attempt made"


def _fetch(
    url: str,
    dest: Path,
    *,
    expected_size: int | None,
    timeout: float,
    retries: int,
    progress: ProgressCallback | None,
) -> _Fetched:
    dest = Path(dest)
    if dest.is_file():
        if expected_size is None or dest.stat().st_size == expected_size:
            return _Fetched(dest, True, 0)
        dest.unlink()  # a finished file of the wrong size: fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    received = failures = resumes = 0
    attempt = _Attempt()
    while True:
        attempt = _attempt(url, part, expected_size, timeout, progress)
        received += attempt.received
        if attempt.complete:
            os.replace(part, dest)
            return _Fetched(dest, False, received)
        if attempt.received and resumes < MAX_RESUMES:
            resumes += 1  # a dropped connection that delivered bytes: resume now
            continue
        failures += 1
        if failures > retries:
            break
        time.sleep(min(BACKOFF_SECONDS * 2 ** (failures - 1), BACKOFF_MAX))
    if attempt.mismatch is not None:
        got, want = attempt.mismatch
        kept = f"; partial file kept at {part}, rerun to resume" if part.exists() else ""
        raise CellmorphError(f"size mismatch for {url}: got {got} bytes, expected {want}{kept}")
    raise CellmorphError(f"could not fetch {url}: {attempt.error}; {_HINT}")


def _attempt(url: str, part: Path, expected_size: int | None, timeout: float,
             progress: ProgressCallback | None) -> _Attempt:
    """One request: resume ``part`` where it ends (a Range request) or fetch the whole file again. Errors
    worth a retry end up in the result; the others (a 404, a disk that cannot be written) are raised."""
    have = _part_size(part)
    if expected_size is not None and have > expected_size:
        part.unlink()
        have = 0
    headers = {"User-Agent": _user_agent(), "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    result = _Attempt()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
            have, total, mode = _response_start(resp, part, have, expected_size, result)
            if progress is not None:
                progress(have, total if total is not None else expected_size)
            have = _stream(resp, part, mode, have, total if total is not None else expected_size, progress, result)
        target = expected_size if expected_size is not None else total
        if target is None or have == target:
            result.complete = True
        else:
            result.mismatch = (have, target)
            result.error = f"got {have} bytes, expected {target}"
            if have > target:
                part.unlink(missing_ok=True)
    except _Retry:
        pass
    except urllib.error.HTTPError as exc:
        headers_in = exc.headers
        exc.close()
        if exc.code == 416:
            match = _UNSATISFIED_RANGE.match((headers_in.get("Content-Range") if headers_in else None) or "")
            whole = int(match.group(1)) if match else None
            if whole is not None and have == whole and expected_size in (None, whole):
                result.complete = True  # the .part already held the whole file
            else:
                part.unlink(missing_ok=True)
                result.error = f"HTTP 416 for Range bytes={have}-"
                if whole is not None and expected_size is not None and whole != expected_size:
                    result.mismatch = (whole, expected_size)
        elif exc.code in _RETRYABLE_HTTP or exc.code >= 500:
            result.error = _reason(exc)
        else:
            raise CellmorphError(f"could not fetch {url}: {_reason(exc)}; {_HINT}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        result.error = _reason(exc)
    return result


def _response_start(resp, part: Path, have: int, expected_size: int | None,
                    result: _Attempt) -> tuple[int, int | None, str]:
    """(bytes already in ``part`` that the response continues, the file's total size if known, the mode to
    open ``part`` in). A resumed response (206) must continue exactly where ``part`` ends; any other starts
    from byte 0. Raises :class:`_Retry` (the reason in ``result``) when the sizes disagree."""
    status = getattr(resp, "status", None)
    length = _int_header(resp.headers, "Content-Length")
    if status == 206:
        match = _CONTENT_RANGE.match(resp.headers.get("Content-Range") or "")
        if not match or int(match.group(1)) != have:
            # The server resumed somewhere else: unsafe to append.
            part.unlink(missing_ok=True)
            result.error = f"bad Content-Range {resp.headers.get('Content-Range')!r} for Range bytes={have}-"
            raise _Retry
        first, last, whole = match.groups()
        total = int(whole) if whole != "*" else None
        if length is not None and length != int(last) - int(first) + 1:
            result.mismatch = (have + length, int(last) + 1)
            result.error = f"Content-Length {length} disagrees with Content-Range {resp.headers.get('Content-Range')}"
            raise _Retry
        if total is None:
            total = int(last) + 1 if length is None else have + length
        mode = "ab"
    else:  # 200 (or a file:// response): the whole file, from byte 0
        have, total, mode = 0, length, "wb"
    if expected_size is not None and total is not None and total != expected_size:
        result.mismatch = (total, expected_size)
        result.error = f"server reports {total} bytes, expected {expected_size}"
        raise _Retry
    return have, total, mode


def _stream(resp, part: Path, mode: str, have: int, size: int | None, progress: ProgressCallback | None,
            result: _Attempt) -> int:
    """Append the response's body to ``part`` chunk by chunk (``result.received`` counts them); the bytes now in
    ``part``. A file that cannot be written is an error, not worth a retry."""
    try:
        fh = open(part, mode)
    except OSError as exc:
        raise CellmorphError(f"{part}: cannot write ({_reason(exc)})") from None
    with fh:
        while True:
            chunk = resp.read(CHUNK_BYTES)
            if not chunk:
                return have
            try:
                fh.write(chunk)
            except OSError as exc:  # disk full etc.: not worth retrying
                raise CellmorphError(f"{part}: cannot write ({_reason(exc)})") from None
            have += len(chunk)
            result.received += len(chunk)
            if progress is not None:
                progress(have, size)


def fetch(
    url: str,
    dest: Path,
    *,
    expected_size: int | None = None,
    timeout: float = 60.0,
    retries: int = 3,
    progress: ProgressCallback | None = None,
) -> Path:
    """Download ``url`` to ``dest`` resumably; return ``dest``.

    An existing ``dest`` (of ``expected_size``, when given) is kept as is.
    Bytes go to ``dest.part`` first; a rerun resumes it with a ``Range``
    request. ``retries`` counts failed attempts after the first; an attempt that
    delivered bytes before the connection dropped is resumed at once without
    using one up. Persistent failures and size mismatches raise
    :class:`CellmorphError` naming the URL; the ``.part`` file is then kept so
    the next run resumes, and ``dest`` is not created.
    """
    result = _fetch(url, Path(dest), expected_size=expected_size, timeout=timeout, retries=retries, progress=progress)
    return result.path


# --------------------------------------------------------------------------- plates
def _join(base_url: str, name: str) -> str:
    if not base_url.endswith("/"):
        base_url += "/"
    return base_url + urllib.parse.quote(name)


def _check_plate_folders(images, where: Path) -> None:
    """Every ``Image_PathName_*`` must be a folder inside ``--root``: the plates are unpacked there.

    The image CSV comes from a mirror the user names; a ``..`` part (or a Windows drive) in a
    folder would unpack a plate, and its temporary folder, outside the download root.
    """
    for ch in CHANNELS:
        for row, folder in enumerate(images[f"Image_PathName_{ch}"].astype(str)):
            parts = folder.replace("\\", "/").split("/")
            if ".." in parts or re.match(r"^[A-Za-z]:", folder) or not folder.strip("/ "):
                raise CellmorphError(f"{where}: row {row + 2}: Image_PathName_{ch} {folder!r} is not a folder "
                                     "inside the download root")


def _plate_files(images) -> dict[str, set[str]]:
    """``Image_PathName`` folder → the file names the image CSV lists in it (all channels)."""
    files: dict[str, set[str]] = {}
    for ch in CHANNELS:
        pairs = zip(images[f"Image_PathName_{ch}"].astype(str), images[f"Image_FileName_{ch}"].astype(str))
        for folder, name in pairs:
            files.setdefault(folder.strip("/"), set()).add(name)
    return files


def _resolve_plates(requested: list[str], images) -> list[str]:
    """Map plate names (``Week1_22123``) or folders (``Week1/Week1_22123``) to CSV folders."""
    folders = sorted(set(images["Image_PathName_DAPI"].astype(str).str.strip("/")))
    by_name = {PurePosixPath(f).name: f for f in folders}
    plate_names = images["Image_Metadata_Plate_DAPI"].astype(str)
    for plate, folder in zip(plate_names, images["Image_PathName_DAPI"].astype(str)):
        by_name.setdefault(plate, folder.strip("/"))
    out: list[str] = []
    unknown: list[str] = []
    for item in requested:
        key = str(item).strip().strip("/")
        folder = key if key in folders else by_name.get(key)
        if folder is None:
            unknown.append(str(item))
        elif folder not in out:
            out.append(folder)
    if unknown:
        raise CellmorphError(
            f"unknown plate(s) {', '.join(unknown)}: not in {IMAGE_CSV} (e.g. {folders[0] if folders else 'none'})"
        )
    return out


def _member_target(name: str, plate: str, archive: Path) -> PurePosixPath | None:
    """Where a zip member goes inside the plate folder, or None to skip it."""
    name = name.replace("\\", "/")
    if name.endswith("/"):
        return None
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise CellmorphError(f"{archive}: unsafe member path {name!r} in archive")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or parts[0] == "__MACOSX" or parts[-1] in (".DS_Store", "Thumbs.db"):
        return None
    if ".." in parts:
        raise CellmorphError(f"{archive}: unsafe member path {name!r} in archive")
    dirs = parts[:-1]
    if plate in dirs:  # strip everything up to the plate folder (e.g. Week1_22123/ or Week1/Week1_22123/)
        cut = len(dirs) - 1 - dirs[::-1].index(plate)
        parts = parts[cut + 1 :]
    return PurePosixPath(*parts)


class _BadArchive(Exception):
    pass


def _unpack_plate(archive: Path, root: Path, folder: str) -> int:
    """Unpack ``archive`` to ``root/folder`` via a temp folder; return the number of files."""
    plate = PurePosixPath(folder).name
    target = root / folder
    tmp = target.parent / f".{plate}.unpacking"
    if not zipfile.is_zipfile(archive):
        raise _BadArchive(f"{archive}: not a valid zip archive")
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from an interrupted run
    tmp.mkdir(parents=True)
    n_files = 0
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                rel = _member_target(info.filename, plate, archive)
                if rel is None:
                    continue
                out = tmp.joinpath(*rel.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                # ZipExtFile checks each member's CRC-32 as it is read to the end.
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK_BYTES)
                n_files += 1
        marker = {"archive": archive.name, "files": n_files, "unpacked": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _BadArchive(f"{archive}: corrupt zip archive ({exc})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    if not target.exists():
        os.replace(tmp, target)  # atomic: the plate appears complete or not at all
        return n_files
    # A folder not made by us (no marker): merge the files into it, then mark it.
    marker_path = tmp / COMPLETE_MARKER
    for path in sorted(tmp.rglob("*")):
        if path.is_file() and path != marker_path:
            dest = target / path.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
    os.replace(marker_path, target / COMPLETE_MARKER)
    shutil.rmtree(tmp, ignore_errors=True)
    return n_files


def _plate_done(root: Path, folder: str, expected: set[str]) -> bool:
    target = root / folder
    if (target / COMPLETE_MARKER).is_file():
        return True
    if target.is_dir() and expected and all((target / name).is_file() for name in expected):
        # Put there by hand (or by an older tool) and complete: adopt it.
        (target / COMPLETE_MARKER).write_text(json.dumps({"adopted": True, "files": len(expected)}) + "\n")
        return True
    return False


# --------------------------------------------------------------------------- bbbc021
def _make_progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def download_bbbc021(
    root: Path,
    base_url: str = DEFAULT_BASE_URL,
    plates: list[str] | None = None,
    metadata_only: bool = False,
    all_plates: bool = False,
    progress: bool = True,
    timeout: float = 60.0,
    retries: int = 3,
    keep_archives: bool = False,
) -> dict:
    """Download BBBC021 into ``root`` in the official layout; return a summary.

    ``root`` receives the three metadata CSVs and ``WeekN/WeekN_<plate>/*.tif``.
    The plates are those of the paper's MoA subset
    (:func:`~cellmorph.data.bbbc021.moa_subset_plates`), every plate of the image
    CSV with ``all_plates``, or ``plates`` (names such as ``Week1_22123`` or
    folders such as ``Week1/Week1_22123``). Finished plates carry a
    ``.complete`` marker and are skipped, so a rerun does no network traffic.
    Archives are deleted after unpacking unless ``keep_archives``.

    The summary holds ``plates`` (folders), ``files_fetched``,
    ``files_skipped``, ``bytes_downloaded``, ``plates_unpacked``,
    ``plates_skipped`` and ``missing_files`` (files the image CSV lists for the
    handled plates that are absent after unpacking).
    """
    root = Path(root).expanduser()
    base_url = base_url or DEFAULT_BASE_URL
    if plates is not None and all_plates:
        raise CellmorphError("pass either explicit plates or all_plates, not both")
    require_output_dir(root, "download folder")
    root.mkdir(parents=True, exist_ok=True)
    summary: dict = {"root": str(root), "base_url": base_url, "plates": []} | dict.fromkeys(
        ("files_fetched", "files_skipped", "bytes_downloaded", "plates_unpacked", "plates_skipped", "missing_files"), 0)
    bar = _make_progress(progress)
    get = _counting_fetcher(bar, summary, base_url, timeout, retries)
    with bar:
        for name in METADATA_FILES:
            get(name, root / name, "metadata")
        if metadata_only:
            return summary

        images = read_image_csv(root)
        _check_plate_folders(images, root / IMAGE_CSV)
        folders = _chosen_plates(root, images, plates, all_plates)
        summary["plates"] = folders
        _fetch_plates(root, folders, _plate_files(images), base_url, keep_archives, get, summary)
    return summary


def _counting_fetcher(bar, summary: dict, base_url: str, timeout: float,
                      retries: int) -> Callable[[str, Path, str], _Fetched]:
    """``get(name, dest, label)``: fetch ``base_url``'s ``name`` into ``dest`` with a progress line labelled
    ``label``, and count the file (fetched or skipped) and its bytes in ``summary``."""

    def get(name: str, dest: Path, label: str) -> _Fetched:
        task = bar.add_task(f"{label} {name}", total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        try:
            result = _fetch(
                _join(base_url, name), dest, expected_size=None, timeout=timeout, retries=retries, progress=update
            )
        finally:
            bar.remove_task(task)
        summary["files_skipped" if result.skipped else "files_fetched"] += 1
        summary["bytes_downloaded"] += result.bytes_received
        return result

    return get


def _chosen_plates(root: Path, images, plates: list[str] | None, all_plates: bool) -> list[str]:
    """The plate folders to fetch: ``plates`` (names or folders), every plate of the image CSV with
    ``all_plates``, else those of the paper's MoA subset."""
    if plates is not None:
        return _resolve_plates(list(plates), images)
    if all_plates:
        return sorted(set(images["Image_PathName_DAPI"].astype(str).str.strip("/")))
    return [f.strip("/") for f in moa_subset_plates(root)]


def _fetch_plates(root: Path, folders: list[str], expected: dict[str, set[str]], base_url: str,
                  keep_archives: bool, get: Callable[[str, Path, str], _Fetched], summary: dict) -> None:
    """Fetch and unpack each plate in ``folders`` that is not done yet; count the plates skipped and unpacked,
    and the files the image CSV lists (``expected``) that are missing afterwards, in ``summary``."""
    for i, folder in enumerate(folders):
        wanted = expected.get(folder, set())
        if _plate_done(root, folder, wanted):
            summary["plates_skipped"] += 1
            summary["files_skipped"] += 1
        else:
            _fetch_plate(root, folder, base_url, keep_archives,
                         lambda name, dest: get(name, dest, f"[{i + 1}/{len(folders)}]"))
            summary["plates_unpacked"] += 1
        summary["missing_files"] += sum(not (root / folder / name).is_file() for name in wanted)


def _fetch_plate(root: Path, folder: str, base_url: str, keep_archives: bool, get) -> None:
    """Fetch one plate's archive (``get(name, dest)``) and unpack it into ``root/folder``. An archive left by an
    earlier run that does not unpack is fetched afresh once; a fresh one that does not unpack is an error."""
    archive_name = ARCHIVE_TEMPLATE.format(plate=PurePosixPath(folder).name)
    archive = root / archive_name
    for attempt in range(2):
        result = get(archive_name, archive)
        try:
            _unpack_plate(archive, root, folder)
            break
        except _BadArchive as exc:
            archive.unlink(missing_ok=True)
            if not result.skipped or attempt:
                raise CellmorphError(
                    f"{exc} (downloaded from {_join(base_url, archive_name)}; "
                    "deleted it, rerun to fetch it again)"
                ) from None
            # A stale archive from an earlier run: fetch it afresh once.
    if not keep_archives:
        archive.unlink(missing_ok=True)


# --------------------------------------------------------------------------- CLI
def download_command(
    dataset: str,
    root: Path,
    base_url: str = DEFAULT_BASE_URL,
    metadata_only: bool = False,
    all_plates: bool = False,
    keep_archives: bool = False,
    plates: list[str] | None = None,
) -> None:
    """Body of ``cellmorph download <dataset> --root DIR``; raises CellmorphError on user errors."""
    name = str(dataset).strip().lower()
    if name not in DATASETS:
        raise CellmorphError(f"unknown dataset {dataset!r}; available: {', '.join(DATASETS)}")
    summary = download_bbbc021(
        Path(root),
        base_url=base_url or DEFAULT_BASE_URL,
        plates=plates or None,
        metadata_only=metadata_only,
        all_plates=all_plates,
        keep_archives=keep_archives,
        progress=True,
    )
    mb = summary["bytes_downloaded"] / 1e6
    what = "metadata" if metadata_only else f"{len(summary['plates'])} plate(s)"
    line = (
        f"BBBC021 {what} in {summary['root']}: fetched {summary['files_fetched']} file(s) ({mb:.1f} MB), "
        f"{summary['files_skipped']} already present"
    )
    if summary["missing_files"]:
        line += f"; warning: {summary['missing_files']} image file(s) listed in {IMAGE_CSV} are missing"
    print(line)
