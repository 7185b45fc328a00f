"""The documentation runs as written: the Python examples execute, and the site builds strict (they would rot otherwise)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cellmorph

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
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


def test_the_site_builds_offline_and_strict(tmp_path):
    """`mkdocs build --strict` (what `make docs` runs): a broken link, a missing anchor or an API name that no
    longer resolves fails it. The references are generated from the code, so they must show what it defines:
    the typer app's commands and options, the docstrings of the public API, the settings records' fields."""
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                           "--site-dir", str(site)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    def page(name: str) -> str:
        return (site / name / "index.html").read_text(encoding="utf-8")

    cli = page("cli")
    cv = cli[cli.index('id="cv"'):cli.index('id="train"')]  # the cv command's section, up to the next command
    for option in ("--data", "--out", "--cv", "--mode", "--resume", "--executor", "--ensemble-seeds"):
        assert f"<code>{option}" in cv, option
    assert 'id="weights-import"' in cli  # a command of a sub-group
    api = page("api")
    # Every public name of `cellmorph` (name → its module) has its entry: a new export needs `::: module.name` there.
    public = {**cellmorph._EXPORTS, "CellmorphError": "cellmorph.errors"}
    assert "load_table" in public and "MoAClassifier" in public
    for name, module in public.items():
        assert f'id="{module}.{name}"' in api, f"docs/api.md lacks `::: {module}.{name}`"
    assert "<code>freeze_stages</code>" in api  # CVConfig's field table
    assert ":func:" not in api and ":class:" not in api  # Sphinx roles render as code
    assert "Measured results" in page("results")  # benchmarks/RESULTS.md, included
    assert "MoAClassifier" in page("python-api")
    for html in site.rglob("*.html"):  # offline: nothing fetched from a font or script CDN
        assert "fonts.googleapis.com" not in html.read_text(encoding="utf-8"), html
