"""`cellmorph predict`: every treatment called, with confidence and a conformal prediction set."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from cellmorph.bundle import load_bundle
from cellmorph.calibration import TemperatureScaling, temperature_helps
from tests.bundle_helpers import edited_bundle, seal_bundle
from tests.conftest import one_line_error, quick_config, run_cli_here


@pytest.mark.slow
def test_predict_writes_every_treatment_with_its_set(tiny_bundle, tiny_cache, tmp_path):
    runs = {}
    for alpha in ("0.1", "0.3"):
        out = tmp_path / f"pred{alpha}"
        proc = run_cli_here("predict", "--model", tiny_bundle, "--data", tiny_cache, "--alpha", alpha, "--out", out,
                       "--threads", "1")
        assert proc.returncode == 0, proc.stderr
        runs[alpha] = (pd.read_parquet(out / "treatments.parquet"), json.loads(proc.stdout.strip().splitlines()[-1]))
    treatments, summary = runs["0.1"]
    contract = ["Metadata_Compound", "Metadata_Concentration", "Predicted_MoA", "Confidence", "Prediction_Set",
                "Set_Size", "Metadata_MoA"]
    assert set(contract) <= set(treatments.columns) and len(treatments) == 44
    probs = [c for c in treatments.columns if c.startswith("prob_")]
    classes = [c[len("prob_"):] for c in probs]
    members = [set(s.split("|")) if s else set() for s in treatments["Prediction_Set"]]
    assert all(m <= set(classes) for m in members)
    assert [len(m) for m in members] == treatments["Set_Size"].tolist()
    np.testing.assert_allclose(treatments["Raw_Confidence"], treatments[probs].max(axis=1))
    # Confidence: the call's probability after temperature scaling, which keeps the call; a fitted T
    # only where it lowered the held-out log-loss, else T = 1 (renormalised).
    assert ((treatments["Confidence"] > 0) & (treatments["Confidence"] <= 1)).all()
    calibration = load_bundle(tiny_bundle).calibration["treatments"]
    scaled = (TemperatureScaling.from_scores(calibration, classes) if temperature_helps(calibration, classes)
              else TemperatureScaling(1.0))
    np.testing.assert_allclose(treatments["Confidence"], scaled.transform(treatments[probs].to_numpy()).max(axis=1))
    covered = [moa in m for moa, m in zip(treatments["Metadata_MoA"], members)]
    assert summary["coverage"] == pytest.approx(np.mean(covered))
    assert summary["treatment_accuracy"] == pytest.approx((treatments["Predicted_MoA"] == treatments["Metadata_MoA"]).mean())
    # Wells and tiles get sets too, calibrated at their own level.
    for level, n in (("wells", 88), ("tiles", 352)):
        frame = pd.read_parquet(tmp_path / "pred0.1" / f"{level}.parquet")
        assert len(frame) == n and {"Prediction_Set", "Set_Size", "Empty_Set", "Confidence"} <= set(frame.columns)
        assert (frame["Set_Size"] == frame["Prediction_Set"].map(lambda s: len(s.split("|")) if s else 0)).all()
    # The model was trained on these compounds: flagged, and scored apart from new compounds.
    seen = treatments["Metadata_Compound"].isin(load_bundle(tiny_bundle).training_compounds)
    assert treatments["Metadata_InTraining"].tolist() == seen.tolist() and seen.any()
    parts = summary["training_compounds"], summary["new_compounds"]
    assert [p["n_labelled_treatments"] for p in parts] == [seen.sum(), (~seen).sum()]
    assert parts[0]["treatment_accuracy"] == pytest.approx(
        (treatments["Predicted_MoA"] == treatments["Metadata_MoA"])[seen].mean())
    assert "trained on (Metadata_InTraining)" in proc.stderr  # the last run's note
    # A larger alpha can only shrink a set: the sets at 0.3 are subsets of those at 0.1.
    looser = [set(s.split("|")) if s else set() for s in runs["0.3"][0]["Prediction_Set"]]
    assert all(small <= big for small, big in zip(looser, members))


def test_bad_predict_inputs_are_one_line(tiny_bundle, tiny_cache, tmp_path):
    for alpha in ("0", "1.5"):
        one_line_error(run_cli_here("predict", "--model", tiny_bundle, "--data", tiny_cache, "--alpha", alpha,
                               "--out", tmp_path / "p"), "alpha")
    other = tmp_path / "other-cache"
    shutil.copytree(tiny_cache, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["channels"] = ["DAPI", "Actin", "Tubulin"]  # another order than the model was trained on
    (other / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(run_cli_here("predict", "--model", tiny_bundle, "--data", other, "--out", tmp_path / "p"),
                   str(other), "channels")
    assert not (tmp_path / "p").exists()


def test_a_saved_fold_model_reproduces_the_cv_predictions_of_its_held_out_compounds(tiny_cache, tmp_path):
    """Fold weights (--keep-checkpoints all) applied to the fold's held-out tiles through the
    prediction code give the probabilities the CV run wrote, to 1e-6 on the CPU."""
    import torch

    from cellmorph.cache import TileCache
    from cellmorph.cv import RunDir, run_cv
    from cellmorph.datasets import InputPipeline
    from cellmorph.models import InputSpec, create_model
    from cellmorph.runtime import torch_threads
    from cellmorph.train import PredictSettings, predict_tiles

    out = tmp_path / "run"
    run_cv(tiny_cache, out, quick_config(cv="group-kfold:2", keep_checkpoints="all"), progress=False)
    rundir, cache = RunDir(out), TileCache(tiny_cache)
    for fold in rundir.finished_folds():
        state, written = rundir.fold_state(fold), rundir.read_fold_predictions(fold)
        model = create_model(state["model_name"], len(state["classes"]), init="xavier")
        model.load_state_dict(state["model"])
        with torch_threads(1):
            probs = predict_tiles(model, InputPipeline.from_spec(InputSpec.from_record(state["input"])), cache,
                                  written["Metadata_CacheRow"].to_numpy(), PredictSettings(batch_size=64),
                                  torch.device("cpu"))
        np.testing.assert_allclose(probs, written[[f"prob_{c}" for c in state["classes"]]].to_numpy(), atol=1e-6)


# --------------------------------------------------------------------------- raw images of a new screen
@pytest.fixture(scope="module")
def new_screen(tmp_path_factory):
    """Another synthetic screen (seed 1) whose treated compounds are renamed, so that none is known to
    the model, and without the MoA table: what a biologist brings to `predict`."""
    from cellmorph.data.synthetic import generate_bbbc021

    out = tmp_path_factory.mktemp("new") / "screen"
    generate_bbbc021(out, preset="tiny", seed=1, progress=False)
    images = pd.read_csv(out / "BBBC021_v1_image.csv")
    treated = images["Image_Metadata_Compound"] != "DMSO"
    images.loc[treated, "Image_Metadata_Compound"] = "new-" + images.loc[treated, "Image_Metadata_Compound"]
    images.to_csv(out / "BBBC021_v1_image.csv", index=False)
    (out / "BBBC021_v1_moa.csv").unlink()
    return out


def test_predict_on_images_of_unknown_compounds_writes_every_treatment_with_its_set(tiny_bundle, new_screen, tmp_path):
    out = tmp_path / "pred"
    proc = run_cli_here("predict", "--model", tiny_bundle, "--layout", "bbbc021", "--root", new_screen, "--out", out,
                   "--threads", "1", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    treatments = pd.read_parquet(out / "treatments.parquet")
    images = pd.read_csv(new_screen / "BBBC021_v1_image.csv")
    treated = images[images["Image_Metadata_Compound"] != "DMSO"]
    expected = set(zip(treated["Image_Metadata_Compound"], treated["Image_Metadata_Concentration"].astype(float)))
    assert set(zip(treatments["Metadata_Compound"], treatments["Metadata_Concentration"])) == expected
    assert len(treatments) == len(expected) == 44
    assert list(treatments.columns[:2]) == ["Metadata_Compound", "Metadata_Concentration"]
    assert "Metadata_MoA" not in treatments.columns  # no labels in, none made up
    assert not treatments["Metadata_InTraining"].any()
    assert {"Predicted_MoA", "Confidence", "Prediction_Set", "Set_Size", "Empty_Set"} <= set(treatments.columns)
    assert (treatments["Set_Size"] == treatments["Prediction_Set"].map(lambda s: len(s.split("|")) if s else 0)).all()
    csv = pd.read_csv(out / "treatments.csv")
    assert len(csv) == 44 and csv["Metadata_Compound"].str.startswith("new-").all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_treatments"] == 44 and "coverage" not in summary
    assert (out / "cache" / "manifest.json").is_file()  # the screen, prepared with the model's recipe
    # Each compound called from its treatments together: the logmean of their probabilities
    compounds = pd.read_parquet(out / "compounds.parquet").set_index("Metadata_Compound")
    assert sorted(compounds.index) == sorted(treated["Image_Metadata_Compound"].unique())
    assert summary["compounds"]["n_compounds"] == len(compounds) and compounds["n_treatments"].sum() == 44
    flagged = summary["compounds"]["novelty"]  # a fine-tune bundle's compounds flagged by their call's probability
    assert flagged["score"] == "1 - max probability" and flagged["novel_compounds"] == list(
        compounds.index[compounds["Novel"]])
    assert "Metadata_MoA" not in compounds.columns and not compounds["Metadata_InTraining"].any()
    probs = [c for c in treatments.columns if c.startswith("prob_")]
    one = treatments[treatments["Metadata_Compound"] == compounds.index[0]]
    logs = np.log(np.clip(one[probs].to_numpy(float), 1e-12, None)).mean(axis=0)
    np.testing.assert_allclose(compounds.loc[compounds.index[0], probs].to_numpy(float),
                               np.exp(logs) / np.exp(logs).sum(), rtol=1e-9)
    assert compounds.loc[compounds.index[0], "Predicted_MoA"] == probs[int(np.argmax(logs))][len("prob_"):]
    assert pd.read_csv(out / "compounds.csv")["Metadata_Compound"].str.startswith("new-").all()


def test_images_are_prepared_exactly_as_the_training_cache(tiny_bundle, tiny_screen, tiny_cache, tmp_path):
    """The training screen given as images (--layout) gives the probabilities of its prepared cache
    (--data): the bundle's recipe is applied to new images as `prepare` applied it."""
    from cellmorph.data.layouts import load_table
    from cellmorph.predict import PredictConfig, predict

    config = PredictConfig(threads=1)
    predict(tiny_bundle, load_table("bbbc021", tiny_screen, require_labels=False), tmp_path / "images", config,
            progress=False)
    predict(tiny_bundle, tiny_cache, tmp_path / "cache", config, progress=False)
    for level in ("tiles", "treatments"):
        images = pd.read_parquet(tmp_path / "images" / f"{level}.parquet")
        cached = pd.read_parquet(tmp_path / "cache" / f"{level}.parquet")
        probs = [c for c in cached.columns if c.startswith("prob_")]
        assert len(images) == len(cached)
        np.testing.assert_allclose(images[probs].to_numpy(), cached[probs].to_numpy(), atol=1e-6)
        assert images["Prediction_Set"].tolist() == cached["Prediction_Set"].tolist()


