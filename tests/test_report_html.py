"""The HTML report: one self-contained file per cv, predict or compare-inits output, in a real browser too."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest

from cellmorph.cv import run_cv
from cellmorph.errors import CellmorphError
from cellmorph.metrics import bootstrap_interval
from cellmorph.report import write_report
from cellmorph.report.html import SECTION_IDS
from tests.conftest import one_line_error, quick_config, run_cli_here

QUICK = quick_config(epochs=2, cv="group-kfold:3", max_tiles_per_fold=60, keep_checkpoints="last")


@pytest.fixture(scope="module")
def cv_run(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    run_cv(tiny_cache, out, QUICK, progress=False)
    return out


@pytest.fixture(scope="module")
def predict_run(tiny_bundle, tiny_cache, tmp_path_factory):
    from cellmorph.predict import PredictConfig, predict

    out = tmp_path_factory.mktemp("report") / "pred"
    predict(tiny_bundle, tiny_cache, out, PredictConfig(threads=1), progress=False)
    return out


# Names as a user's CSVs and options could spell them: each would run script if it reached the page
# as markup, and "&amp;" must print as itself (not as "&"). "$^$" is not valid mathtext.
HOSTILE_COMPOUND = "syn-ACT-1 <script>window.__pwned = 'compound'</script> \"dq\" 'sq' & &amp;"
HOSTILE_MOA = "Actin <img src=x onerror=\"window.__pwned = 'moa'\"> $^$ 'sq' &"
HOSTILE_PLATE = "Week1_23482<svg onload=alert('plate')>\"'&"  # a file name in the cache: no "/"
HOSTILE_OUT = "run <img src=x onerror=alert('out')> \"&'"
RAW_MARKUP = ("<script>window", "<img src=x", "<svg", "<b>", "'compound'</script>")


@pytest.fixture(scope="module")
def hostile_run(tiny_screen, tmp_path_factory):
    """A cv run (default keep_checkpoints) on the tiny screen with a compound, its MoA and a plate
    renamed in the screen's CSVs, and --out and the cache named with markup too."""
    from cellmorph.data.bbbc021 import IMAGE_CSV, MOA_CSV, load_bbbc021
    from cellmorph.preprocess import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("hostile")
    screen = root / "screen"
    shutil.copytree(tiny_screen, screen)
    images = pd.read_csv(screen / IMAGE_CSV, dtype=str, keep_default_na=False)
    images["Image_Metadata_Compound"] = images["Image_Metadata_Compound"].replace({"syn-ACT-1": HOSTILE_COMPOUND})
    images["Image_Metadata_Plate_DAPI"] = images["Image_Metadata_Plate_DAPI"].replace({"Week1_23482": HOSTILE_PLATE})
    images.to_csv(screen / IMAGE_CSV, index=False)
    moa = pd.read_csv(screen / MOA_CSV, dtype=str, keep_default_na=False)
    moa["compound"] = moa["compound"].replace({"syn-ACT-1": HOSTILE_COMPOUND})
    moa["moa"] = moa["moa"].replace({"Actin disruptors": HOSTILE_MOA})
    moa.to_csv(screen / MOA_CSV, index=False)
    cache = root / "cache <b>&amp;"
    prepare(load_bbbc021(screen, screen), cache, PrepareConfig(tile_size=32), progress=False)
    out = root / HOSTILE_OUT
    quick = {k: v for k, v in QUICK.items() if k != "keep_checkpoints"} | dict(epochs=1, cv="group-kfold:2",
                                                                              max_tiles_per_fold=40)
    run_cv(cache, out, quick, progress=False)
    treatments = pd.read_csv(out / "treatments.csv")
    assert HOSTILE_COMPOUND in set(treatments["Metadata_Compound"]) and HOSTILE_MOA in set(treatments["Metadata_MoA"])
    write_report(out)  # once, for the tests below
    return out


def sections_of(page: str) -> list[str]:
    return re.findall(r'<section id="([a-z-]+)"', page)


