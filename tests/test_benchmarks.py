"""The benchmark harness's FLOP accounting (its timings are never asserted: see benchmarks/RESULTS.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from run import flops_per_image, matmul_gflops  # noqa: E402


def test_training_flops_follow_the_backward_convention_and_freezing_removes_backward():
    model = timm.create_model("resnet18", pretrained=False, num_classes=12)
    forward = flops_per_image(model, 64, train=False)
    assert forward == pytest.approx(2 * 1.82e9 * (64 / 224) ** 2, rel=0.05)  # resnet18: 1.82 GMAC at 224
    assert flops_per_image(model, 64, train=True) == pytest.approx(3 * forward)
    frozen = flops_per_image(model, 64, train=True, freeze=2)  # stem + layer1: no backward
    assert forward < frozen < 3 * forward


def test_matmul_peak_is_2n3_flops_over_the_median_timed_matmul(monkeypatch):
    """A fake clock that advances only inside ``@``, by a set duration per matmul: the peak must be
    2·n³ / median(durations of the timed matmuls), warm-ups excluded, one n×n @ n×n per timing."""
    import statistics
    import types

    import torch

    import run

    n, repeats = 64, 5
    durations = [9.0, 9.0, 9.0, 0.004, 0.001, 0.010, 0.002, 0.003]  # 3 warm-ups (must not count), then 5 timed
    clock = {"now": 0.0, "calls": 0}
    matmul = torch.Tensor.__matmul__

    def timed_matmul(a, b):
        assert tuple(a.shape) == tuple(b.shape) == (n, n)
        clock["now"] += durations[clock["calls"]]
        clock["calls"] += 1
        return matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", timed_matmul)
    monkeypatch.setattr(run, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    gflops = matmul_gflops(n=n, repeats=repeats)
    assert clock["calls"] == 3 + repeats
    assert gflops == pytest.approx(2 * n**3 / statistics.median(durations[3:]) / 1e9, rel=1e-12)  # median 0.003 s


def test_rescore_reproduces_a_run_and_scores_it_without_tta(tiny_cache, tmp_path):
    import json

    import torch

    from cellmorph.cv import run_cv
    from rescore import rescore

    run = tmp_path / "run"
    config = dict(model="test_resnet", init="xavier", image_size=32, epochs=1, cv="group-kfold:2",
                  max_tiles_per_fold=48, tta="dihedral", num_threads=1, keep_checkpoints="all")
    metrics = run_cv(tiny_cache, run, config, progress=False)
    # Its twin without TTA: fold seeds depend on (seed, fold) only, so it trains the same models.
    plain = run_cv(tiny_cache, tmp_path / "plain", dict(config, tta="none"), progress=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = rescore(run)  # also checks the re-scored TTA predictions equal the stored ones
    finally:
        torch.set_num_threads(before)
    for key in ("treatment_accuracy", "well_accuracy", "tile_accuracy"):
        assert result["dihedral"][key] == pytest.approx(metrics[key])
        assert result["none"][key] == plain[key]  # re-scoring without TTA = the run made without TTA
    json.dumps(result)


def test_real_crops_scores_a_run_and_an_ensemble_of_it_alike(tiny_cache, tmp_path):
    """benchmarks/real_crops.py's figures come from the run's own outputs; an ensemble of one run with
    itself is that run (the averaging and re-aggregation are those of cv)."""
    from cellmorph.cv import run_cv
    from real_crops import score

    run = tmp_path / "probe"
    metrics = run_cv(tiny_cache, run, dict(model="tf_efficientnet_lite0", init="imagenet", mode="linear-probe",
                                           cv="group-kfold:2", image_size=32, num_threads=1), progress=False)
    alone, twice = score(run), score([run, run])
    assert alone["treatment"] == metrics["treatment_accuracy"] and alone["cell"] == metrics["tile_accuracy"]
    for key in ("treatment", "well", "cell", "balanced_cell", "treatment_log_loss"):
        assert twice[key] == pytest.approx(alone[key]), key
    assert 0 <= alone["balanced_cell"] <= 1 and alone["probe_c"]


def test_snapshot_ensemble_averages_a_networks_epochs_and_its_last_alone_is_the_run(tiny_cache, tmp_path):
    """benchmarks/snapshot_ensemble.py: the last epoch alone scores as the run itself, an earlier epoch as the run's
    own by-epoch figure, and two epochs are each tile's probabilities averaged over them."""
    import numpy as np
    from tests.conftest import quick_config
    from real_crops import score, score_frames
    from snapshot_ensemble import snapshot_levels

    from cellmorph.cv import run_cv
    from cellmorph.schema import CACHE_ROW_COLUMN

    run = tmp_path / "ft"
    metrics = run_cv(tiny_cache, run, quick_config(epochs=2, eval_epochs=[1], cv="group-kfold:2"), progress=False)
    n_folds = metrics["n_folds"]
    last, first = score_frames(snapshot_levels(run, (2,)), n_folds), score_frames(snapshot_levels(run, (1,)), n_folds)
    for key in ("treatment", "well", "cell", "balanced_cell", "treatment_log_loss"):
        assert last[key] == pytest.approx(score(run)[key]), key
    assert first["treatment"] == pytest.approx(metrics["by_epoch"]["1"]["treatment_accuracy"])
    assert first["cell"] == pytest.approx(metrics["by_epoch"]["1"]["tile_accuracy"])
    tiles = {e: snapshot_levels(run, e)["tiles"].sort_values(CACHE_ROW_COLUMN) for e in ((1,), (2,), (1, 2))}
    probs = [c for c in tiles[(1,)].columns if c.startswith("prob_")]
    assert not np.allclose(tiles[(1,)][probs], tiles[(2,)][probs])
    np.testing.assert_allclose(tiles[(1, 2)][probs], (tiles[(1,)][probs].to_numpy() + tiles[(2,)][probs].to_numpy()) / 2,
                               rtol=1e-6)