def test_a_plate_without_dmso_is_one_line_with_the_batch_hint(tiny_bundle, new_screen, tmp_path):
    screen = tmp_path / "screen"
    shutil.copytree(new_screen, screen)
    images = pd.read_csv(screen / "BBBC021_v1_image.csv")
    plate = sorted(images["Image_Metadata_Plate_DAPI"].unique())[1]
    no_dmso = (images["Image_Metadata_Compound"] == "DMSO") & (images["Image_Metadata_Plate_DAPI"] == plate)
    images[~no_dmso].to_csv(screen / "BBBC021_v1_image.csv", index=False)
    out = tmp_path / "new" / "pred"
    args = ("predict", "--model", tiny_bundle, "--layout", "bbbc021", "--root", screen, "--threads", "1",
            "--no-progress")
    one_line_error(run_cli_here(*args, "--out", out), plate, "no DMSO", "--normalize batch")
    assert not (tmp_path / "new").exists()
    # The fallback: that plate is z-scored against the DMSO of the other plate of its batch.
    proc = run_cli_here(*args, "--out", out, "--normalize", "batch")
    assert proc.returncode == 0, proc.stderr
    assert len(pd.read_parquet(out / "treatments.parquet")) == 44
    assert json.loads((out / "cache" / "manifest.json").read_text())["config"]["normalize"] == "batch"


