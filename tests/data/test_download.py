"""``cellmorph download bbbc021`` against a local HTTP server; never touches the internet.

The server (``http.server.ThreadingHTTPServer`` on 127.0.0.1, port 0) serves a
made-up three-plate BBBC021: two plates hold MoA-annotated compounds, the third
only DMSO and an unannotated compound, so the MoA subset must not fetch it. It
speaks HEAD/GET/Range and can drop a connection, ignore Range, or lie about
Content-Length.
"""

from __future__ import annotations

import io
import re
import socket
import threading
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellmorph.data import download as dl
from cellmorph.data.bbbc021 import CHANNELS, IMAGE_COLUMNS, load_bbbc021, moa_subset_plates, read_image_csv
from cellmorph.data.download import download_bbbc021, download_command, fetch
from cellmorph.errors import CellmorphError

from tests.conftest import REAL_METADATA, require
from tests.support.ports import free_ports

PREFIX = "/bbbc/BBBC021/"

# plate folder -> [(well, compound, concentration)]; two sites per well.
PLATE_MAP: dict[str, list[tuple[str, str, float]]] = {
    "Week1/Week1_11111": [("B02", "alpha", 1.0), ("B03", "DMSO", 0.0)],
    "Week2/Week2_22222": [("C02", "beta", 0.5), ("C03", "DMSO", 0.0)],
    # Only DMSO and an unannotated compound: not part of the MoA subset.
    "Week3/Week3_33333": [("D02", "gamma", 2.0), ("D03", "DMSO", 0.0)],
}
MOA_ROWS = [("alpha", 1.0, "Actin disruptors"), ("beta", 0.5, "Microtubule stabilizers"), ("DMSO", 0.0, "DMSO")]
SUBSET = ["Week1/Week1_11111", "Week2/Week2_22222"]
FLAT_PLATE = "Week2/Week2_22222"  # its zip has no top folder


def _zip_name(folder: str) -> str:
    return f"BBBC021_v1_images_{folder.split('/')[-1]}.zip"


# --------------------------------------------------------------------------- synthetic dataset
@dataclass
class Dataset:
    files: dict[str, bytes]  # name under PREFIX -> content
    pixels: dict[str, np.ndarray]  # "<folder>/<file name>" -> array


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    rng = np.random.default_rng(21)
    rows = []
    pixels: dict[str, np.ndarray] = {}
    number = 0
    for folder, wells in PLATE_MAP.items():
        plate = folder.split("/")[-1]
        for well, compound, conc in wells:
            for site in (1, 2):
                number += 1
                names = {}
                for ch_index, ch in enumerate(CHANNELS, start=1):
                    name = f"{well}_s{site}_w{ch_index}{number:04d}ABCD-{ch}.tif"
                    names[ch] = name
                    pixels[f"{folder}/{name}"] = rng.integers(0, 4096, size=(24, 32), dtype=np.uint16)
                row = {"TableNumber": int(plate[-1]), "ImageNumber": number}
                for ch in CHANNELS:
                    row[f"Image_FileName_{ch}"] = names[ch]
                    row[f"Image_PathName_{ch}"] = folder
                row.update(
                    Image_Metadata_Plate_DAPI=plate,
                    Image_Metadata_Well_DAPI=well,
                    Replicate=1,
                    Image_Metadata_Compound=compound,
                    Image_Metadata_Concentration=conc,
                )
                rows.append(row)
    files: dict[str, bytes] = {
        "BBBC021_v1_image.csv": pd.DataFrame(rows, columns=list(IMAGE_COLUMNS)).to_csv(index=False).encode(),
        "BBBC021_v1_moa.csv": pd.DataFrame(MOA_ROWS, columns=["compound", "concentration", "moa"])
        .to_csv(index=False)
        .encode(),
        "BBBC021_v1_compound.csv": b"compound,smiles\nalpha,C\nbeta,CC\ngamma,CCC\nDMSO,CS(C)=O\n",
    }
    for folder in PLATE_MAP:
        plate = folder.split("/")[-1]
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            top = "" if folder == FLAT_PLATE else f"{plate}/"
            if top:
                zf.writestr(top, b"")  # explicit directory entry, as real zips have
            for key, arr in pixels.items():
                if key.startswith(folder + "/"):
                    tif = io.BytesIO()
                    tifffile.imwrite(tif, arr)
                    zf.writestr(top + key.split("/")[-1], tif.getvalue())
        files[_zip_name(folder)] = buf.getvalue()
    return Dataset(files, pixels)


