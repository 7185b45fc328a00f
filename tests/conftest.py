"""Shared fixtures: real BBBC021 material from ../shared (read-only) and tiny synthetic plates."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# The reports' well maps by PCA: scanpy (the AnnData tests) brings umap-learn, whose numba kernels would compile
# afresh in every process that writes a report (10-12 s each, 40 s in a fresh environment).
os.environ.setdefault("CELLMORPH_REPORT_MAP", "pca")

# CI puts shared/ beside the clone; CELLMORPH_SHARED points elsewhere when it is not.
SHARED = Path(os.environ.get("CELLMORPH_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data" / "bbbc021"
REAL_METADATA = SHARED / "metadata"
REAL_CROPS = SHARED / "crops-week4"


def run_cli(*args: str, env: dict | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """``cellmorph ARGS`` in a fresh process, as a user runs it (stdout/stderr captured)."""
    return subprocess.run([sys.executable, "-m", "cellmorph.cli", *map(str, args)], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env}, input=input)


def run_cli_here(*args) -> subprocess.CompletedProcess:
    """``cellmorph ARGS`` in this process (the same contract as run_cli, seconds faster: no torch import);
    an exception that escaped the CLI is appended to stderr as the traceback a user would see."""
    import traceback

    from typer.testing import CliRunner

    from cellmorph.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, stderr)


# Progress lines in a batch log ("[HH:MM:SS] folds 3/38 ...") may come before a failure.
PROGRESS_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The failure contract: exit code 2, no traceback, and the run ends in one ``error:`` line
    naming ``needles`` (besides it, stderr holds at most progress lines of work done before)."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not PROGRESS_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert proc.stderr.rstrip().endswith(lines[0]), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


class NetworkAttempt(AssertionError):
    """Raised by :func:`no_network` traps: something tried to reach the network."""


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything tries to open a connection or call a hub/URL loader; yields the attempts."""
    import socket

    import timm
    import timm.models._builder as builder
    import timm.models._hub as hub
    import torch

    from cellmorph.models.weights import resolve as weights_resolve

    calls: list[str] = []

    def trap(what):
        def _raise(*args, **kwargs):
            calls.append(what)
            raise NetworkAttempt(f"network attempted via {what}")

        return _raise

    monkeypatch.setattr(socket.socket, "connect", trap("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", trap("socket.connect_ex"))
    monkeypatch.setattr(socket, "create_connection", trap("socket.create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", trap("socket.getaddrinfo"))
    for mod, attr in [
        (builder, "load_pretrained"),
        (builder, "load_state_dict_from_url"),
        (builder, "load_state_dict_from_hf"),
        (builder, "download_cached_file"),
        (hub, "hf_hub_download"),
        (hub, "download_url_to_file"),
        (torch.hub, "load_state_dict_from_url"),
        (torch.hub, "download_url_to_file"),
        (timm.models, "load_pretrained"),
    ]:
        if hasattr(mod, attr):
            monkeypatch.setattr(mod, attr, trap(f"{mod.__name__}.{attr}"))
    try:
        import huggingface_hub

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", trap("huggingface_hub.hf_hub_download"))
    except ImportError:  # pragma: no cover
        pass
    monkeypatch.setattr(weights_resolve, "_download_from_hub", trap("cellmorph hub download"))
    yield calls
    assert calls == [], f"network was attempted: {calls}"


# CI always has the real data, so there a missing fixture is a failure (.ci/run sets this); on
# any other machine the tests that need it skip, saying why.
REQUIRE_SHARED = os.environ.get("CELLMORPH_REQUIRE_SHARED", "") not in ("", "0")


def require(path: Path) -> Path:
    if not path.exists():
        reason = (f"real-data fixture {path} is missing (../shared beside the repo, or $CELLMORPH_SHARED "
                  "pointing at it)")
        if REQUIRE_SHARED:
            pytest.fail(reason + "; CELLMORPH_REQUIRE_SHARED is set")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def real_metadata() -> Path:
    return require(REAL_METADATA)


@pytest.fixture(scope="session")
def real_crops() -> Path:
    return require(REAL_CROPS / "index.csv")


def built_once(tmp_path_factory, folder: str, build) -> Path:
    """``build(path)`` once for the whole test run (``path``: ``folder`` in the run's temporary folder): the
    pytest-xdist workers of one run share what the first of them built (under a file lock, as pytest-xdist's
    documentation shows), so a session fixture's seconds are paid once, not once a worker. Only for fixtures that
    no test modifies."""
    from filelock import FileLock

    # xdist gives each worker its own basetemp inside the run's; a run without xdist has only its own
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    base = root / "built-once"
    base.mkdir(exist_ok=True)
    out, done = base / folder, base / (folder.replace("/", "-") + ".done")
    with FileLock(str(done) + ".lock"):
        if not done.is_file():
            shutil.rmtree(base / Path(folder).parts[0], ignore_errors=True)  # what a failed build left
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def tiny_screen(tmp_path_factory) -> Path:
    """A tiny synthetic BBBC021-layout screen, built once per test run by our own generator. Do not modify."""
    from cellmorph.data.synthetic import generate_bbbc021

    return built_once(tmp_path_factory, "tiny/screen",
                      lambda out: generate_bbbc021(out, preset="tiny", seed=0, progress=False))


@pytest.fixture
def tiny_copy(tiny_screen, tmp_path) -> Path:
    """A private copy of the tiny screen that a test may corrupt."""
    dest = tmp_path / "screen"
    shutil.copytree(tiny_screen, dest)
    return dest


@pytest.fixture(scope="session")
def tiny_cache(tiny_screen, tmp_path_factory) -> Path:
    """The tiny screen prepared with default settings, once per test run. Do not modify."""
    from cellmorph.data.bbbc021 import load_bbbc021
    from cellmorph.preprocess import PrepareConfig, prepare

    return built_once(tmp_path_factory, "tinycache/cache", lambda out: prepare(
        load_bbbc021(tiny_screen, tiny_screen), out, PrepareConfig(), progress=False))


# The suite's one quick training recipe: a tiny network from scratch on 32-px tiles, 40 tiles a fold,
# one thread (robust on a shared 2-core machine: OpenMP threads spin-wait under oversubscription).
QUICK = dict(model="test_resnet", init="xavier", image_size=32, epochs=1, max_tiles_per_fold=40, num_threads=1)


def quick_config(**overrides) -> dict:
    """:data:`QUICK` with ``overrides`` (a field set to None is left out): a CVConfig mapping of seconds."""
    return {k: v for k, v in (QUICK | overrides).items() if v is not None}


def quick_args(**overrides) -> tuple[str, ...]:
    """:func:`quick_config` as `cellmorph cv`/`train` options."""
    flags = {"num_threads": "--threads"}
    return tuple(a for k, v in quick_config(**overrides).items()
                 for a in (flags.get(k, "--" + k.replace("_", "-")), str(v)))


# `cellmorph train` in seconds.
QUICK_TRAIN = quick_args()


@pytest.fixture(scope="session")
def tiny_bundle(tiny_cache, tmp_path_factory) -> Path:
    """A model bundle trained on the tiny cache, calibrated by group-kfold:2, once per test run. Do not modify."""

    def train(out: Path) -> None:
        proc = run_cli_here("train", "--data", tiny_cache, *QUICK_TRAIN, "--calibration", "group-kfold:2", "--out", out)
        assert proc.returncode == 0, proc.stderr

    return built_once(tmp_path_factory, "bundle/model", train)


class SmallDisk:
    """A tmpfs of a chosen size at ``path``: a real full disk (ENOSPC) for the write paths."""

    def __init__(self, path: Path):
        self.path = path
        self.mounted = False

    def mount(self, size: str) -> Path:
        options = f"size={size}" if not self.mounted else f"remount,size={size}"
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(self.path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'mount failed'}); "
                        "the write layer's ENOSPC handling is tested by injection in tests/test_runinfo.py")
        self.mounted = True
        return self.path


@pytest.fixture
def small_disk(tmp_path):
    """Mount a small tmpfs (needs root, as in CI); the test is skipped with the reason where it cannot."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8); the write layer's ENOSPC handling is tested by "
                    "injection in tests/test_runinfo.py")
    disk = SmallDisk(tmp_path / "disk")
    disk.path.mkdir()
    yield disk
    if disk.mounted:
        subprocess.run(["umount", "-l", str(disk.path)], capture_output=True)