def test_images_naming_the_models_channels_in_another_order_are_read_in_the_models_order(tiny_bundle, tiny_screen,
                                                                                        tmp_path):
    """Issue 29, item 7: the same screen, its channels listed Actin before Tubulin, is read by name in
    the model's order (one note says so) and gives the same probabilities as in the model's order."""
    from dataclasses import replace

    from cellmorph.data.layouts import load_table
    from cellmorph.predict import PredictConfig, predict

    table = load_table("bbbc021", tiny_screen, require_labels=False)
    shuffled = replace(table, channels=("DAPI", "Actin", "Tubulin"))
    notes = []
    config = PredictConfig(threads=1)
    predict(tiny_bundle, shuffled, tmp_path / "shuffled", config, progress=False, log=notes.append)
    predict(tiny_bundle, table, tmp_path / "ordered", config, progress=False)
    assert any("channels DAPI, Actin, Tubulin read as DAPI, Tubulin, Actin" in n for n in notes), notes
    shuffled_tiles = pd.read_parquet(tmp_path / "shuffled" / "tiles.parquet")
    ordered_tiles = pd.read_parquet(tmp_path / "ordered" / "tiles.parquet")
    probs = [c for c in ordered_tiles.columns if c.startswith("prob_")]
    np.testing.assert_array_equal(shuffled_tiles[probs].to_numpy(), ordered_tiles[probs].to_numpy())


