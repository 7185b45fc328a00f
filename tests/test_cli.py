"""The command-line contracts that outside checks call exactly, on tiny synthetic caches."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import one_line_error, quick_args, run_cli, run_cli_here

# A CV run of seconds: a tiny network from scratch on 32-px tiles of the tiny screen.
QUICK_CV = quick_args(epochs=2, cv="group-kfold:2")


@pytest.mark.slow
def test_cv_linear_probe_loco_writes_the_run_directory(tiny_cache, tmp_path):
    run = tmp_path / "run"
    # A fixed C: the nested choice (the default) is the same code under any split, and costs a second a fold
    # here; tests/cv/test_probe.py checks it chooses from the training compounds only.
    proc = run_cli_here("cv", "--data", str(tiny_cache), "--model", "tf_efficientnet_lite0", "--init", "imagenet",
                        "--cv", "loco", "--mode", "linear-probe", "--probe-c", "0.1", "--image-size", "64",
                        "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("treatment_accuracy", "well_accuracy", "tile_accuracy", "n_treatments", "n_folds"):
        assert key in metrics
    assert metrics["n_folds"] == 24 and metrics["n_treatments"] == 44
    called = pd.read_csv(run / "treatments.csv")  # the accuracy is that of the written calls
    assert metrics["treatment_accuracy"] == (called["Predicted_MoA"] == called["Metadata_MoA"]).mean()
    # Embeddings were computed once for the whole run, not per fold.
    assert json.loads((run / "embeddings.json").read_text())["rows"] == 352
    # ... with a line of progress in a batch log (stderr is not a terminal here), not minutes of silence
    assert re.search(r"embedding tiles \(tf_efficientnet_lite0\) 352/352; elapsed", proc.stderr), proc.stderr
    assert "PydanticSerializationUnexpectedValue" not in proc.stderr
    predictions = pd.read_parquet(run / "predictions.parquet")
    probs = [c for c in predictions.columns if c.startswith("prob_")]
    assert len(probs) == 12
    np.testing.assert_allclose(predictions[probs].sum(axis=1), 1.0, rtol=1e-5)
    # LOCO: each fold held out exactly one compound, every compound was held out once, and the
    # fold trained on the rest (the no-leak rule itself is tested in cv/test_splits.py).
    folds = [json.loads(p.read_text()) for p in (run / "folds").glob("*/fold.json")]
    assert all(len(f["test_compounds"]) == 1 and f["n_train_used"] > 0 for f in folds)
    assert sorted(f["test_compounds"][0] for f in folds) == sorted(predictions["Metadata_Compound"].unique())
    assert (predictions.groupby("Metadata_Compound")["Metadata_Fold"].nunique() == 1).all()
    treatments = pd.read_csv(run / "treatments.csv")
    assert {"Metadata_Compound", "Metadata_Concentration", "Metadata_MoA", "Predicted_MoA"} <= set(treatments.columns)
    config = (run / "config.yaml").read_text()
    assert "git_commit" in config and "seed" in config and "torch" in config and "probe_c: 0.1" in config
    assert (run / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_cv_unknown_model_is_one_line(tiny_cache, tmp_path):
    line = one_line_error(run_cli_here("cv", "--data", str(tiny_cache), "--model", "resnet5O", "--out", str(tmp_path / "r")))
    assert "resnet5O" in line
    assert not (tmp_path / "r").exists()


def test_cv_empty_fold_is_one_line(tiny_cache, tmp_path):
    line = one_line_error(run_cli_here("cv", "--data", str(tiny_cache), "--model", "tf_efficientnet_lite0",
                                  "--cv", "group-kfold:99", "--out", str(tmp_path / "r")))
    assert "cv group-kfold:99: 99 folds but only 24 compounds; fold(s) would be empty" in line  # tiny: 24 treated
    assert not (tmp_path / "r").exists()


def test_cv_missing_cache_is_one_line(tmp_path):
    line = one_line_error(run_cli_here("cv", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")))
    assert "nope" in line


@pytest.fixture(scope="module")
def crops_cache(real_crops, tmp_path_factory):
    out = tmp_path_factory.mktemp("crops") / "cache"
    proc = run_cli("prepare", "--layout", "crops", "--index", str(real_crops), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
def test_embed_and_linear_probe_on_real_crops(crops_cache, tmp_path):
    """Issue 5: embeddings and the linear probe on the real crops-week4 fixture (well holdout), in this process
    (the subprocess contract is checked by the other tests; four torch imports cost 15 s here)."""
    # 32 px throughout: the real cells still separate (tile 0.88 against 0.90 at 48 px), at half the time of 64 px
    emb = run_cli_here("embed", "--data", str(crops_cache), "--model", "mobilenetv2_100", "--image-size", "32",
                  "--out", str(tmp_path / "emb"))
    assert emb.returncode == 0, emb.stderr
    wells = pd.read_parquet(tmp_path / "emb" / "wells.parquet")
    assert len(wells) == 14 and wells["Metadata_NTiles"].sum() == 1120
    recorded = json.loads((tmp_path / "emb" / "embed.json").read_text())
    assert (recorded["tta"], recorded["features"]["name"]) == ("dihedral", "stage3+stage4/mean")  # crops defaults
    run = tmp_path / "run"
    proc = run_cli_here("cv", "--data", str(crops_cache), "--model", "mobilenetv2_100", "--mode", "linear-probe",
                   "--cv", "well:3", "--include-controls", "--image-size", "32", "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["classes"]) == {"DMSO", "Protein synthesis"}
    # Real cells: frozen ImageNet features separate cycloheximide from DMSO well above chance (0.57).
    assert metrics["tile_accuracy"] > 0.75, metrics
    assert metrics["well_accuracy"] > 0.8, metrics
    marker = json.loads((run / "embeddings.json").read_text())
    assert (marker["tta"], marker["features"]["name"], marker["dim"]) == ("dihedral", "stage3+stage4/mean", 96 + 320)
    # The same probe on an intermediate stage: recorded in the run, in its embeddings, and as good.
    staged = tmp_path / "staged"
    proc = run_cli_here("cv", "--data", str(crops_cache), "--model", "mobilenetv2_100", "--mode", "linear-probe",
                   "--cv", "well:3", "--include-controls", "--image-size", "32", "--features", "stage3/mean+max",
                   "--tta", "none", "--out", str(staged))
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load((staged / "config.yaml").read_text())["config"]["features"] == {
        "layers": [3], "pool": ["mean", "max"]}
    marker = json.loads((staged / "embeddings.json").read_text())
    assert marker["features"]["name"] == "stage3/mean+max" and marker["dim"] == 2 * 96  # mobilenetv2 stage 3: 96 channels
    assert "tta" not in marker
    assert json.loads((staged / "metrics.json").read_text())["tile_accuracy"] > 0.75
    emb = run_cli_here("embed", "--data", str(crops_cache), "--model", "mobilenetv2_100", "--image-size", "64",
                  "--features", "stage9", "--out", str(tmp_path / "bad"))
    one_line_error(emb, "stage9", "mobilenetv2_100 has stages 0–4")


@pytest.mark.slow
def test_demo_writes_the_run_directory(tmp_path):
    """`make demo`'s command end to end (synth tiny → prepare → cv), shrunk to seconds."""
    run = tmp_path / "demo"
    proc = run_cli_here("demo", "--out", str(run), "--epochs", "1", "--image-size", "32", "--cv", "group-kfold:2")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = json.loads((run / "metrics.json").read_text())
    assert summary == {k: metrics[k] for k in summary}
    assert metrics["n_folds"] == 2 and metrics["n_treatments"] == 44
    assert (run / "confusion_matrix.png").is_file() and (run / "treatments.csv").is_file()
    config = yaml.safe_load((run / "config.yaml").read_text())["config"]
    assert (config["model"], config["init"], config["freeze_stages"], config["tta"]) == (
        "tf_efficientnet_lite0", "imagenet", 4, "dihedral")
    assert config["frozen_feature_cache"] is True
    assert not list(run.glob("frozen_features*"))  # the run finished, so its feature pool is gone
    assert (tmp_path / "demo-data" / "screen" / "BBBC021_v1_image.csv").is_file()
    # The linear probe ran first on the same folds, beside it, with its own report; both figures are summed up.
    probe = json.loads((tmp_path / "demo-probe" / "metrics.json").read_text())
    assert probe["n_folds"] == 2 and probe["n_treatments"] == 44 and (tmp_path / "demo-probe" / "report.html").is_file()
    assert yaml.safe_load((tmp_path / "demo-probe" / "config.yaml").read_text())["config"]["mode"] == "linear-probe"
    assert config["lr_schedule"] == "cosine"
    summary_line = " ".join(proc.stderr.split())
    assert f"linear probe {probe['treatment_accuracy']:.3f}" in summary_line
    assert f"fine-tune {metrics['treatment_accuracy']:.3f}" in summary_line