def self_contained(page: str) -> None:
    """Nothing to fetch: no external script, style sheet, image or font, and no network URL at all."""
    assert not re.search(r'<(script|link|img|iframe)[^>]+(src|href)="(?!data:|#)', page), "a resource to fetch"
    assert "http://" not in page and "https://" not in page
    assert "@import" not in page and "url(" not in page


def test_cv_report_has_every_section_inline(cv_run):
    path = write_report(cv_run)
    assert path == cv_run / "report.html" and path.stat().st_mode & 0o044 == 0o044  # shareable
    page = path.read_text()
    assert sections_of(page) == list(SECTION_IDS)
    self_contained(page)
    treatments = pd.read_csv(cv_run / "treatments.csv")
    table = page[page.index('id="treatment-table"'):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == len(treatments) + 1  # heading + one row per treatment
    figures = re.findall(r'<img src="data:image/png;base64,', page)
    assert len(figures) >= 5  # confusion, curves, map, examples, Grad-CAM
    assert "Grad-CAM" in page  # the run kept the last fold's weights
    assert "Compounds, each called from all its treatments together" in page
    # The same run gives the same report (seeded bootstrap, map and figures).
    first = page
    assert write_report(cv_run).read_text() == first


def test_predict_report_shows_sets_confidence_and_reliability(predict_run):
    page = write_report(predict_run).read_text()
    assert sections_of(page) == list(SECTION_IDS)
    self_contained(page)
    assert "prediction set" in page and "confidence (calibrated)" in page
    assert "ECE" in page or "expected calibration error" in page
    assert "Grad-CAM of the call" in page  # from the bundle's network


def test_names_from_the_screen_are_escaped_in_the_report(hostile_run):
    from markupsafe import escape

    page = (hostile_run / "report.html").read_text()
    assert sections_of(page) == list(SECTION_IDS)
    for raw in RAW_MARKUP:
        assert raw not in page, raw
    assert page.count("<script") == 1 and page.count("<svg") == 0  # the report's own sorting script only
    assert re.findall(r"<img (?!src=\"data:image/png;base64,)", page) == []
    # Each name is there, escaped, as the CSV spells it (the compound's "&amp;" too).
    for name in (HOSTILE_COMPOUND, HOSTILE_MOA, str(hostile_run.resolve())):
        assert str(escape(name)) in page, name
    assert "Grad-CAM of the call" in page  # a cv run with the defaults kept the last fold's weights


def test_bootstrap_interval_is_seeded_and_brackets_the_accuracy():
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"Metadata_Compound": [f"c{i}" for i in range(60)], "Metadata_Concentration": 1.0})
    correct = rng.random(60) < 0.7
    low, high = bootstrap_interval(frame, correct)
    assert (low, high) == bootstrap_interval(frame, correct)
    assert low < correct.mean() < high and 0.1 < high - low < 0.35  # about ±1.96·sqrt(.21/60) = ±0.12
    # Wells of one treatment move together: resampling treatments, not wells.
    wells = pd.concat([frame] * 4, ignore_index=True)
    low4, high4 = bootstrap_interval(wells, np.tile(correct, 4))
    assert high4 - low4 == pytest.approx(high - low, abs=0.05)


