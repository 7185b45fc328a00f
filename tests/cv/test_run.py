"""End-to-end ``run_cv`` on the real crop fixture (DMSO vs cycloheximide, week 4)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cellmorph.errors import CellmorphError
from cellmorph.cv import CVConfig, run_cv, validate_config

SMALL = dict(
    model="test_resnet",
    init="xavier",
    image_size=32,
    epochs=2,
    batch_size=16,
    cv="well:3",
    include_controls_as_class=True,
    max_tiles_per_fold=96,
    seed=7,
    num_threads=1,  # robust on a shared 2-core machine (OpenMP spin-waits under oversubscription)
    keep_checkpoints="all",  # these tests compare fold weights
)
CLASSES = ["DMSO", "Protein synthesis"]
OUTPUTS = [
    "config.yaml",
    "predictions.parquet",
    "treatments.csv",
    "compounds.csv",
    "wells.csv",
    "metrics.json",
    "confusion_matrix.png",
    "learning_curves.png",
    "classification_report.txt",
]


@pytest.fixture(scope="module")
def crop_cache(real_crops, tmp_path_factory):
    from cellmorph.data.crops import load_crop_table
    from cellmorph.preprocess import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("cropcache") / "cache"
    prepare(load_crop_table(real_crops), out, PrepareConfig(tile_grid=(1, 1)), progress=False)
    return out


@pytest.fixture(scope="module")
def first_run(crop_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    metrics = run_cv(crop_cache, out, SMALL, progress=False)
    return out, metrics


def test_run_cv_writes_every_output(first_run, crop_cache):
    out, metrics = first_run
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.rglob(".*.tmp")), "temporary files left behind"
    # Shared as any new file under the umask (atomic writes and fold staging start owner-only).
    from cellmorph.runinfo import process_umask

    umask = process_umask()
    for path in [out, *out.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == want, (path, oct(path.stat().st_mode))
    for key, name in (("treatment_accuracy", "treatments.csv"), ("well_accuracy", "wells.csv")):
        called = pd.read_csv(out / name)  # the accuracy is that of the written calls
        assert metrics[key] == (called["Predicted_MoA"] == called["Metadata_MoA"]).mean(), key
    scored = pd.read_parquet(out / "predictions.parquet")  # tiles: argmax of the written probabilities
    argmax = np.array(CLASSES)[scored[[f"prob_{c}" for c in CLASSES]].to_numpy().argmax(axis=1)]
    assert metrics["tile_accuracy"] == (argmax == scored["Metadata_MoA"].to_numpy()).mean()
    assert metrics["n_folds"] == 3 and metrics["n_treatments"] == 4  # DMSO + cycloheximide at 5/15/50 µM
    assert json.loads((out / "metrics.json").read_text())["n_treatments"] == 4

    tiles = pd.read_parquet(out / "predictions.parquet")
    assert len(tiles) == 1120  # every crop is tested exactly once
    assert tiles["Metadata_CacheRow"].is_unique
    probs = [f"prob_{c}" for c in CLASSES]
    for col in ["Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_Concentration", "Metadata_MoA", "Metadata_Fold", *probs]:
        assert col in tiles.columns, col
    assert np.allclose(tiles[probs].sum(axis=1), 1.0, atol=1e-5)
    assert sorted(tiles["Metadata_Fold"].unique()) == [0, 1, 2]
    # A well is never split across folds.
    assert (tiles.groupby(["Metadata_Plate", "Metadata_Well"])["Metadata_Fold"].nunique() == 1).all()

    treatments = pd.read_csv(out / "treatments.csv")
    for col in ["Metadata_Compound", "Metadata_Concentration", "Metadata_MoA", "Predicted_MoA", "Correct", *probs]:
        assert col in treatments.columns, col
    assert len(pd.read_csv(out / "wells.csv")) == 14
    assert "Treatment level" in (out / "classification_report.txt").read_text()
    compounds = pd.read_csv(out / "compounds.csv")  # DMSO and cycloheximide (BBBC021 spells it cyclohexamide)
    assert sorted(compounds["Metadata_Compound"]) == ["DMSO", "cyclohexamide"] and compounds["n_treatments"].sum() == 4
    assert metrics["n_compounds"] == 2
    assert metrics["compound_accuracy"] == (compounds["Predicted_MoA"] == compounds["Metadata_MoA"]).mean()

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["config"]["lr"] == pytest.approx(0.01) and config["config"]["epochs"] == 2
    assert config["seeds"]["seed"] == 7 and set(config["seeds"]["folds"]) == {"0", "1", "2"}
    assert config["provenance"]["packages"]["torch"]
    assert "git_commit" in config["provenance"]

    # The fold checkpoint is plain tensors/dicts and can seed a new model.
    state = torch.load(out / "folds" / "0" / "state.pt", weights_only=True)
    assert state["classes"] == CLASSES and state["model_name"] == "test_resnet"
    from cellmorph.models import create_model

    model = create_model("test_resnet", 2, init=str(out / "folds" / "0" / "state.pt"))
    assert torch.equal(model.state_dict()["fc.weight"], state["model"]["fc.weight"])


def test_identical_runs_and_resume_give_identical_predictions(first_run, crop_cache, tmp_path):
    out_a, metrics_a = first_run
    out_b = tmp_path / "b"
    metrics_b = run_cv(crop_cache, out_b, SMALL, progress=False)
    a = pd.read_parquet(out_a / "predictions.parquet")
    pd.testing.assert_frame_equal(a, pd.read_parquet(out_b / "predictions.parquet"))
    assert metrics_a["tile_accuracy"] == metrics_b["tile_accuracy"]

    # Simulate a kill during the last fold: its outputs and the run's summary never got written.
    shutil.rmtree(out_b / "folds" / "2")
    for name in OUTPUTS[1:]:
        (out_b / name).unlink()
    (out_b / "folds" / "1" / "fold.json").unlink()  # killed after writing predictions, before the marker
    (out_b / "folds" / "1" / ".state.pt.abc123.tmp").write_bytes(b"half")  # an interrupted atomic write
    finished = (out_b / "folds" / "0" / "state.pt").stat().st_mtime_ns
    with pytest.raises(CellmorphError, match="already holds a run"):
        run_cv(crop_cache, out_b, SMALL, progress=False)
    with pytest.raises(CellmorphError, match="epochs"):
        run_cv(crop_cache, out_b, dict(SMALL, epochs=3), resume=True, progress=False)
    # Options left at their defaults do not enter the fingerprint: naming one (as a run written
    # before that option existed would not) still resumes.
    metrics_r = run_cv(crop_cache, out_b, dict(SMALL, num_workers=0, tta="none"), resume=True, progress=False)
    assert (out_b / "folds" / "0" / "state.pt").stat().st_mtime_ns == finished  # fold 0 was not retrained
    pd.testing.assert_frame_equal(a, pd.read_parquet(out_b / "predictions.parquet"))
    assert {k: metrics_r[k] for k in ("treatment_accuracy", "well_accuracy", "tile_accuracy")} == {
        k: metrics_a[k] for k in ("treatment_accuracy", "well_accuracy", "tile_accuracy")
    }
    for name in OUTPUTS:
        assert (out_b / name).is_file(), name
    assert not list(out_b.rglob(".*")), "temporaries left behind"
    assert metrics_b["resumed_folds"] == [] and metrics_r["resumed_folds"] == [0]
    fold0 = json.loads((out_b / "folds" / "0" / "fold.json").read_text())["seconds"]
    assert metrics_r["fold_seconds_total"] > fold0 > 0  # the resumed fold's time is counted


def test_training_learns_dmso_vs_cycloheximide(crop_cache, tmp_path):
    """Well holdout on all 1,120 crops: tile accuracy clearly above chance (0.5 balanced, 0.57 majority).

    Measured: tile 0.90, well 1.00, treatment 1.00 (test_resnet, 32 px, 3 epochs, xavier, ~1 s/epoch).
    """
    cfg = dict(SMALL, epochs=3, batch_size=32, max_tiles_per_fold=None, seed=0)
    metrics = run_cv(crop_cache, tmp_path / "learn", cfg, progress=False)
    assert metrics["tile_accuracy"] >= 0.75, metrics
    assert metrics["well_accuracy"] >= 0.85, metrics


def test_bad_configs_fail_early_with_one_line(crop_cache, tmp_path):
    out = tmp_path / "bad"
    cases = [
        (dict(SMALL, model="resnet_5000"), "unknown model"),
        # One treated compound, its MoA's only one: no compound scheme can hold it out and learn it
        # (the rule itself is tested in cv/test_splits.py); strict folds it anyway and fails as before.
        (dict(SMALL, cv="group-kfold:3"), r"every treated compound is the only one of its MoA \(cyclohexamide\)"),
        (dict(SMALL, cv="loco"), r"cv loco: every treated compound is the only one of its MoA.*\(cv well:K\)"),
        (dict(SMALL, cv="nscb"), "cyclohexamide"),
        (dict(SMALL, cv="group-kfold:3", strict=True), "3 folds but only 1 compounds"),
        (dict(SMALL, cv="loco", strict=True), r"fold 0 \(cyclohexamide\) leaves no tiles to train on"),
        (dict(SMALL, include_controls_as_class=False), "at least 2 classes"),
        (dict(SMALL, cv="kfold"), r"cv 'kfold': expected loco, nscb, group-kfold:K, well\[:K\]"),
        (dict(SMALL, learning_rate=0.1), "learning_rate"),
        (dict(SMALL, init="/nonexistent/ckpt.pt"), "init"),
        (dict(SMALL, init="xavier", freeze_stages=1), "random: use freeze_stages 0 with xavier"),
        (dict(SMALL, mode="linear-probe", head_init="probe"), "linear-probe is the probe itself"),
        (dict(SMALL, tta="rotate"), "tta"),
    ]
    for config, message in cases:
        with pytest.raises(CellmorphError, match=message):
            run_cv(crop_cache, out, config, progress=False)
        assert not out.exists(), config
    with pytest.raises(CellmorphError, match="not a complete cellmorph cache"):
        run_cv(tmp_path, out, SMALL, progress=False)


def test_config_defaults_and_yaml(tmp_path):
    paper = CVConfig().resolved()
    assert (paper.model, paper.init, paper.cv) == ("resnet50", "imagenet", "loco")
    assert (paper.epochs, paper.batch_size, paper.lr, paper.momentum) == (10, 8, 1e-4, 0.9)
    small = CVConfig(model="mobilenetv2_100").resolved()
    assert (small.batch_size, small.lr) == (32, 1e-2)
    assert CVConfig(model="resnet50", init="xavier").resolved().lr == pytest.approx(1e-3)
    assert CVConfig(model="resnet18", init="xavier").resolved().lr == pytest.approx(1e-2)
    path = tmp_path / "cv.yaml"
    path.write_text("model: resnet18\nepochs: 3\ncv: group-kfold:4\naugment:\n  noise_p: 0.0\n")
    cfg = CVConfig.from_yaml(path, epochs=5)
    assert (cfg.model, cfg.epochs, cfg.cv, cfg.augment.noise_p) == ("resnet18", 5, "group-kfold:4", 0.0)
    assert validate_config(str(path)).epochs == 3
    from cellmorph.cv import load_cv_config

    assert load_cv_config(path, model="resnet50", cv=None).model == "resnet50"
    assert load_cv_config(None, model="resnet18", epochs=None).epochs is None
    from cellmorph.cv.config import RUNTIME_FIELDS
    from cellmorph.cv.rundir import compute_fields

    fields = compute_fields(CVConfig(model="resnet18", epochs=3, augment={"noise_p": 0.0}), RUNTIME_FIELDS)
    assert fields == {"model": "resnet18", "epochs": 3, "augment": {"noise_p": 0.0}}
    plain = CVConfig(model="resnet18", tta="none", seed=0, num_threads=2, keep_checkpoints="all")
    assert compute_fields(plain, RUNTIME_FIELDS) == {"model": "resnet18"}
    path.write_text("model: resnet18\naugment:\n  noize: 1\n")
    with pytest.raises(CellmorphError, match="augment.noize"):
        CVConfig.from_yaml(path)


def test_eval_epochs_score_midway_without_changing_the_final_model(first_run, crop_cache, tmp_path):
    out_a, metrics_a = first_run  # SMALL: 2 epochs, no interim scoring
    out = tmp_path / "interim"
    metrics = run_cv(crop_cache, out, dict(SMALL, eval_epochs=[1]), progress=False)
    # Scoring after epoch 1 draws no random numbers: the 2-epoch predictions are unchanged.
    pd.testing.assert_frame_equal(pd.read_parquet(out_a / "predictions.parquet"),
                                  pd.read_parquet(out / "predictions.parquet"))
    assert set(metrics["by_epoch"]) == {"1", "2"}
    assert metrics["by_epoch"]["2"]["tile_accuracy"] == metrics_a["tile_accuracy"]
    for fold in ("0", "1", "2"):
        interim = pd.read_parquet(out / "folds" / fold / "predictions_epoch1.parquet")
        final = pd.read_parquet(out / "folds" / fold / "predictions.parquet")
        assert interim["Metadata_CacheRow"].tolist() == final["Metadata_CacheRow"].tolist()
        assert not np.allclose(interim.filter(like="prob_").to_numpy(), final.filter(like="prob_").to_numpy())
    with pytest.raises(CellmorphError, match=r"eval_epochs \[5\] exceed epochs=2"):
        run_cv(crop_cache, tmp_path / "late", dict(SMALL, eval_epochs=[5]), progress=False)


def test_tta_changes_the_scores_not_the_trained_models(first_run, crop_cache, tmp_path):
    out_a, _ = first_run
    out = tmp_path / "tta"
    run_cv(crop_cache, out, dict(SMALL, tta="dihedral"), progress=False)
    for fold in ("0", "1", "2"):
        a = torch.load(out_a / "folds" / fold / "state.pt", weights_only=True)["model"]
        b = torch.load(out / "folds" / fold / "state.pt", weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    plain = pd.read_parquet(out_a / "predictions.parquet")
    tta = pd.read_parquet(out / "predictions.parquet")
    assert plain["Metadata_CacheRow"].tolist() == tta["Metadata_CacheRow"].tolist()
    assert not np.allclose(plain.filter(like="prob_").to_numpy(), tta.filter(like="prob_").to_numpy())
    assert yaml.safe_load((out / "config.yaml").read_text())["config"]["tta"] == "dihedral"


def test_replicates_differ_only_in_seed_and_are_summarised(first_run, crop_cache, tmp_path):
    from cellmorph.cv import run_replicates

    out_a, metrics_a = first_run
    out = tmp_path / "reps"
    summary = run_replicates(crop_cache, out, SMALL, replicates=2, progress=False)
    # Replicate 0 is the plain run (seed 7); replicate 1 uses seed 8.
    pd.testing.assert_frame_equal(pd.read_parquet(out_a / "predictions.parquet"),
                                  pd.read_parquet(out / "replicate-0" / "predictions.parquet"))
    assert yaml_seed(out / "replicate-1") == 8
    table = pd.read_csv(out / "replicates.csv")
    assert table["seed"].tolist() == [7, 8] and table["epoch"].tolist() == [2, 2]
    assert summary["tile_accuracy"] == pytest.approx(table["tile_accuracy"].mean())
    assert summary["tile_accuracy_std"] == pytest.approx(table["tile_accuracy"].std(ddof=1))
    assert json.loads((out / "metrics.json").read_text())["n_replicates"] == 2
    with pytest.raises(CellmorphError, match="already holds a run"):
        run_replicates(crop_cache, out, SMALL, replicates=2, progress=False)
    again = run_replicates(crop_cache, out, SMALL, replicates=2, resume=True, progress=False)
    assert again["tile_accuracy"] == summary["tile_accuracy"]


def yaml_seed(run_dir) -> int:
    return yaml.safe_load((run_dir / "config.yaml").read_text())["seeds"]["seed"]


@pytest.mark.slow
def test_frozen_feature_cache_matches_on_the_fly_training_and_resumes(first_run, crop_cache, tmp_path):
    """Frozen stages computed once per run train the same models as frozen stages run every step."""
    checkpoint = first_run[0] / "folds" / "0" / "state.pt"  # frozen stages need non-random weights
    # one network (a pretrained crop fine-tune is otherwise two seeds): its fold states are compared
    base = dict(SMALL, init=str(checkpoint), freeze_stages=2, augment={"enabled": False}, ensemble=[])
    run_cv(crop_cache, tmp_path / "plain", base, progress=False)
    run_cv(crop_cache, tmp_path / "cached", dict(base, frozen_feature_cache=True), progress=False)
    plain = pd.read_parquet(tmp_path / "plain" / "predictions.parquet")
    cached = pd.read_parquet(tmp_path / "cached" / "predictions.parquet")
    # Without augmentation every copy is the plain tile: the same models, bit for bit.
    pd.testing.assert_frame_equal(plain, cached)
    for fold in ("0", "1", "2"):
        a = torch.load(tmp_path / "plain" / "folds" / fold / "state.pt", weights_only=True)["model"]
        b = torch.load(tmp_path / "cached" / "folds" / fold / "state.pt", weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), fold
    assert not list((tmp_path / "cached").glob("frozen_features*")), "the feature pool outlived the run"

    # With augmentation: a killed run resumes to the uninterrupted result.
    augmented = dict(base, augment={}, frozen_feature_cache=True)
    whole = tmp_path / "whole"
    run_cv(crop_cache, whole, augmented, progress=False)
    killed = tmp_path / "killed"
    shutil.copytree(whole, killed)  # the same run, then killed while fold 2 trained: its folder and outputs gone
    shutil.rmtree(killed / "folds" / "2")
    for name in OUTPUTS[1:]:
        (killed / name).unlink()
    run_cv(crop_cache, killed, augmented, resume=True, progress=False)
    pd.testing.assert_frame_equal(pd.read_parquet(whole / "predictions.parquet"),
                                  pd.read_parquet(killed / "predictions.parquet"))
    unaugmented = pd.read_parquet(tmp_path / "cached" / "predictions.parquet")
    assert not np.allclose(unaugmented.filter(like="prob_").to_numpy(),
                           pd.read_parquet(whole / "predictions.parquet").filter(like="prob_").to_numpy())

    with pytest.raises(CellmorphError, match="frozen_feature_cache needs mode finetune with freeze_stages > 0"):
        run_cv(crop_cache, tmp_path / "bad", dict(SMALL, frozen_feature_cache=True), progress=False)


def test_crop_caches_default_to_the_crop_recipe_and_given_values_win(crop_cache):
    """Crop tables (the cache's source says so) default to 128 px, and a pretrained fine-tune to the
    recipe that led on real crops (4 frozen stages computed once, dihedral TTA); the linear probe to
    mean-pooled stages 3 and 4 averaged over the dihedral views. Whatever a config gives is kept."""
    from cellmorph.cv.run import plan_run

    common = dict(model="tf_efficientnet_lite0", init="imagenet", epochs=1, cv="well:3",
                  include_controls_as_class=True, num_threads=1)
    cfg = plan_run(crop_cache, common).config
    assert (cfg.image_size, cfg.freeze_stages, cfg.frozen_feature_cache, cfg.tta) == (128, 4, True, "dihedral")
    given = plan_run(crop_cache, dict(common, freeze_stages=1, tta="none", image_size=64)).config
    assert (given.image_size, given.freeze_stages, given.frozen_feature_cache, given.tta) == (64, 1, True, "none")
    unfrozen = plan_run(crop_cache, dict(common, freeze_stages=0)).config  # nothing frozen: nothing to cache
    assert (unfrozen.freeze_stages, unfrozen.frozen_feature_cache, unfrozen.tta) == (0, False, "dihedral")
    probe = plan_run(crop_cache, dict(common, mode="linear-probe")).config
    assert (probe.image_size, probe.features.describe(), probe.tta, probe.freeze_stages) == (
        128, "stage3+stage4/mean", "dihedral", 0)
    plain_probe = plan_run(crop_cache, dict(common, mode="linear-probe", tta="none", features="stage3")).config
    assert (plain_probe.tta, plain_probe.features.describe()) == ("none", "stage3/mean")
    scratch = plan_run(crop_cache, dict(common, init="xavier")).config  # frozen random filters do not learn
    assert (scratch.image_size, scratch.freeze_stages, scratch.tta) == (128, 0, "none")


def test_gradual_unfreezing_works_with_the_frozen_feature_cache(first_run, crop_cache, tmp_path):
    """unfreeze_every on top of frozen stages computed once: the same models as with the stages run every
    step, and stages not yet opened (layer2, layer3 after 2 epochs at 1 stage per epoch) keep their start."""
    checkpoint = first_run[0] / "folds" / "0" / "state.pt"
    base = dict(SMALL, init=str(checkpoint), freeze_stages=2, unfreeze_every=1, augment={"enabled": False},
                ensemble=[])  # one network: its fold states are compared
    run_cv(crop_cache, tmp_path / "plain", base, progress=False)
    run_cv(crop_cache, tmp_path / "cached", dict(base, frozen_feature_cache=True), progress=False)
    start = torch.load(checkpoint, weights_only=True)["model"]
    for fold in ("0", "1", "2"):
        a = torch.load(tmp_path / "plain" / "folds" / fold / "state.pt", weights_only=True)["model"]
        b = torch.load(tmp_path / "cached" / "folds" / fold / "state.pt", weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), fold
        for key in a:
            if key.startswith(("conv1", "bn1", "layer1", "layer2", "layer3")):
                assert torch.equal(a[key], start[key]), (fold, key)
        assert any(not torch.equal(a[k], start[k]) for k in a if k.startswith("layer4")), fold