# --------------------------------------------------------------------------- test server
@dataclass
class Site:
    files: dict[str, bytes]
    drop_after: dict[str, int] = field(default_factory=dict)  # cut the first GET of a file after N bytes
    ignore_range: set[str] = field(default_factory=set)  # answer 200 with the whole file
    lie: dict[str, int] = field(default_factory=dict)  # claim this many bytes more than exist
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def gets(self, name: str | None = None) -> list[tuple[str, str, str | None]]:
        with self.lock:
            return [r for r in self.requests if r[0] == "GET" and (name is None or r[1] == name)]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        site: Site = self.server.site
        path = urlsplit(self.path).path
        name = path[len(PREFIX) :] if path.startswith(PREFIX) else None
        range_header = self.headers.get("Range")
        with site.lock:
            first_get = not head and not any(r[0] == "GET" and r[1] == name for r in site.requests)
            site.requests.append((self.command, name, range_header))
            data = site.files.get(name) if name else None
            drop = site.drop_after.get(name) if first_get else None
            ignore = name in site.ignore_range
            claimed = len(data) + site.lie.get(name, 0) if data is not None else 0
        self.close_connection = True
        if data is None:
            self.send_error(404, "Not Found")
            return
        start, status = 0, 200
        if range_header and not ignore:
            match = re.fullmatch(r"bytes=(\d+)-", range_header.strip())
            assert match, range_header
            start = int(match.group(1))
            if start >= claimed:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{claimed}")
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(claimed - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{claimed - 1}/{claimed}")
        self.send_header("Connection", "close")
        self.end_headers()
        if head:
            return
        body = data[start:]
        if drop is not None:
            body = body[:drop]
        try:
            self.wfile.write(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def server(dataset):
    site = Site(dict(dataset.files))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.site = site
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    site.url = f"http://127.0.0.1:{httpd.server_address[1]}{PREFIX}"
    try:
        yield site
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(dl, "BACKOFF_SECONDS", 0.01)


def _download(root: Path, site: Site, **kw) -> dict:
    kw.setdefault("progress", False)
    kw.setdefault("timeout", 5.0)
    kw.setdefault("retries", 2)
    return download_bbbc021(root, base_url=site.url, **kw)


# --------------------------------------------------------------------------- tests
def test_synthetic_plate_map_has_a_plate_outside_the_subset(server, tmp_path):
    for name in ("BBBC021_v1_image.csv", "BBBC021_v1_moa.csv"):
        (tmp_path / name).write_bytes(server.files[name])
    assert moa_subset_plates(tmp_path) == SUBSET
    # The handler speaks HEAD too (size without body).
    req = urllib.request.Request(server.url + _zip_name(SUBSET[0]), method="HEAD")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert int(resp.headers["Content-Length"]) == len(server.files[_zip_name(SUBSET[0])])
        assert resp.read() == b""


def test_full_download_official_layout_and_only_needed_plates(server, dataset, tmp_path):
    root = tmp_path / "bbbc021"
    summary = _download(root, server, progress=True)

    assert summary["plates"] == SUBSET
    assert summary["files_fetched"] == 3 + len(SUBSET)
    assert summary["plates_unpacked"] == len(SUBSET) and summary["missing_files"] == 0
    assert summary["bytes_downloaded"] == sum(
        len(dataset.files[n]) for n in [*dl.METADATA_FILES, *map(_zip_name, SUBSET)]
    )
    fetched = sorted(r[1] for r in server.gets())
    assert fetched == sorted([*dl.METADATA_FILES, *map(_zip_name, SUBSET)])
    assert _zip_name("Week3/Week3_33333") not in fetched
    assert not (root / "Week3").exists()

    table = load_bbbc021(root, root)
    assert sorted(table.frame["Metadata_Plate"].unique()) == ["Week1_11111", "Week2_22222"]
    assert len(table) == 8  # 2 plates x 2 wells x 2 sites
    for ch in CHANNELS:
        for path in table.frame[f"Path_{ch}"]:
            path = Path(path)
            assert path.is_file(), path
            key = f"{path.parent.parent.name}/{path.parent.name}/{path.name}"
            np.testing.assert_array_equal(tifffile.imread(path), dataset.pixels[key])
    for folder in SUBSET:
        assert (root / folder / dl.COMPLETE_MARKER).is_file()
        assert not [p for p in (root / folder).iterdir() if p.is_dir()]  # top folder stripped; flat zip stays flat
    # Archives deleted, no partial files or temp folders left behind.
    leftovers = [p.name for p in root.rglob("*") if p.suffix in (".zip", ".part") or p.name.endswith(".unpacking")]
    assert leftovers == []


def test_rerun_fetches_nothing(server, tmp_path):
    _download(tmp_path, server)
    n_requests = len(server.requests)
    again = _download(tmp_path, server)
    assert len(server.requests) == n_requests
    assert again["files_fetched"] == 0 and again["bytes_downloaded"] == 0
    assert again["plates_skipped"] == len(SUBSET) and again["plates_unpacked"] == 0


def test_dropped_connection_is_resumed_with_range(server, dataset, tmp_path):
    name = _zip_name(SUBSET[0])
    server.drop_after = {name: 3000, "BBBC021_v1_image.csv": 100}
    summary = _download(tmp_path, server, keep_archives=True)

    gets = server.gets(name)
    assert [g[2] for g in gets] == [None, "bytes=3000-"]
    assert [g[2] for g in server.gets("BBBC021_v1_image.csv")] == [None, "bytes=100-"]
    assert (tmp_path / name).read_bytes() == dataset.files[name]
    assert (tmp_path / "BBBC021_v1_image.csv").read_bytes() == dataset.files["BBBC021_v1_image.csv"]
    assert summary["bytes_downloaded"] == sum(
        len(dataset.files[n]) for n in [*dl.METADATA_FILES, *map(_zip_name, SUBSET)]
    )  # resumed, not re-downloaded
    assert not list(tmp_path.glob("*.part"))
    assert len(load_bbbc021(tmp_path, tmp_path)) == 8


def test_server_ignoring_range_restarts_from_zero(server, dataset, tmp_path):
    name = _zip_name(SUBSET[0])
    server.drop_after = {name: 3000}
    server.ignore_range = {name}
    dest = fetch(server.url + name, tmp_path / name, timeout=5, retries=2)
    assert [g[2] for g in server.gets(name)] == [None, "bytes=3000-"]  # asked to resume, got 200
    assert dest.read_bytes() == dataset.files[name]
    assert not (tmp_path / (name + ".part")).exists()


def test_resume_from_a_part_left_by_an_earlier_run(server, dataset, tmp_path):
    name = _zip_name(SUBSET[1])
    data = dataset.files[name]
    (tmp_path / (name + ".part")).write_bytes(data[:1234])
    seen = []
    fetch(server.url + name, tmp_path / name, timeout=5, retries=0, progress=lambda d, t: seen.append((d, t)))
    assert [g[2] for g in server.gets(name)] == ["bytes=1234-"]
    assert (tmp_path / name).read_bytes() == data
    assert seen[0] == (1234, len(data)) and seen[-1] == (len(data), len(data))
    # A .part that already holds the whole file: the server answers 416, the file is finished.
    other = _zip_name(SUBSET[0])
    (tmp_path / (other + ".part")).write_bytes(dataset.files[other])
    fetch(server.url + other, tmp_path / other, timeout=5, retries=0)
    assert (tmp_path / other).read_bytes() == dataset.files[other]


def test_size_mismatch_names_url_and_sizes_and_keeps_part(server, dataset, tmp_path):
    name = _zip_name(SUBSET[0])
    real = len(dataset.files[name])
    server.lie = {name: 500}
    url = server.url + name
    with pytest.raises(CellmorphError) as info:
        fetch(url, tmp_path / name, timeout=5, retries=1)
    msg = str(info.value)
    assert url in msg and str(real) in msg and str(real + 500) in msg
    assert "\n" not in msg
    assert not (tmp_path / name).exists()
    assert (tmp_path / (name + ".part")).read_bytes() == dataset.files[name]  # kept for resume
    assert len(server.gets(name)) <= 1 + 1 + 1  # first GET, the resume, one retry: bounded

    # The caller's expected size disagrees with the server: also a mismatch, nothing written.
    csv = "BBBC021_v1_moa.csv"
    with pytest.raises(CellmorphError, match=re.escape(server.url + csv)) as info:
        fetch(server.url + csv, tmp_path / csv, expected_size=len(dataset.files[csv]) + 1, timeout=5, retries=0)
    assert "size mismatch" in str(info.value)
    assert not (tmp_path / csv).exists()


def test_size_mismatch_through_download_bbbc021(server, tmp_path):
    name = _zip_name(SUBSET[1])
    server.lie = {name: 10}
    with pytest.raises(CellmorphError, match="size mismatch for " + re.escape(server.url + name)):
        _download(tmp_path, server, retries=1)
    assert not (tmp_path / name).exists() and (tmp_path / (name + ".part")).exists()
    assert not (tmp_path / SUBSET[1]).exists()
    # Once the server is fixed, the rerun resumes and finishes; the done plate is not refetched.
    server.lie = {}
    n_before = len(server.gets(_zip_name(SUBSET[0])))
    summary = _download(tmp_path, server)
    assert len(server.gets(_zip_name(SUBSET[0]))) == n_before
    assert server.gets(name)[-1][2] is not None  # the last request was a Range request
    assert summary["plates_unpacked"] == 1 and summary["plates_skipped"] == 1


def test_unreachable_server_is_a_quick_one_line_error(tmp_path):
    url = f"http://127.0.0.1:{free_ports(1)[0]}/bbbc/BBBC021/"
    started = time.monotonic()
    with pytest.raises(CellmorphError) as info:
        download_bbbc021(tmp_path, base_url=url, progress=False, timeout=1.0, retries=1)
    assert time.monotonic() - started < 5
    msg = str(info.value)
    assert msg.startswith(f"could not fetch {url}BBBC021_v1_image.csv: ")
    assert "--base-url" in msg and "\n" not in msg
    assert not (tmp_path / "BBBC021_v1_image.csv").exists()


def test_silent_server_times_out(tmp_path):
    # Accepts connections (the kernel completes the handshake) but never answers.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/x.zip"
        started = time.monotonic()
        with pytest.raises(CellmorphError, match=re.escape(f"could not fetch {url}: timed out")):
            fetch(url, tmp_path / "x.zip", timeout=0.3, retries=1)
        assert time.monotonic() - started < 5
    assert not (tmp_path / "x.zip").exists()


def test_http_404_is_not_retried(server, tmp_path):
    url = server.url + "no_such_file.zip"
    with pytest.raises(CellmorphError, match=re.escape(url) + ".*404"):
        fetch(url, tmp_path / "x.zip", timeout=5, retries=3)
    assert len(server.gets("no_such_file.zip")) == 1


def test_explicit_and_all_plates(server, tmp_path):
    summary = _download(tmp_path / "one", server, plates=["Week3_33333"])
    assert summary["plates"] == ["Week3/Week3_33333"]
    assert (tmp_path / "one" / "Week3" / "Week3_33333" / dl.COMPLETE_MARKER).is_file()
    assert [g[1] for g in server.gets() if g[1].endswith(".zip")] == [_zip_name("Week3/Week3_33333")]

    summary = _download(tmp_path / "all", server, all_plates=True)
    assert summary["plates"] == list(PLATE_MAP)
    assert all((tmp_path / "all" / f / dl.COMPLETE_MARKER).is_file() for f in PLATE_MAP)

    with pytest.raises(CellmorphError, match="unknown plate.*Week9_99999"):
        _download(tmp_path / "bad", server, plates=["Week9_99999"])


def test_interrupted_or_foreign_plate_folders(server, dataset, tmp_path):
    _download(tmp_path, server)
    first, second = (tmp_path / f for f in SUBSET)
    # Plate 1: marker gone and a file missing (e.g. copied by hand, incompletely).
    (first / dl.COMPLETE_MARKER).unlink()
    victim = sorted(first.glob("*.tif"))[0]
    victim.unlink()
    # Plate 2: marker gone but every file present -> adopted without any network traffic.
    (second / dl.COMPLETE_MARKER).unlink()
    # A temp folder left by an interrupted unpack is cleared, never mistaken for a plate.
    stale = first.parent / ".Week1_11111.unpacking"
    stale.mkdir()
    (stale / "junk.tif").write_bytes(b"junk")

    n_before = {f: len(server.gets(_zip_name(f))) for f in SUBSET}
    summary = _download(tmp_path, server)
    assert len(server.gets(_zip_name(SUBSET[0]))) == n_before[SUBSET[0]] + 1
    assert len(server.gets(_zip_name(SUBSET[1]))) == n_before[SUBSET[1]]
    assert summary["plates_unpacked"] == 1 and summary["plates_skipped"] == 1 and summary["missing_files"] == 0
    assert victim.is_file() and not stale.exists()
    assert (first / dl.COMPLETE_MARKER).is_file() and (second / dl.COMPLETE_MARKER).is_file()


def test_corrupt_archive_is_an_error_and_leaves_no_plate(server, tmp_path):
    name = _zip_name(SUBSET[0])
    server.files[name] = b"<html>not a zip</html>" * 50
    with pytest.raises(CellmorphError, match="not a valid zip archive"):
        _download(tmp_path, server)
    assert not (tmp_path / SUBSET[0]).exists()
    assert not (tmp_path / name).exists()  # deleted, so a rerun fetches it again


def test_stale_corrupt_archive_on_disk_is_fetched_again(server, dataset, tmp_path):
    name = _zip_name(SUBSET[0])
    (tmp_path / name).write_bytes(b"truncated leftover")  # e.g. kept from an older, broken copy
    summary = _download(tmp_path, server, keep_archives=True)
    assert len(server.gets(name)) == 1
    assert (tmp_path / name).read_bytes() == dataset.files[name]
    assert summary["plates_unpacked"] == len(SUBSET) and summary["missing_files"] == 0


def test_crc_error_inside_zip_is_caught(server, dataset, tmp_path):
    name = _zip_name(SUBSET[0])
    data = bytearray(dataset.files[name])
    data[len(data) // 2] ^= 0xFF  # flip a byte inside a stored member
    server.files[name] = bytes(data)
    with pytest.raises(CellmorphError, match="corrupt zip archive"):
        _download(tmp_path, server)
    assert not (tmp_path / SUBSET[0]).exists()
    assert not list(tmp_path.rglob("*.unpacking"))


def test_zip_member_paths():
    archive = Path("a.zip")
    assert str(dl._member_target("Week1_1/x.tif", "Week1_1", archive)) == "x.tif"
    assert str(dl._member_target("Week1/Week1_1/x.tif", "Week1_1", archive)) == "x.tif"
    assert str(dl._member_target("x.tif", "Week1_1", archive)) == "x.tif"
    assert dl._member_target("Week1_1/", "Week1_1", archive) is None
    assert dl._member_target("__MACOSX/Week1_1/._x.tif", "Week1_1", archive) is None
    for evil in ("../x.tif", "Week1_1/../../x.tif", "/etc/x.tif"):
        with pytest.raises(CellmorphError, match="unsafe member path"):
            dl._member_target(evil, "Week1_1", archive)


def test_download_command(server, tmp_path, capsys):
    download_command("BBBC021", tmp_path, server.url, metadata_only=True, all_plates=False, keep_archives=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(dl.METADATA_FILES)
    assert not [g for g in server.gets() if g[1].endswith(".zip")]
    assert "fetched 3 file(s)" in capsys.readouterr().out
    with pytest.raises(CellmorphError, match="unknown dataset 'bbbc099'; available: bbbc021"):
        download_command("bbbc099", tmp_path, server.url, False, False, False)



def test_real_metadata_plate_choice():
    require(REAL_METADATA)
    images = read_image_csv(REAL_METADATA)
    plates = moa_subset_plates(REAL_METADATA)
    assert len(plates) == 49
    assert "Week1/Week1_22123" in plates
    resolved = dl._resolve_plates(["Week1_22123", "Week4/Week4_27481"], images)
    assert resolved == ["Week1/Week1_22123", "Week4/Week4_27481"]
    assert dl._join(dl.DEFAULT_BASE_URL, dl.ARCHIVE_TEMPLATE.format(plate="Week1_22123")) == (
        "https://data.broadinstitute.org/bbbc/BBBC021/BBBC021_v1_images_Week1_22123.zip"
    )


def test_an_image_csv_whose_plate_folder_leaves_the_root_is_refused_before_unpacking(server, tmp_path):
    """The image CSV comes from the mirror: a `..` in Image_PathName would unpack outside --root."""
    csv = pd.read_csv(io.BytesIO(server.files["BBBC021_v1_image.csv"]))
    csv.loc[3, "Image_PathName_DAPI"] = "../../escaped/Week1_11111"
    server.files["BBBC021_v1_image.csv"] = csv.to_csv(index=False).encode()
    root = tmp_path / "deep" / "root"
    with pytest.raises(CellmorphError, match=r"row 5: Image_PathName_DAPI '../../escaped/Week1_11111' is not a "
                                             r"folder inside the download root"):
        _download(root, server, all_plates=True)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "deep" / "escaped").exists()
    assert not any(g[1].endswith(".zip") for g in server.gets())