def test_report_cli_contract_and_bad_folders(cv_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(cv_run, run)
    (run / "report.html").unlink(missing_ok=True)
    proc = run_cli_here("report", run)
    assert proc.returncode == 0, proc.stderr
    assert (run / "report.html").is_file() and "report.html" in proc.stderr
    one_line_error(run_cli_here("report", tmp_path / "nowhere"), "not a folder")
    (tmp_path / "empty").mkdir()
    one_line_error(run_cli_here("report", tmp_path / "empty"), "not a cellmorph output folder")
    (run / "metrics.json").unlink()
    one_line_error(run_cli_here("report", run), "has not finished")
    with pytest.raises(CellmorphError):
        write_report(tmp_path / "empty")


# --------------------------------------------------------------------------- in a real browser
def _browser_or_skip():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (make test installs Debian's chromium where it can)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install 'cellmorph[dev]')")
    return chromium, sync_playwright


@pytest.mark.parametrize("kind", ["cv", "predict"])
def test_report_opens_in_a_browser_without_errors(kind, cv_run, predict_run, tmp_path):
    chromium, sync_playwright = _browser_or_skip()
    run = {"cv": cv_run, "predict": predict_run}[kind]
    path = write_report(run)
    errors: list[str] = []
    shot = tmp_path / f"{kind}.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            # Offline: any request that is not for the file itself fails the test.
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(path.resolve().as_uri())
            page.wait_for_selector("html[data-report-ready=yes]")
            assert [s.get_attribute("id") for s in page.query_selector_all("section")] == list(SECTION_IDS)
            assert all(page.is_visible(f"#{s} h2") for s in SECTION_IDS)
            assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
            # The treatment table sorts when its heading is clicked.
            column = page.query_selector_all("#treatment-table thead th")[3]  # the call
            column.click()
            calls = page.eval_on_selector_all("#treatment-table tbody tr td:nth-child(4)", "c => c.map(x => x.textContent)")
            assert calls == sorted(calls, key=str.lower)
            column.click()
            again = page.eval_on_selector_all("#treatment-table tbody tr td:nth-child(4)", "c => c.map(x => x.textContent)")
            assert again == sorted(calls, key=str.lower, reverse=True)
            page.screenshot(path=str(shot), full_page=False)
            assert [r for r in requests if not r.startswith("file://")] == []
        finally:
            browser.close()
    assert errors == []
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # text and figures, not a blank page


def test_hostile_names_show_as_text_and_run_nothing_in_a_browser(hostile_run):
    chromium, sync_playwright = _browser_or_skip()
    path = hostile_run / "report.html"
    dialogs: list[str] = []
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(path.resolve().as_uri())
            page.wait_for_selector("html[data-report-ready=yes]")
            # Sorting moves the rows about (by their text): still nothing runs.
            page.query_selector_all("#treatment-table thead th")[0].click()
            page.query_selector_all("#treatment-table thead th")[2].click()
            assert page.evaluate("typeof window.__pwned") == "undefined"
            assert page.evaluate("document.scripts.length") == 1
            assert page.evaluate("document.querySelectorAll('svg, img:not([src^=\"data:\"])').length") == 0
            text = page.evaluate("document.body.textContent")
            compounds = page.eval_on_selector_all("#treatment-table tbody td:nth-child(1)",
                                                  "c => c.map(x => x.textContent)")
            moas = page.eval_on_selector_all("#classes tbody td:nth-child(1)", "c => c.map(x => x.textContent)")
            assert [r for r in requests if r != path.resolve().as_uri()] == []  # no src=x fetched
        finally:
            browser.close()
    assert dialogs == [] and errors == []
    assert HOSTILE_COMPOUND in compounds and HOSTILE_MOA in moas
    assert str(hostile_run.resolve()) in text and HOSTILE_MOA in text
    assert "cache <b>&amp;" in text  # the data folder's name, in the run table


def test_the_well_map_is_pca_when_asked_or_without_umap(monkeypatch):
    """CELLMORPH_REPORT_MAP=pca asks for PCA; auto falls back to PCA where umap-learn cannot be imported. (Drawing
    UMAP itself is not timed here: its numba kernels compile for 10-40 s in a fresh environment.)"""
    import sys

    import numpy as np

    from cellmorph.report.html import MAP_PROJECTION_VARIABLE, project_2d

    x = np.random.default_rng(0).normal(size=(30, 6))
    monkeypatch.setenv(MAP_PROJECTION_VARIABLE, "pca")
    points, method = project_2d(x)
    assert method == "PCA" and points.shape == (30, 2)
    monkeypatch.setenv(MAP_PROJECTION_VARIABLE, "auto")
    monkeypatch.setitem(sys.modules, "umap", None)  # as if umap-learn were not installed: import umap fails
    points, method = project_2d(x)
    assert method == "PCA" and points.shape == (30, 2) and np.isfinite(points).all()
