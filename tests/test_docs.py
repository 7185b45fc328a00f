"""The documentation's Python examples run as written (they would rot otherwise)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_the_python_api_page_runs_from_top_to_bottom(tmp_path, monkeypatch):
    """docs/python-api.md: synth → prepare → cv → fit → predict, every block in one namespace, as a notebook
    runs its cells."""
    blocks = python_blocks(DOCS / "python-api.md")
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CELLMORPH_THREADS", "1")
    namespace: dict = {"__name__": "__docs__"}
    for k, code in enumerate(blocks, start=1):
        exec(compile(code, f"docs/python-api.md, block {k}", "exec"), namespace)
    assert (tmp_path / "cellmorph-api-example" / "model" / "bundle.json").is_file()
    assert set(namespace["sets"]["Set_Size"]) and namespace["metrics"]["n_treatments"] > 0