def test_a_stacked_table_reads_its_channels_in_any_named_order(tmp_path):
    from cellmorph.data.crops import load_crop_table
    from cellmorph.data.images import read_planes
    from cellmorph.errors import BadInputError

    crop = np.stack([np.full((4, 4), v, np.uint16) for v in (10, 20, 30)], axis=-1)  # H×W×C, as stored
    np.save(tmp_path / "a.npy", crop)
    pd.DataFrame({"FileName": ["a.npy"], "Metadata_Plate": ["P1"], "Metadata_Well": ["B02"], "Metadata_Site": [1],
                  "Metadata_Compound": ["x"], "Metadata_Concentration": [1.0],
                  "Metadata_MoA": ["M"]}).to_csv(tmp_path / "index.csv", index=False)
    table = load_crop_table(tmp_path / "index.csv", channels=("DNA", "Actin", "Tubulin"))
    row = table.frame.iloc[0]
    assert read_planes(table, row)[:, 0, 0].tolist() == [10, 20, 30]
    again = table.in_channel_order(("Tubulin", "DNA", "Actin"))
    assert again.channels == ("Tubulin", "DNA", "Actin") and read_planes(again, row)[:, 0, 0].tolist() == [30, 10, 20]
    twice = again.in_channel_order(("Actin", "Tubulin", "DNA"))  # positions compose
    assert read_planes(twice, row)[:, 0, 0].tolist() == [20, 30, 10]
    with pytest.raises(BadInputError, match="the same names are needed"):
        table.in_channel_order(("DNA", "Actin", "GFP"))


def test_images_with_other_channels_or_no_screen_are_one_line(tiny_bundle, real_crops, tmp_path):
    out = tmp_path / "pred"
    one_line_error(run_cli_here("predict", "--model", tiny_bundle, "--layout", "crops", "--index", real_crops,
                           "--channels", "DAPI,Actin", "--out", out), "channels", str(real_crops))
    one_line_error(run_cli_here("predict", "--model", tiny_bundle, "--out", out), "--data", "--layout")
    one_line_error(run_cli_here("predict", "--model", tiny_bundle, "--layout", "bbbc021", "--root", out, "--moa",
                           real_crops, "--out", out), "--moa")
    assert not out.exists()