def test_crop_channels_reorders_or_repeats_each_crops_channels_and_keeps_its_rows(tmp_path):
    """benchmarks/crop_channels.py's derived tables: the same cells in the same rows, each crop's channels in the
    variant's order (or one channel on all three), and the source table untouched."""
    import numpy as np
    import pandas as pd
    from crop_channels import ORDERS, channel_order, derived_table

    source = tmp_path / "dev"
    (source / "crops").mkdir(parents=True)
    rng = np.random.default_rng(0)
    crops = {f"crops/c{i}.npy": rng.integers(0, 60000, (6, 5, 3), dtype=np.uint16) for i in range(3)}
    for name, crop in crops.items():
        np.save(source / name, crop)
    table = pd.DataFrame({"FileName": list(crops), "Metadata_Plate": ["P1", "P1", "P2"],
                          "Metadata_Compound": ["DMSO", "taxol", "taxol"]})
    table.to_csv(source / "index.csv", index=False)
    assert len(ORDERS) == 6 and channel_order("201") == [2, 0, 1] and channel_order("grey1") == [1, 1, 1]
    for variant in ("201", "grey1"):
        index = derived_table(source, tmp_path / "out", variant)
        derived = pd.read_csv(index)
        assert derived.drop(columns="FileName").equals(table.drop(columns="FileName"))
        for name, row in zip(crops, derived["FileName"]):
            assert np.array_equal(np.load(index.parent / row), crops[name][..., channel_order(variant)])
    assert pd.read_csv(source / "index.csv").equals(table)
    assert not list((tmp_path / "out" / "tables").glob(".*"))  # no temporary left


def test_crop_prepare_variants_are_valid_prepare_options_and_the_first_is_the_contract():
    """benchmarks/crop_prepare.py's variants: each a crop `prepare` config that validates, all different, and the
    first one the crop layout's own defaults with the contract's --normalize batch."""
    from crop_prepare import VARIANTS

    from cellmorph.data.layouts import prepare_config

    configs = {name: prepare_config("crops", **options) for name, (options, _) in VARIANTS.items()}
    assert next(iter(configs.values())) == prepare_config("crops", normalize="batch")
    assert len({c.model_dump_json() for c in configs.values()}) == len(configs)