@pytest.mark.slow
def test_cv_in_a_batch_log_prints_one_line_per_fold_and_epoch_and_refuses_a_rerun(tiny_cache, tmp_path):
    """Not a terminal: plain lines with elapsed time and time left; a second run names --resume."""
    run = tmp_path / "run"
    proc = run_cli_here("cv", "--data", tiny_cache, *QUICK_CV, "--out", run)  # stderr captured: not a terminal
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    folds = [line for line in lines if re.search(r"\] folds \d/2 ", line)]
    epochs = [line for line in lines if re.search(r"\]   epochs \(group-\d\) \d/2 loss", line)]
    assert len(folds) == 2 and len(epochs) == 4, proc.stderr
    assert all("elapsed" in line and "left" in line for line in folds + epochs)
    assert not any("batches" in line for line in lines)  # bars (batch counts included) stay off a log

    line = one_line_error(run_cli_here("cv", "--data", tiny_cache, *QUICK_CV, "--out", run), str(run), "--resume", "--out")
    assert "resume=True" not in line
    assert run_cli_here("cv", "--data", tiny_cache, *QUICK_CV, "--out", run, "--resume").returncode == 0


@pytest.mark.parametrize("command", ["cv", "embed"])
def test_an_output_that_is_a_file_or_cannot_be_written_is_one_line(command, tiny_cache, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    args = QUICK_CV if command == "cv" else ("--model", "test_resnet", "--image-size", "32", "--init", "xavier")
    for out, needle in [(blocker, "existing file"), (blocker / "run", "a parent is a file"),
                        ("/proc/cellmorph-test/run", "cannot write")]:
        line = one_line_error(run_cli_here(command, "--data", tiny_cache, *args, "--out", out), str(out))
        assert needle in line
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("command, model", [("cv", "inception_v3"), ("embed", "inception_v3"),
                                            ("cv", "vit_tiny_patch16_224")])
def test_an_image_size_the_network_cannot_take_is_one_line_and_leaves_nothing(command, model, tiny_cache, tmp_path):
    """inception_v3 shrinks 16 px to nothing (RuntimeError); a ViT asserts its patch grid (AssertionError)."""
    run = tmp_path / "deeper" / "run"
    one_line_error(run_cli_here(command, "--data", tiny_cache, "--model", model, "--init", "xavier", "--image-size", "16",
                           "--out", run), f"image size 16 px: {model} cannot take it", "--image-size")
    assert not (tmp_path / "deeper").exists()  # not even the parent the command would have created


def test_a_run_that_failed_before_its_first_fold_does_not_block_the_same_command(tiny_cache, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("config: {model: test_resnet}\nfingerprint: from-a-failed-attempt\n")
    (run / "folds" / "0").mkdir(parents=True)
    (run / "folds" / "0" / "predictions.parquet").write_bytes(b"half-written by a crash")
    proc = run_cli_here("cv", "--data", tiny_cache, *QUICK_CV, "--out", run)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "metrics.json").read_text())["resumed_folds"] == []


