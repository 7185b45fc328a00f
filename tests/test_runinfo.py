"""Provenance and the write layer: strict JSON, atomic writes on a full disk, one-line YAML
errors, and the output-folder lock."""

from __future__ import annotations

import errno
import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cellmorph.errors import CellmorphError, DiskFullError
from cellmorph.runinfo import LOCK_FILE, atomic_path, json_text, process_umask, output_lock, read_yaml_mapping, write_json


def test_json_is_strict_with_null_for_non_finite_numbers(tmp_path):
    payload = {"a": float("nan"), "b": [np.float32(np.inf), -math.inf, 1.5], "c": np.float64(2.0),
               "d": np.int64(3), "e": np.array([np.nan, 1.0]), "f": {"g": (np.nan,)}}
    write_json(tmp_path / "x.json", payload)
    text = (tmp_path / "x.json").read_text()
    assert "NaN" not in text and "Infinity" not in text

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    back = json.loads(text, parse_constant=refuse)  # what a strict parser (a browser, jq) reads
    assert back == {"a": None, "b": [None, None, 1.5], "c": 2.0, "d": 3, "e": [None, 1.0], "f": {"g": [None]}}
    assert json.loads(json_text({"x": float("nan")}, indent=None), parse_constant=refuse) == {"x": None}


def test_a_full_disk_in_an_atomic_write_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    """The fallback where no tmpfs can be mounted: ENOSPC injected at the write itself."""
    target = tmp_path / "out" / "table.npy"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=f"no space left on device writing {target}"):
        with atomic_path(target) as tmp:
            monkeypatch.setattr(np, "save", full)
            np.save(tmp, np.zeros(3))
    assert list(target.parent.iterdir()) == []  # no final file, no temporary
    # numpy reports a short write without an errno: that is a full disk too.
    with pytest.raises(DiskFullError):
        with atomic_path(target):
            raise OSError("4096 requested and 0 written")
    with pytest.raises(PermissionError):  # other OS errors are not disguised as a full disk
        with atomic_path(target):
            raise PermissionError(errno.EACCES, "Permission denied")


def test_an_atomic_write_on_a_real_full_disk_is_one_error(small_disk):
    disk = small_disk.mount("64k")
    with pytest.raises(DiskFullError, match=f"writing {disk / 'big.bin'}"):
        with atomic_path(disk / "big.bin") as tmp:
            tmp.write_bytes(b"\0" * 200_000)
    assert list(disk.iterdir()) == []


@pytest.mark.parametrize("text, where", [
    ("a: [1, 2\nb: 3\n", "line 2"),
    ("a: 1\n  b: 2\n", "line 2"),
    ("a: !!python/object:os.system 1\n", "line 1"),
])
def test_a_bad_yaml_file_is_one_line_with_its_line_number(tmp_path, text, where):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(CellmorphError) as caught:
        read_yaml_mapping(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: invalid YAML: {where}"), message


def test_a_binary_yaml_file_is_one_line(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(CellmorphError, match="not a UTF-8 text file"):
        read_yaml_mapping(path)


def test_error_messages_are_always_one_line():
    assert str(CellmorphError("a.csv: cannot parse CSV (Error tokenizing data.\nC error: x)")) == \
        "a.csv: cannot parse CSV (Error tokenizing data. C error: x)"


HOLD = textwrap.dedent("""
    import sys, time
    from cellmorph.runinfo import output_lock
    with output_lock(sys.argv[1], "prepare"):
        print("held", flush=True)
        time.sleep(60)
""")


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_frees_the_folder(tmp_path):
    folder = tmp_path / "cache"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CellmorphError, match=rf"another cellmorph run .*command prepare, pid {holder.pid}"):
            with output_lock(folder, "cv"):
                pass
        holder.kill()  # kill -9: the lock file stays behind, but nobody holds it
        holder.wait()
        assert (folder / LOCK_FILE).is_file()
        with output_lock(folder, "cv") as lock:
            assert json.loads(lock.read_text())["command"] == "cv"
        assert not (folder / LOCK_FILE).exists()  # released and removed
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_that_made_its_folder_removes_it_when_nothing_was_written(tmp_path):
    with output_lock(tmp_path / "a" / "b", "predict"):
        assert (tmp_path / "a" / "b" / LOCK_FILE).is_file()
    assert not (tmp_path / "a").exists()
    with output_lock(tmp_path / "c", "predict"):
        (tmp_path / "c" / "result.csv").write_text("x\n")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["result.csv"]


@pytest.mark.parametrize("command", ["prepare", "train"])  # cv: tests/test_cli.py; predict takes the same lock
def test_every_writing_command_refuses_a_folder_another_run_holds(command, tiny_screen, tiny_cache, tmp_path):
    from tests.conftest import QUICK_TRAIN, one_line_error, run_cli_here

    out = tmp_path / "out"
    # train replaces its bundle folder whole, so its lock lies beside the folder
    folder, beside = (out, True) if command == "train" else (out, False)
    hold = HOLD.replace('output_lock(sys.argv[1], "prepare")', f'output_lock(sys.argv[1], "cv", beside={beside})')
    holder = subprocess.Popen([sys.executable, "-c", hold, str(folder)], stdout=subprocess.PIPE, text=True)
    args = {"prepare": ("prepare", "--root", tiny_screen, "--out", out),
            "train": ("train", "--data", tiny_cache, *QUICK_TRAIN, "--out", out)}[command]
    try:
        assert holder.stdout.readline().strip() == "held"
        one_line_error(run_cli_here(*args), "another cellmorph run", f"pid {holder.pid}")
        assert [p.name for p in tmp_path.rglob("*") if p.name != LOCK_FILE and not p.name.endswith(LOCK_FILE)] \
            == ([] if command == "train" else ["out"])  # nothing but the holder's lock (and its folder)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_honour_the_umask(tmp_path, umask):
    """Colleagues on a shared cluster read a run as they read any file the user makes: the
    permissions come from the umask, not from mkstemp's owner-only 0600."""
    import os

    before = os.umask(umask)
    try:
        assert process_umask() == umask
        write_json(tmp_path / "x.json", {"a": 1})
        with atomic_path(tmp_path / "y.bin") as tmp:
            tmp.write_bytes(b"1")
    finally:
        os.umask(before)
    for name in ("x.json", "y.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
