"""Shared fixtures: real BBBC021 material from ../shared (read-only) and tiny synthetic plates."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# CI puts shared/ beside the clone; CELLMORPH_SHARED points elsewhere when it is not.
SHARED = Path(os.environ.get("CELLMORPH_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data" / "bbbc021"
REAL_METADATA = SHARED / "metadata"
REAL_CROPS = SHARED / "crops-week4"


def run_cli(*args: str, env: dict | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """``cellmorph ARGS`` in a fresh process, as a user runs it (stdout/stderr captured)."""
    return subprocess.run([sys.executable, "-m", "cellmorph.cli", *map(str, args)], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env}, input=input)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The failure contract: exit code 2, exactly one stderr line naming ``needles``, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"real-data fixture {path} is missing; tests expect ../shared beside the repo")
    return path


@pytest.fixture(scope="session")
def real_metadata() -> Path:
    return require(REAL_METADATA)


@pytest.fixture(scope="session")
def real_crops() -> Path:
    return require(REAL_CROPS / "index.csv")


@pytest.fixture(scope="session")
def tiny_screen(tmp_path_factory) -> Path:
    """A tiny synthetic BBBC021-layout screen, built once per session by our own generator. Do not modify."""
    from cellmorph.data.synthetic import generate_bbbc021

    out = tmp_path_factory.mktemp("tiny") / "screen"
    generate_bbbc021(out, preset="tiny", seed=0, progress=False)
    return out


@pytest.fixture
def tiny_copy(tiny_screen, tmp_path) -> Path:
    """A private copy of the tiny screen that a test may corrupt."""
    dest = tmp_path / "screen"
    shutil.copytree(tiny_screen, dest)
    return dest


@pytest.fixture(scope="session")
def tiny_cache(tiny_screen, tmp_path_factory) -> Path:
    """The tiny screen prepared with default settings. Do not modify."""
    from cellmorph.data.bbbc021 import load_bbbc021
    from cellmorph.preprocess import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("tinycache") / "cache"
    prepare(load_bbbc021(tiny_screen, tiny_screen), out, PrepareConfig(), progress=False)
    return out
