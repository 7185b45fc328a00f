"""Ensembles: members cross-validated on the same folds, averaged level by level; trained into one bundle
whose predictions are the mean of its members'."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from cellmorph.bundle import load_bundle, save_bundle
from cellmorph.cv import load_cv_config, run_cv
from cellmorph.cv.ensemble import member_dir
from cellmorph.cv.rundir import RunDir
from cellmorph.errors import CellmorphError
from cellmorph.predict import PredictConfig, predict
from tests.bundle_helpers import edited_bundle
from tests.conftest import QUICK_TRAIN, one_line_error, quick_config, run_cli_here

QUICK = quick_config(cv="group-kfold:2")


def _levels(run):
    return {"tiles": pd.read_parquet(run / "predictions.parquet"), "wells": pd.read_csv(run / "wells.csv"),
            "treatments": pd.read_csv(run / "treatments.csv")}


def test_members_share_the_folds_and_the_run_is_their_level_by_level_mean(tiny_cache, tmp_path):
    run = tmp_path / "ens"
    metrics = run_cv(tiny_cache, run, QUICK | {"ensemble": [{"seed": 1, "mode": "linear", "lr": 0.05}]},
                     progress=False)
    headers = [yaml.safe_load((member_dir(run, k) / "config.yaml").read_text()) for k in (1, 2)]
    folds = [[f["test_compounds"] for f in h["cv"]["folds"]] for h in headers]
    assert folds[0] == folds[1]  # seed 1 trains differently but holds out the same compounds
    assert [h["config"]["seed"] for h in headers] == [0, 1] and headers[1]["config"]["mode"] == "linear"
    assert make_folds_differ_by_seed(tiny_cache)  # which they would not do by chance
    members = [_levels(member_dir(run, k)) for k in (1, 2)]
    mean = _levels(run)
    for level, keys in (("tiles", ["Metadata_CacheRow"]), ("wells", ["Metadata_Plate", "Metadata_Well"]),
                        ("treatments", ["Metadata_Compound", "Metadata_Concentration"])):
        probs = [c for c in mean[level].columns if c.startswith("prob_")]
        frames = [m[level].sort_values(keys).reset_index(drop=True) for m in members]
        expected = np.mean([f[probs].to_numpy() for f in frames], axis=0)
        np.testing.assert_allclose(mean[level].sort_values(keys)[probs].to_numpy(), expected, rtol=1e-6, atol=1e-9)
    calls = mean["treatments"]
    probs = [c for c in calls.columns if c.startswith("prob_")]
    assert metrics["treatment_accuracy"] == pytest.approx(
        float(np.mean(np.array([p[5:] for p in probs])[calls[probs].to_numpy().argmax(1)] == calls["Metadata_MoA"])))
    assert [m["run"] for m in metrics["ensemble"]] == ["member-1", "member-2"]
    header = yaml.safe_load((run / "config.yaml").read_text())
    assert len(header["ensemble"]["members"]) == 2 and header["config"]["ensemble"][0]["seed"] == 1
    from cellmorph.report import write_report

    assert "Ensemble" in write_report(run, visualise=False).read_text()
    from cellmorph.visualize import run_networks

    with pytest.raises(CellmorphError, match="pass one of its members"):
        run_networks(run)
    # Finished: a second call is refused; --resume recomputes the mean from the finished members.
    with pytest.raises(CellmorphError, match="already holds a run"):
        run_cv(tiny_cache, run, QUICK | {"ensemble": [{"seed": 1}]}, progress=False)
    # A run of one network is never turned into an ensemble's run by a resume with an ensemble config.
    with pytest.raises(CellmorphError, match="holds a run of one network"):
        run_cv(tiny_cache, member_dir(run, 1), QUICK | {"ensemble": [{"seed": 1}]}, resume=True, progress=False)


def make_folds_differ_by_seed(cache) -> bool:
    from cellmorph.cache import TileCache
    from cellmorph.cv import make_folds

    index = TileCache(cache).index
    tests = [[sorted(set(index["Metadata_Compound"].iloc[f.test])) for f in make_folds(index, "group-kfold:2",
                                                                                        seed=s)[0]] for s in (0, 1)]
    return tests[0] != tests[1]


@pytest.mark.parametrize("member, message", [({"cv": "loco"}, "same for every member"),
                                             ({"seeed": 1}, "unknown field"),
                                             ({"epochs": 0}, "ensemble member 2")])
def test_members_that_cannot_share_a_run_are_refused_before_any_work(member, message):
    with pytest.raises(CellmorphError, match=message):
        load_cv_config(None, model="test_resnet", ensemble=[member]).members()


def test_cli_ensemble_options_build_the_member_list(tiny_cache, tmp_path):
    from cellmorph.cli.cv import ensemble_from_options

    assert ensemble_from_options(3, None, {"seed": 5}) == [{"seed": 6}, {"seed": 7}]
    assert ensemble_from_options(None, "a,b", {}) == [{"model": "a"}, {"model": "b"}]
    assert ensemble_from_options(2, "a", {}) == [{"seed": 1}, {"model": "a"}, {"model": "a", "seed": 1}]
    one_line_error(run_cli_here("cv", "--data", tiny_cache, "--model", "test_resnet", "--ensemble-models", " , ",
                           "--out", tmp_path / "r"), "--ensemble-models")


@pytest.fixture(scope="module")
def ensemble_bundle(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("ensemble") / "model"
    proc = run_cli_here("train", "--data", tiny_cache, *QUICK_TRAIN, "--calibration", "group-kfold:2", "--ensemble-seeds",
                   "2", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


def test_an_ensemble_bundle_predicts_the_mean_of_its_members(ensemble_bundle, tiny_cache, tmp_path):
    """Each member saved as a bundle of its own and predicted alone: the ensemble's probabilities, at every
    level, are the mean of theirs (before calibration: prob_ columns)."""
    bundle = load_bundle(ensemble_bundle)
    assert bundle.manifest["format"] == 2 and len(bundle.members) == 2
    assert bundle.manifest["training"]["calibration"]["cv"] == "group-kfold:2"
    assert (ensemble_bundle.parent / "model.cv" / "member-2" / "metrics.json").is_file()
    singles = []
    for k, member in enumerate(bundle.members, start=1):
        alone = tmp_path / f"member{k}"
        training = dict(bundle.manifest["training"]) | {"config": member.config}
        save_bundle(alone, member.weights, member.model_name, bundle.classes, member.input,
                    bundle.manifest["preprocessing"], training, bundle.calibration)
        predict(alone, tiny_cache, tmp_path / f"pred{k}", PredictConfig(threads=1), progress=False, log=lambda *a: None)
        singles.append(tmp_path / f"pred{k}")
    predict(ensemble_bundle, tiny_cache, tmp_path / "pred", PredictConfig(threads=1), progress=False, log=lambda *a: None)
    for level, keys in (("tiles", ["Metadata_CacheRow"]), ("wells", ["Metadata_Plate", "Metadata_Well"]),
                        ("treatments", ["Metadata_Compound", "Metadata_Concentration"])):
        mean = pd.read_parquet(tmp_path / "pred" / f"{level}.parquet").sort_values(keys)
        probs = [c for c in mean.columns if c.startswith("prob_")]
        parts = [pd.read_parquet(p / f"{level}.parquet").sort_values(keys)[probs].to_numpy() for p in singles]
        np.testing.assert_allclose(mean[probs].to_numpy(), np.mean(parts, axis=0), rtol=1e-6, atol=1e-9)
        assert not np.allclose(parts[0], parts[1])  # the members differ: a real ensemble


def test_an_edited_ensemble_bundle_is_refused_naming_the_member(ensemble_bundle, tmp_path):
    def drop_members(manifest):
        manifest.pop("members")

    with pytest.raises(CellmorphError, match="format 2 with 0 further member"):
        load_bundle(edited_bundle(ensemble_bundle, tmp_path / "a", drop_members, seal=True))

    def other_model(manifest):
        manifest["members"][0]["model"] = "resnet18"

    with pytest.raises(CellmorphError, match="member 2: model: weights-2.safetensors holds no resnet18"):
        load_bundle(edited_bundle(ensemble_bundle, tmp_path / "b", other_model, seal=True))
    damaged = tmp_path / "c"
    shutil.copytree(ensemble_bundle, damaged)
    with open(damaged / "weights-2.safetensors", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\0\0\0\0")
    with pytest.raises(CellmorphError, match="weights-2.safetensors: sha256 differs"):
        load_bundle(damaged)
    manifest = json.loads((ensemble_bundle / "bundle.json").read_text())
    assert manifest["members"][0]["weights"] == "weights-2.safetensors"


def test_a_pretrained_crop_fine_tune_defaults_to_two_seeds_and_a_probe_and_one_can_be_asked_for():
    from cellmorph.cli.cv import ensemble_from_options
    from cellmorph.cv.config import with_layout_defaults

    crops = with_layout_defaults(load_cv_config(None, model="tf_efficientnet_lite0", seed=3, epochs=5), "crops")
    members = crops.members()
    assert crops.ensemble == [{"seed": 4}, {"mode": "linear-probe"}] and [m.seed for m in members] == [3, 4, 3]
    assert all(m.freeze_stages == 4 and m.image_size == 128 and m.epochs == 5 and not m.ensemble for m in members[:2])
    # the probe takes none of the fine-tune's training fields, and its own crop defaults once its run applies them
    probe = with_layout_defaults(members[2], "crops")
    assert (probe.mode, probe.freeze_stages, probe.epochs, probe.frozen_feature_cache) == ("linear-probe", 0, None, False)
    assert (probe.probe_head, probe.aggregate, probe.features.describe(), probe.image_size) == \
        ("centroid", "logmean", "stage3+stage4/mean", 128)
    # the options name exactly the members: two seeds alone, or with the probe (the default again)
    assert ensemble_from_options(2, None, {"seed": 3}) == [{"seed": 4}]
    assert ensemble_from_options(2, None, {"seed": 3}, probe=True) == crops.ensemble
    assert ensemble_from_options(None, None, {}, probe=True) == [{"mode": "linear-probe"}]
    with pytest.raises(CellmorphError, match="--mode linear-probe is one"):
        ensemble_from_options(None, None, {"mode": "linear-probe"}, probe=True)
    # a member is no ensemble again when the layout's defaults are applied to it (as each run does)
    assert not with_layout_defaults(members[1], "crops").ensemble
    one = load_cv_config(None, model="tf_efficientnet_lite0", ensemble=ensemble_from_options(1, None, {}))
    assert with_layout_defaults(one, "crops").members() == [with_layout_defaults(one, "crops")]
    for other in (with_layout_defaults(load_cv_config(None, model="tf_efficientnet_lite0"), "bbbc021"),
                  with_layout_defaults(load_cv_config(None, model="test_resnet", init="xavier"), "crops"),
                  with_layout_defaults(load_cv_config(None, mode="linear-probe"), "crops")):
        assert not other.ensemble


def test_a_fine_tune_and_a_linear_probe_make_one_bundle_that_predicts_their_mean(tiny_cache, tmp_path):
    """A mixed ensemble (the crop default's kind): `train --ensemble-probe` cross-validates both members on the
    same folds, calibrates on their mean, and bundles the network and the probe (backbone and head), which
    `predict` runs together."""
    out = tmp_path / "model"
    proc = run_cli_here("train", "--data", tiny_cache, *QUICK_TRAIN, "--ensemble-probe", "--calibration", "group-kfold:2",
                   "--out", out)
    assert proc.returncode == 0, proc.stderr
    bundle = load_bundle(out)
    assert bundle.manifest["format"] == 3 and [bool(m.probe) for m in bundle.members] == [False, True]
    assert bundle.manifest["members"][0]["probe"]["head_weights"] == "head-2.safetensors"
    run = tmp_path / "model.cv"
    assert [RunDir(member_dir(run, k)).read_config()["config"]["mode"] for k in (1, 2)] == ["finetune", "linear-probe"]
    calibration = pd.read_parquet(out / "calibration_treatments.parquet")
    mean = RunDir(run).read_levels()["treatments"]
    probs = [c for c in mean.columns if c.startswith("prob_")]
    np.testing.assert_allclose(calibration[probs].to_numpy(), mean[probs].to_numpy())
    summary = predict(out, tiny_cache, tmp_path / "pred", PredictConfig(threads=1), progress=False,
                      log=lambda *a: None)
    assert summary["n_treatments"] == 44 and 0 <= summary["treatment_accuracy"] <= 1
