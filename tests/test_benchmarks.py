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


def test_matmul_peak_is_measured():
    assert matmul_gflops(n=256, repeats=3) > 0.1


def test_rescore_reproduces_a_run_and_scores_it_without_tta(tiny_cache, tmp_path):
    import json

    import torch

    from cellmorph.experiment import run_cv
    from rescore import rescore

    run = tmp_path / "run"
    metrics = run_cv(tiny_cache, run, dict(model="test_resnet", init="xavier", image_size=32, epochs=1,
                                           cv="group-kfold:2", max_tiles_per_fold=48, tta="dihedral",
                                           num_threads=1), progress=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = rescore(run)  # also checks the re-scored TTA predictions equal the stored ones
    finally:
        torch.set_num_threads(before)
    for key in ("treatment_accuracy", "well_accuracy", "tile_accuracy"):
        assert result["dihedral"][key] == pytest.approx(metrics[key])
        assert 0.0 <= result["none"][key] <= 1.0
    json.dumps(result)
