"""`cellmorph train` and the model bundle: saved, verified, loaded in a new process, identical."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cellmorph.bundle import LEVELS, MANIFEST, WEIGHTS, calibration_file, load_bundle
from cellmorph.errors import CellmorphError
from tests.conftest import one_line_error, run_cli

from tests.conftest import QUICK_TRAIN  # noqa: E402

# Probabilities of the first 24 tiles of a cache under a bundle, as `predict` will compute them.
SCORE = """
import sys, numpy as np, torch
from cellmorph.bundle import load_bundle
from cellmorph.cache import TileCache
from cellmorph.datasets import InputPipeline
from cellmorph.train import PredictSettings, predict_tiles
torch.set_num_threads(1)
bundle = load_bundle(sys.argv[1])
probs = predict_tiles(bundle.network(), InputPipeline.from_spec(bundle.input), TileCache(sys.argv[2]),
                      np.arange(24), PredictSettings(batch_size=8), torch.device("cpu"))
np.save(sys.argv[3], probs)
"""


@pytest.fixture
def model(tiny_bundle):
    return tiny_bundle


def test_train_writes_a_complete_bundle_with_out_of_fold_calibration(model, tiny_cache):
    bundle = load_bundle(model)
    manifest = json.loads((model / MANIFEST).read_text())
    cache_manifest = json.loads((tiny_cache / "manifest.json").read_text())
    assert bundle.model_name == "test_resnet" and len(bundle.classes) == 12
    assert bundle.input.size == 32 and bundle.input.channels == 3
    assert bundle.recipe["config_hash"] == cache_manifest["config_hash"]
    assert bundle.recipe["channels"] == cache_manifest["channels"]
    assert set(manifest["files"]) == {WEIGHTS, *map(calibration_file, LEVELS)}
    assert all(len(v) == 64 for v in manifest["files"].values())
    training = manifest["training"]
    assert training["n_train_tiles"] == 40 and training["seeds"] and training["data_fingerprint"]
    assert "git_commit" in manifest["provenance"] and manifest["provenance"]["packages"]["torch"]
    # Calibration scores are the CV's out-of-fold probabilities, per treatment, well and tile.
    cv_run = str(model) + ".cv"
    written = {"treatments": pd.read_csv(cv_run + "/treatments.csv"), "wells": pd.read_csv(cv_run + "/wells.csv"),
               "tiles": pd.read_parquet(cv_run + "/predictions.parquet")}
    assert [len(bundle.calibration[level]) for level in LEVELS] == [44, 88, 352]
    for level, frame in written.items():
        probs = [c for c in frame.columns if c.startswith("prob_")]
        np.testing.assert_allclose(bundle.calibration[level][probs].to_numpy(), frame[probs].to_numpy())
    assert training["calibration"]["cv"] == "group-kfold:2"


def test_a_bundle_loaded_in_a_new_process_gives_identical_probabilities(model, tiny_cache, tmp_path):
    runs = []
    for k in range(2):
        out = tmp_path / f"probs{k}.npy"
        proc = subprocess.run([sys.executable, "-c", SCORE, str(model), str(tiny_cache), str(out)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        runs.append(np.load(out))
    assert runs[0].shape == (24, 12)
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_allclose(runs[0].sum(axis=1), 1.0, rtol=1e-5)


def _copy(model, tmp_path, name="copy"):
    import shutil

    dest = tmp_path / name
    shutil.copytree(model, dest)
    return dest


def test_an_altered_or_missing_file_is_refused(model, tmp_path):
    altered = _copy(model, tmp_path)
    data = bytearray((altered / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (altered / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CellmorphError, match=f"{WEIGHTS}: sha256 differs"):
        load_bundle(altered)
    missing = _copy(model, tmp_path, "missing")
    (missing / calibration_file("wells")).unlink()
    with pytest.raises(CellmorphError, match=f"{calibration_file('wells')}: missing from the model bundle"):
        load_bundle(missing)
    with pytest.raises(CellmorphError, match="not a model folder"):
        load_bundle(tmp_path / "nowhere")


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_weights_that_hold_pickled_code_are_never_unpickled(model, tmp_path, monkeypatch):
    evil = _copy(model, tmp_path)
    (evil / WEIGHTS).write_bytes(pickle.dumps({"conv1.weight": _Payload()}))
    manifest = json.loads((evil / MANIFEST).read_text())
    from cellmorph.bundle import sha256_file

    manifest["files"][WEIGHTS] = sha256_file(evil / WEIGHTS)  # the record matches: only the format can refuse it
    (evil / MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CellmorphError, match="not a safetensors file"):
        load_bundle(evil)
    assert not (tmp_path / "PWNED").exists()


def test_train_output_that_is_a_file_is_one_line(tiny_cache, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    one_line_error(run_cli("train", "--data", tiny_cache, *QUICK_TRAIN, "--out", blocker), str(blocker), "existing file")
    assert blocker.read_text() == "keep me"


def test_train_takes_the_cv_options_and_refuses_a_probe_it_cannot_save(tiny_cache, tmp_path):
    """`train` has `cv`'s options (one shared set); a linear probe makes no network to bundle."""
    one_line_error(run_cli("train", "--data", tiny_cache, *QUICK_TRAIN, "--mode", "linear-probe",
                           "--out", tmp_path / "m"), "linear-probe")
    assert not (tmp_path / "m").exists()
    from typer.main import get_command

    from cellmorph.cli import app

    options = {name: {o for p in get_command(app).commands[name].params for o in p.opts} for name in ("cv", "train")}
    assert options["cv"] - options["train"] == {"--cv", "--replicates"}


def test_train_refuses_cv_only_options_without_a_calibration_cv(tiny_cache, tmp_path):
    """--eval-epochs and --keep-checkpoints act on held-out folds; without --calibration there are none,
    so train says so instead of ignoring them."""
    for option in (["--eval-epochs", "1"], ["--keep-checkpoints", "all"]):
        one_line_error(run_cli("train", "--data", tiny_cache, *QUICK_TRAIN, *option, "--out", tmp_path / "m"),
                       option[0], "--calibration")
        assert not (tmp_path / "m").exists()


def test_the_bundle_records_its_training_compounds_and_whether_calibration_held_them_out(model, tiny_cache):
    from cellmorph.cache import TileCache

    bundle = load_bundle(model)
    index = TileCache(tiny_cache).index
    treated = sorted(set(index.loc[~index["Metadata_IsControl"].astype(bool), "Metadata_Compound"]))
    # the compounds of the tiles it trained on (QUICK_TRAIN subsamples 40 tiles)
    assert set(bundle.training_compounds) <= set(treated) and len(bundle.training_compounds) > 10
    assert bundle.manifest["training"]["calibration"]["compound_disjoint"] is True  # group-kfold:2
    assert bundle.calibration_compound_disjoint
    # A bundle from before these records: the calibration scores' compounds, the scheme's own property.
    training = dict(bundle.manifest["training"], calibration=dict(bundle.manifest["training"]["calibration"]))
    del training["compounds"], training["calibration"]["compound_disjoint"]
    older = type(bundle)(bundle.root, dict(bundle.manifest, training=training), bundle.weights, bundle.calibration)
    assert older.training_compounds == treated and older.calibration_compound_disjoint
    training["calibration"]["cv"] = "well:2"
    assert not older.calibration_compound_disjoint