# --------------------------------------------------------------------------- MC dropout
@pytest.fixture(scope="module")
def dropout_bundle(tiny_cache, tmp_path_factory):
    from tests.conftest import QUICK_TRAIN

    out = tmp_path_factory.mktemp("dropout") / "model"
    proc = run_cli_here("train", "--data", tiny_cache, *QUICK_TRAIN, "--drop-rate", "0.5", "--calibration", "group-kfold:2",
                   "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


def test_mc_dropout_adds_mean_probabilities_and_predictive_entropy(dropout_bundle, tiny_cache, tmp_path):
    from cellmorph.predict import PredictConfig, predict

    runs = {}
    for name, config in {"plain": PredictConfig(threads=1), "mc": PredictConfig(threads=1, mc_dropout=8),
                         "again": PredictConfig(threads=1, mc_dropout=8),
                         "seed1": PredictConfig(threads=1, mc_dropout=8, seed=1)}.items():
        predict(dropout_bundle, tiny_cache, tmp_path / name, config, progress=False)
        runs[name] = {level: pd.read_parquet(tmp_path / name / f"{level}.parquet")
                      for level in ("tiles", "wells", "treatments")}
    for level, frame in runs["mc"].items():
        probs = [c for c in frame.columns if c.startswith("prob_")]
        mc = ["mc_" + c for c in probs]
        assert set(mc) <= set(frame.columns) and "MC_Entropy" in frame.columns, level
        # The calls and the calibrated sets stay those of the deterministic model.
        np.testing.assert_array_equal(frame[probs].to_numpy(), runs["plain"][level][probs].to_numpy())
        assert frame["Prediction_Set"].tolist() == runs["plain"][level]["Prediction_Set"].tolist()
        assert "MC_Entropy" not in runs["plain"][level].columns
        assert (frame["MC_Entropy"] >= 0).all() and (frame["MC_Entropy"] <= np.log(len(probs)) + 1e-9).all()
        # Seeded draws: the same seed repeats them, another seed gives other draws.
        np.testing.assert_array_equal(frame[mc].to_numpy(), runs["again"][level][mc].to_numpy())
        assert not np.allclose(frame[mc].to_numpy(), runs["seed1"][level][mc].to_numpy())
    tiles = runs["mc"]["tiles"]
    probs = [c for c in tiles.columns if c.startswith("prob_")]
    np.testing.assert_allclose(tiles[["mc_" + c for c in probs]].sum(axis=1), 1.0, atol=1e-5)
    assert not np.allclose(tiles[["mc_" + c for c in probs]].to_numpy(), tiles[probs].to_numpy())  # dropout was on


def test_mc_dropout_on_a_model_without_dropout_is_one_line(tiny_bundle, tiny_cache, tmp_path):
    one_line_error(run_cli_here("predict", "--model", tiny_bundle, "--data", tiny_cache, "--mc-dropout", "4",
                           "--out", tmp_path / "p"), "--mc-dropout", "--drop-rate")
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------- real cells
@pytest.mark.slow
def test_a_bundle_trained_on_real_crops_calls_held_out_wells_with_sets_at_their_level(real_crops, tmp_path):
    """crops-week4 (real BBBC021 MCF-7 crops, DMSO against cycloheximide). The model and its well-grouped
    calibration CV see only the wells of 4 plates; the 5 wells of the other 2 plates (400 crops) are
    predicted from their crop table, normalised against their own plates' DMSO.

    Criterion, per crop (the tile level): for α = 0.1 and 0.2 the share of the 400 held-out crops whose
    set holds the true class is at least 1 − α − 3·√(α(1−α)/400) (0.855 and 0.74); the sets are
    informative (mean size < 1.5 of 2 classes); every held-out well is called correctly. Measured on
    the reference machine: coverage 0.95 / 0.91, mean set size 1.14 / 1.04, crop accuracy 0.90."""
    from cellmorph.data.layouts import load_table
    from cellmorph.predict import PredictConfig, predict

    index = pd.read_csv(real_crops)
    index["FileName"] = [str(real_crops.parent / name) for name in index["FileName"]]
    held = index["Metadata_Plate"].isin(["Week4_27861", "Week4_27542"])
    index[~held].to_csv(tmp_path / "train.csv", index=False)
    index[held].to_csv(tmp_path / "held.csv", index=False)
    cache, model = tmp_path / "cache", tmp_path / "model"
    proc = run_cli_here("prepare", "--layout", "crops", "--index", tmp_path / "train.csv", "--out", cache, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli_here("train", "--data", cache, "--model", "mobilenetv2_100", "--init", "imagenet", "--image-size", "64",
                   "--include-controls", "--mode", "linear", "--epochs", "2", "--calibration", "well:2",
                   "--out", model, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    table = load_table("crops", index=tmp_path / "held.csv", require_labels=False)
    for alpha in (0.1, 0.2):
        out, notes = tmp_path / f"pred{alpha}", []
        summary = predict(model, table, out, PredictConfig(alpha=alpha), progress=False, log=notes.append)
        # well folds hold out wells of compounds trained on elsewhere: said, and recorded
        assert summary["calibration_compound_disjoint"] is False
        assert any("well:2 CV" in n and "not for new compounds" in n for n in notes), notes
        crops = pd.read_parquet(out / "tiles.parquet")
        wells = pd.read_parquet(out / "wells.parquet")
        assert len(crops) == 400 and len(wells) == 5
        covered = [moa in s.split("|") for moa, s in zip(crops["Metadata_MoA"], crops["Prediction_Set"])]
        assert np.mean(covered) >= 1 - alpha - 3 * np.sqrt(alpha * (1 - alpha) / 400), (alpha, np.mean(covered))
        assert crops["Set_Size"].mean() < 1.5, crops["Set_Size"].mean()
        assert (wells["Predicted_MoA"] == wells["Metadata_MoA"]).all()
        # DMSO and cycloheximide, labelled, both trained on (InTraining): no new compound to score apart
        assert {k: v for k, v in summary["compounds"].items() if k != "novelty"} == {
            "n_compounds": 2, "n_labelled": 2, "accuracy_labelled": 1.0, "n_new": 0}


def test_a_bundle_whose_recipe_this_version_cannot_read_is_one_line(tiny_bundle, new_screen, tmp_path):
    """A bundle from another cellmorph version (here: a recipe field this one does not know)."""
    other = edited_bundle(tiny_bundle, tmp_path / "model",
                          lambda m: m["preprocessing"]["config"].update(resize_arithmetic="uint8"), seal=True)
    one_line_error(run_cli_here("predict", "--model", other, "--layout", "bbbc021", "--root", new_screen,
                           "--out", tmp_path / "p", "--no-progress"), str(other), "recipe", "resize_arithmetic")
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------- a screen or model unlike the training's
@pytest.fixture(scope="module")
def whole_field_cache(tiny_screen, tmp_path_factory):
    """The tiny screen prepared with one tile per field (--tiles 1x1), where the model's cache has 2x2."""
    from cellmorph.data.bbbc021 import load_bbbc021
    from cellmorph.preprocess import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("whole") / "cache"
    prepare(load_bbbc021(tiny_screen, tiny_screen), out, PrepareConfig(tile_grid=(1, 1)), progress=False)
    return out


def test_a_cache_tiled_otherwise_than_the_models_is_one_line_naming_the_setting(tiny_bundle, whole_field_cache,
                                                                                tmp_path):
    out = tmp_path / "pred"
    one_line_error(run_cli_here("predict", "--model", tiny_bundle, "--data", whole_field_cache, "--out", out),
                   str(whole_field_cache), "tile_grid (--tiles) [1, 1] here, [2, 2] for the model")
    assert not out.exists()


def test_predict_with_a_model_that_calls_every_tile_alike_warns_of_nothing(tiny_bundle, tiny_cache, tmp_path):
    """A model whose classifier ignores the image (every well gets the same probabilities, whose map
    is degenerate) still predicts without a warning the user cannot act on; and summary.json is strict
    JSON (no bare NaN)."""
    import torch
    from safetensors.torch import load_file, save_file

    model = edited_bundle(tiny_bundle, tmp_path / "model")
    weights = load_file(str(model / "weights.safetensors"))
    weights["fc.weight"] = torch.zeros_like(weights["fc.weight"])
    weights["fc.bias"] = torch.linspace(0.0, 30.0, len(weights["fc.bias"]))
    save_file(weights, str(model / "weights.safetensors"))
    seal_bundle(model)
    out = tmp_path / "pred"
    proc = run_cli_here("predict", "--model", model, "--data", tiny_cache, "--out", out, "--threads", "1", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
    treatments = pd.read_parquet(out / "treatments.parquet")
    assert treatments["Predicted_MoA"].nunique() == 1

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    json.loads((out / "summary.json").read_text(), parse_constant=refuse)


def test_a_bundle_without_the_training_recipe_cannot_predict(tiny_bundle, tiny_cache, tmp_path):
    """A bundle saved without its training cache's recipe (save_bundle with preprocessing {}) loads,
    but predict says what it lacks instead of failing on a missing key."""
    model = edited_bundle(tiny_bundle, tmp_path / "model", lambda m: m.update(preprocessing={}), seal=True)
    out = tmp_path / "pred"
    one_line_error(run_cli_here("predict", "--model", model, "--data", tiny_cache, "--out", out),
                   str(model / "bundle.json"), "preprocessing.channels: missing")
    assert not out.exists()