def test_cv_takes_the_fine_tuning_levers(tiny_cache, tmp_path):
    """Discriminative rates, gradual unfreezing and a probe-initialised head, from the command line
    into the run's recorded config."""
    run = tmp_path / "run"
    proc = run_cli_here("cv", "--data", str(tiny_cache), *QUICK_CV, "--backbone-lr-scale", "0.1", "--unfreeze-every", "1",
                   "--head-init", "probe", "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load((run / "config.yaml").read_text())["config"]
    assert (config["backbone_lr_scale"], config["unfreeze_every"], config["head_init"]) == (0.1, 1, "probe")


def _flags(command: str) -> set[str]:
    """Every flag a command takes, as click parsed its typer definition."""
    import typer.main

    from cellmorph.cli import app

    return {flag for param in typer.main.get_command(app).commands[command].params
            for flag in (*param.opts, *param.secondary_opts)}


@pytest.mark.parametrize("command, config, left_out", [
    ("cv", "cellmorph.cv.config:CVConfig", {"ensemble"}),  # ensemble: --ensemble-seeds/-models/-probe
    ("train", "cellmorph.cv.config:CVConfig", {"cv", "ensemble"}),  # train's CV is --calibration
    ("predict", "cellmorph.config.predict:PredictConfig", {"reuse_freed_memory"}),  # always on there
    ("embed", "cellmorph.config.embed:EmbedConfig", set()),
    ("prepare", "cellmorph.config.prepare:PrepareConfig", set()),
])
def test_every_setting_of_a_command_is_one_of_its_options(command, config, left_out):
    """The options are generated from the settings records: a field added to a record is an option of its
    commands without a second definition (a nested record's fields too: --augment-jitter)."""
    import importlib

    from pydantic import BaseModel

    from cellmorph.cli.options import OPTION_NAMES

    module, name = config.split(":")
    record = getattr(importlib.import_module(module), name)
    renamed = OPTION_NAMES | {"tile_grid": "tiles", "include_controls": "controls"} if command == "prepare" \
        else OPTION_NAMES
    flags = _flags(command)
    for field, info in record.model_fields.items():
        if field in left_out:
            continue
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            wanted = {f"--{field}-{sub.replace('_', '-')}" for sub in info.annotation.model_fields if sub != "enabled"}
        else:
            wanted = {"--" + renamed.get(field, field).replace("_", "-")}
        assert wanted <= flags, f"{command}: {field} has no option"


def test_cv_options_reach_the_recorded_config_over_a_yaml_config(tiny_cache, tmp_path):
    """Settings that had no option before they were generated (momentum, weight decay, the schedule, the
    augmentation's fields) reach the run's config; the YAML's augment fields not given on the command line stay."""
    yaml_config = tmp_path / "recipe.yaml"
    yaml_config.write_text("augment:\n  noise_p: 0.0\n  jitter: 0.5\nmomentum: 0.8\n")
    run = tmp_path / "run"
    proc = run_cli_here("cv", "--data", tiny_cache, *QUICK_CV, "--config", yaml_config, "--momentum", "0.5",
                        "--weight-decay", "0.0001", "--lr-schedule", "cosine", "--augment-jitter", "0.1",
                        "--no-augment-dihedral", "--no-class-weighting", "--out", run, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load((run / "config.yaml").read_text())["config"]
    assert (config["momentum"], config["weight_decay"], config["lr_schedule"], config["class_weighting"]) == (
        0.5, 0.0001, "cosine", False)
    augment = config["augment"]
    assert (augment["jitter"], augment["dihedral"], augment["noise_p"]) == (0.1, False, 0.0)
    one_line_error(run_cli_here("cv", "--data", tiny_cache, *QUICK_CV, "--augment-jitter", "-1",
                                "--out", tmp_path / "bad"), "augment.jitter")
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- hostile input (issue 28)
@pytest.mark.parametrize("options, env, needles", [
    (("--device", "bogus"), {}, ("--device 'bogus'",)),
    (("--threads", "99999999999999999999"), {}, ("num_threads",)),
    ((), {"CELLMORPH_THREADS": "99999999999999999999"}, ("$CELLMORPH_THREADS",)),
    ((), {"CELLMORPH_THREADS": "abc"}, ("$CELLMORPH_THREADS", "'abc'")),
    ((), {"CELLMORPH_THREADS": "0"}, ("$CELLMORPH_THREADS",)),
])
def test_bad_runtime_options_are_one_line_and_leave_nothing(tiny_cache, tmp_path, monkeypatch, options, env, needles):
    run = tmp_path / "new" / "run"
    quick = [a for a in QUICK_CV if a not in ("--threads", "1")]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    one_line_error(run_cli_here("cv", "--data", tiny_cache, *quick, *options, "--out", run), *needles)
    assert not (tmp_path / "new").exists()


def test_a_binary_config_and_a_bad_yaml_config_are_one_line(tiny_cache, tmp_path):
    binary = tmp_path / "config.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    one_line_error(run_cli_here("cv", "--data", tiny_cache, "--config", binary, "--out", tmp_path / "r"),
                   str(binary), "not a UTF-8 text file")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: test_resnet\nepochs: [1, 2\n")
    one_line_error(run_cli_here("cv", "--data", tiny_cache, "--config", broken, "--out", tmp_path / "r"),
                   str(broken), "invalid YAML: line 3")
    assert not (tmp_path / "r").exists()


def test_an_output_path_that_is_not_utf8_is_refused_before_any_work(tiny_cache, tmp_path):
    import os
    import subprocess
    import sys

    out = os.fsencode(tmp_path) + b"/run-\xff"
    proc = subprocess.run([sys.executable, "-m", "cellmorph.cli", "cv", "--data", str(tiny_cache), *QUICK_CV,
                           "--out", out], capture_output=True, text=True)
    one_line_error(proc, "--out", "not valid UTF-8")
    assert os.listdir(tmp_path) == []


def test_resume_into_a_folder_that_is_no_run_is_refused(tiny_cache, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    one_line_error(run_cli_here("cv", "--data", tiny_cache, *QUICK_CV, "--out", tmp_path / "elsewhere", "--resume"),
                   "--resume", "not a cellmorph run")
    assert list((tmp_path / "elsewhere").iterdir()) == []
    one_line_error(run_cli_here("cv", "--data", tiny_cache, *QUICK_CV, "--out", tmp_path / "absent", "--resume"),
                   "not a cellmorph run")
    assert not (tmp_path / "absent").exists()


def test_cv_into_its_own_cache_folder_is_refused(tiny_cache):
    before = sorted(p.name for p in tiny_cache.iterdir())
    one_line_error(run_cli_here("cv", "--data", tiny_cache, *QUICK_CV, "--out", tiny_cache), "--out", "--data")
    assert sorted(p.name for p in tiny_cache.iterdir()) == before


def test_a_second_cv_into_a_folder_being_written_is_refused(tiny_cache, tmp_path):
    import subprocess
    import sys
    import textwrap

    run = tmp_path / "run"
    hold = textwrap.dedent(f"""
        import time
        from cellmorph.runinfo import output_lock
        with output_lock({str(run)!r}, "cv"):
            print("held", flush=True)
            time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        one_line_error(run_cli_here("cv", "--data", tiny_cache, *QUICK_CV, "--out", run), str(run),
                       "another cellmorph run", f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    # That a dead holder's lock is stale and taken over: tests/test_runinfo.py.


@pytest.mark.slow
def test_cv_on_a_full_disk_is_one_line_leaves_nothing_and_then_runs(tiny_cache, small_disk):
    disk = small_disk.mount("16k")
    run = disk / "run"
    one_line_error(run_cli_here("cv", "--data", tiny_cache, *QUICK_CV, "--out", run), "no space left on device writing")
    assert list(disk.iterdir()) == []
    small_disk.mount("64m")
    proc = run_cli_here("cv", "--data", tiny_cache, *QUICK_CV, "--out", run)
    assert proc.returncode == 0, proc.stderr
    assert (run / "metrics.json").is_file()


def test_prepare_on_a_full_disk_is_one_line_leaves_nothing_and_then_prepares(tiny_screen, tiny_cache, small_disk):
    disk = small_disk.mount("8m")  # room for two of the tiny screen's four 3.4 MB plates
    cache = disk / "cache"
    one_line_error(run_cli_here("prepare", "--root", tiny_screen, "--out", cache, "--no-progress"),
                   "no space left on device writing", str(cache))
    assert list(disk.iterdir()) == []
    small_disk.mount("64m")
    proc = run_cli_here("prepare", "--root", tiny_screen, "--out", cache, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert pd.read_parquet(cache / "index.parquet").equals(pd.read_parquet(tiny_cache / "index.parquet"))
    for plate in (tiny_cache / "plates").glob("*.npy"):
        assert (cache / "plates" / plate.name).read_bytes() == plate.read_bytes()


@pytest.mark.slow
def test_predict_on_a_full_disk_is_one_line_leaves_nothing_and_then_predicts(tiny_bundle, tiny_cache, small_disk):
    disk = small_disk.mount("48k")
    out = disk / "pred"
    one_line_error(run_cli_here("predict", "--model", tiny_bundle, "--data", tiny_cache, "--out", out, "--no-progress"),
                   "no space left on device writing")
    assert list(disk.iterdir()) == []
    small_disk.mount("64m")
    proc = run_cli_here("predict", "--model", tiny_bundle, "--data", tiny_cache, "--out", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert (out / "treatments.parquet").is_file() and (out / "summary.json").is_file()


def test_predict_into_its_model_or_cache_folder_is_refused(tiny_bundle, tiny_cache):
    for folder, option in ((tiny_bundle, "--model"), (tiny_cache, "--data")):
        before = sorted(p.name for p in folder.iterdir())
        one_line_error(run_cli_here("predict", "--model", tiny_bundle, "--data", tiny_cache, "--out", folder),
                       "--out", option)
        assert sorted(p.name for p in folder.iterdir()) == before


def test_a_moa_with_one_compound_still_trains_is_not_scored_and_strict_refuses(tiny_copy, tmp_path):
    """Issue 29, item 5: a MoA with a single compound (as Eg5 inhibitors in the real development set)
    stays in training in every fold, is listed as not scored, and no other compound is dropped with
    it; --strict keeps the old error. train's calibration CV takes its scores from held-out compounds only."""
    moa = tiny_copy / "BBBC021_v1_moa.csv"
    table = pd.read_csv(moa)
    table.loc[table["compound"] == "syn-ACT-1", "moa"] = "Lonely"
    table.to_csv(moa, index=False)
    cache = tmp_path / "cache"
    assert run_cli_here("prepare", "--layout", "bbbc021", "--root", tiny_copy, "--out", cache, "--tile-size", "32",
                        "--no-progress").returncode == 0
    run = tmp_path / "run"
    proc = run_cli_here("cv", "--data", cache, "--out", run, *QUICK_CV, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "note: not scored: 'syn-ACT-1' is the only compound of MoA 'Lonely'" in " ".join(proc.stderr.split())
    metrics = json.loads((run / "metrics.json").read_text())
    # syn-ACT-2 is left the only compound of Actin disruptors: listed too
    assert [s["name"] for s in metrics["skipped_folds"]] == ["syn-ACT-1", "syn-ACT-2"]
    scored = pd.read_csv(run / "treatments.csv")
    lonely = int(table["compound"].isin(["syn-ACT-1", "syn-ACT-2"]).sum())  # their concentrations: treatments
    assert not {"syn-ACT-1", "syn-ACT-2"} & set(scored["Metadata_Compound"]) and len(scored) == 44 - lonely
    assert "Lonely" in metrics["classes"]  # still learnt
    one_line_error(run_cli_here("cv", "--data", cache, "--out", tmp_path / "strict", *QUICK_CV, "--strict",
                                "--no-progress"), "has no other compound in training")
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize("value, mode, needle", [("abc", "linear-probe", "--probe-c 'abc'"),
                                                 ("-1", "linear-probe", "probe_c"),
                                                 ("0.1", "finetune", "mode linear-probe only")])
def test_a_bad_probe_c_is_one_line(tiny_cache, tmp_path, value, mode, needle):
    out = tmp_path / "run"
    one_line_error(run_cli_here("cv", "--data", tiny_cache, "--out", out, "--mode", mode, "--probe-c", value,
                                "--no-progress"), needle)
    assert not out.exists()


def test_python_dash_m_cellmorph_is_the_command():
    """``python -m cellmorph`` runs the CLI, for environments whose scripts folder is not on PATH."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "cellmorph", "cv", "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--mode" in done.stdout and "Usage:" in done.stdout
