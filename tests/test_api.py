"""The package's public surface: lazily loaded names, and a light import for the command line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import cellmorph
from tests.conftest import quick_config

HEAVY = ("torch", "pandas", "timm", "sklearn", "matplotlib")


@pytest.mark.parametrize("module", ["cellmorph", "cellmorph.cli", "cellmorph.cv", "cellmorph.cv.config"])
def test_the_package_and_the_command_line_import_without_torch_or_pandas(module):
    """`cellmorph --help` and option parsing must not pay for torch (seconds): the CLI builds its options from
    the settings records alone and imports the work when a command runs."""
    code = (f"import sys, {module}; heavy = [m for m in {HEAVY!r} if m in sys.modules]; "
            "print(','.join(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", f"import {module} loaded {done.stdout.strip()}"


def test_every_public_name_resolves_to_its_owner():
    from cellmorph.cv.run import run_cv
    from cellmorph.preprocess import prepare

    for name in cellmorph.__all__:
        assert getattr(cellmorph, name) is not None
    assert cellmorph.run_cv is run_cv and cellmorph.prepare is prepare
    assert set(cellmorph.__all__) <= set(dir(cellmorph))
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        cellmorph.nonsense  # noqa: B018


def test_moved_settings_are_the_same_classes_where_they_were():
    """Settings moved to cellmorph.config stay importable from their old modules (scripts and notebooks)."""
    from cellmorph.augment import AugmentConfig
    from cellmorph.config import augment, embed, features, predict, prepare, visualize
    from cellmorph.embed import EmbedConfig
    from cellmorph.models.features import FeatureSpec
    from cellmorph.predict import PredictConfig
    from cellmorph.preprocess import PrepareConfig
    from cellmorph.visualize import FilterConfig

    assert AugmentConfig is augment.AugmentConfig and FeatureSpec is features.FeatureSpec
    assert PrepareConfig is prepare.PrepareConfig and PredictConfig is predict.PredictConfig
    assert EmbedConfig is embed.EmbedConfig and FilterConfig is visualize.FilterConfig


# ----------------------------------------------------------------------------- the estimator
def _probs(frame: pd.DataFrame) -> np.ndarray:
    return frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy(float)


def test_the_classifier_predicts_what_cellmorph_predict_writes(tiny_bundle, tiny_cache, tiny_screen, tmp_path):
    from cellmorph.api import MoAClassifier
    from cellmorph.data.layouts import load_table
    from cellmorph.predict import PredictConfig, predict

    predict(tiny_bundle, tiny_cache, tmp_path / "pred", PredictConfig(threads=1, alpha=0.2), progress=False)
    clf = MoAClassifier.load(tiny_bundle, predict={"threads": 1})
    assert clf.calibration == "group-kfold:2" and clf.classes_ == sorted(clf.classes_)
    levels = clf.predict_proba(tiny_cache, alpha=0.2)
    assert set(levels) == {"tiles", "wells", "treatments", "compounds"}
    for level in ("tiles", "treatments", "compounds"):
        written = pd.read_parquet(tmp_path / "pred" / f"{level}.parquet")
        np.testing.assert_allclose(_probs(levels[level]), _probs(written), atol=1e-7)
        if level != "compounds":  # no sets per compound: none are calibrated
            assert levels[level]["Prediction_Set"].tolist() == written["Prediction_Set"].tolist()
    calls = clf.predict(tiny_cache)
    assert calls.index.names == ["Metadata_Compound", "Metadata_Concentration"] and len(calls) == 44
    # sets at a stricter level are never smaller
    assert (clf.predict_sets(tiny_cache, alpha=0.05)["Set_Size"].to_numpy()
            >= clf.predict_sets(tiny_cache, alpha=0.3)["Set_Size"].to_numpy()).all()
    # raw images are prepared with the model's recipe into a temporary cache: the same probabilities
    from_images = clf.predict_proba(load_table("bbbc021", tiny_screen, require_labels=False))
    np.testing.assert_allclose(_probs(from_images["treatments"]), _probs(levels["treatments"]), atol=1e-6)


def test_fit_writes_the_bundle_that_train_writes_and_it_loads_and_saves(tiny_cache, tmp_path):
    from cellmorph.api import MoAClassifier, NotFittedError
    from cellmorph.errors import CellmorphError

    quick = quick_config()
    clf = MoAClassifier(quick, calibration="group-kfold:2", predict={"threads": 1})
    with pytest.raises(NotFittedError, match="not fitted"):
        clf.predict_proba(tiny_cache)
    assert clf.fit(tiny_cache, tmp_path / "model") is clf
    assert (tmp_path / "model" / "bundle.json").is_file() and (tmp_path / "model.cv" / "metrics.json").is_file()
    fitted = clf.predict_proba(tiny_cache)["treatments"]
    reused = MoAClassifier(quick, predict={"threads": 1}).fit(tiny_cache, tmp_path / "reused",
                                                               calibration_run=tmp_path / "model.cv")
    np.testing.assert_array_equal(_probs(reused.predict_proba(tiny_cache)["treatments"]), _probs(fitted))
    copy = clf.save(tmp_path / "copy")
    again = MoAClassifier.load(copy, predict={"threads": 1}).predict_proba(tiny_cache)["treatments"]
    np.testing.assert_array_equal(_probs(fitted), _probs(again))
    with pytest.raises(CellmorphError, match="already exists"):
        clf.save(copy)
    with pytest.raises(CellmorphError, match="cv 'sometimes'"):
        MoAClassifier(quick, calibration="sometimes")
    uncalibrated = MoAClassifier.load(copy)
    uncalibrated.bundle_.calibration.clear()
    with pytest.raises(CellmorphError, match="no calibration scores"):
        uncalibrated.predict_sets(tiny_cache)