@pytest.mark.slow
def test_gpu_benchmark_runs_every_section_at_toy_size_on_the_cpu(tiny_screen, tmp_path):
    """benchmarks/gpu.py is run for real only where a GPU is lent; its smoke mode runs every section
    on the CPU here, so a change that breaks the script fails the suite (timings are not asserted)."""
    import json

    from gpu import main

    work = tmp_path / "work"
    work.mkdir()
    (work / "tiny-screen").symlink_to(tiny_screen)  # the session's screen: the script's own synth is not rerun
    out = tmp_path / "out"
    main(["--device", "cpu", "--smoke", "--out", str(out), "--work", str(work), "--commit", "test"])
    results = json.loads((out / "gpu.json").read_text())
    failed = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    assert not failed
    assert results["environment"]["commit"] == "test" and results["peak"]["tflops"] > 0
    fold = results["fold"]
    assert fold["complete"] and len(fold["epoch_seconds"]) == fold["epochs"] == 1 and fold["train_tiles"] == 16
    assert fold["projected_38_folds_s"] > 0 and 0 <= fold["tile_accuracy"] <= 1
    rates = {(r["model"], r["precision"], r["channels_last"]) for r in results["throughput"]}
    assert rates == {(m, p, True) for m in ("resnet50", "inception_v3") for p in ("fp32", "bf16")} | {
        ("resnet50", "fp32", False), ("inception_v3", "fp32", False)}  # the NCHW rows: fp32 in --smoke
    assert all(r["images_per_s"] > 0 and r["gflops_per_image"] > 0 for r in results["throughput"])
    (together,) = results["concurrent"]
    assert together["concurrent"] == 2 and together["tiles_per_s"] > 0  # two folds in two Dask worker processes
    assert set(results["fold_variants"]) == {"num_workers 2 (tiles read by worker processes)",
                                             "deterministic off (cuDNN autotuning)"}
    assert results["input"]["read_tiles_per_s_workers2"] > 0 and results["input"]["augment_tiles_per_s_cpu"] > 0
    check = results["correctness"]
    # Deterministic kernels: the same fold twice is bit-identical; on the CPU "device" and CPU are one
    # (scored at another batch size, so oneDNN may round differently: same calls, differences ≪ 1e-3)
    assert check["repeat_identical"] and check["cpu_vs_device_max_abs_diff"] < 1e-4
    assert check["cpu_vs_device_calls_agree"] == 1.0
    bundle = results["bundle"]  # train → bundle → predict (CPU) against the bundle scored on the "device"
    assert bundle["treatments"] == bundle["treatments_in_predict"] > 0
    assert bundle["max_abs_diff"] < 1e-4 and bundle["calls_agree"] == 1.0
    report = (out / "gpu.md").read_text()
    for heading in ("One LOCO fold", "Training steps", "Folds at once", "Input side", "Correctness",
                    "A bundle trained here"):
        assert heading in report


def test_dev_usecase_holds_out_whole_compounds_with_the_dmso_of_their_batches(tmp_path):
    import pandas as pd

    from dev_usecase import write_fold_tables

    table = pd.DataFrame({
        "FileName": [f"crops/{k}.npy" for k in range(6)],
        "Metadata_Plate": ["Week1_1", "Week1_2", "Week2_1", "Week1_1", "Week2_1", "Week3_1"],
        "Metadata_Compound": ["DMSO", "DMSO", "DMSO", "taxol", "taxol", "AZ138"]})
    train_csv, test_csv = write_fold_tables(tmp_path / "fold-0", table, ["taxol"])
    train, test = pd.read_csv(train_csv), pd.read_csv(test_csv)
    assert "taxol" not in set(train["Metadata_Compound"])
    assert set(train["FileName"]) == {"crops/0.npy", "crops/1.npy", "crops/2.npy", "crops/5.npy"}
    # the held-out compound's cells and the DMSO of its batches (weeks 1 and 2), nothing of week 3
    assert set(test["FileName"]) == {"crops/0.npy", "crops/1.npy", "crops/2.npy", "crops/3.npy", "crops/4.npy"}
    assert (tmp_path / "fold-0" / "crops").is_symlink()
