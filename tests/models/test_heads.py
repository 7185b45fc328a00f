"""The probe's heads in their one linear form: the same probabilities as the fitted heads, and the checks a
bundle's head file must pass."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cellmorph.cv.probe import CentroidHead
from cellmorph.models.heads import LinearProbeHead, ProbeNetwork, fit_probe_head, probe_head_problem


def _data(classes: int, n: int = 90, d: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[np.arange(n), y] += 2.5
    return x * rng.uniform(0.5, 3.0, size=d).astype(np.float32) + 1.0, y


@pytest.mark.parametrize("classes", [2, 4])
def test_the_logistic_head_gives_scikit_learns_probabilities(classes):
    x, y = _data(classes)
    logistic, scaler = fit_probe_head(x, y + 1, class_weighting=True, seed=0, c=0.1)  # classes 1…k of k + 1
    head = LinearProbeHead.from_logistic(logistic, scaler)
    probs = head.predict_proba(x, classes + 1)
    assert probs.shape == (len(x), classes + 1) and np.all(probs[:, 0] == 0)
    np.testing.assert_allclose(probs[:, 1:], logistic.predict_proba(scaler.transform(x)), atol=1e-6)


def test_the_centroid_head_is_linear_in_the_profile():
    x, y = _data(3)
    index = pd.DataFrame({"Metadata_Compound": [f"c{i % 9}" for i in range(len(x))], "Metadata_Concentration": 1.0})
    index["Metadata_Compound"] = [f"m{k}c{i % 3}" for i, k in enumerate(y)]
    centroid = CentroidHead.fit(x, y, index, temperature=3.0)
    head = LinearProbeHead(centroid.centroids, np.zeros(3), centroid.mean_, centroid.scale_, 3.0, centroid.classes_)
    np.testing.assert_allclose(head.predict_proba(x, 3), centroid.predict_proba(x), atol=1e-6)
    again = LinearProbeHead.from_state(head.state())
    np.testing.assert_array_equal(again.predict_proba(x, 3), head.predict_proba(x, 3))


def test_a_probe_network_applies_the_head_to_the_mean_profile_of_the_views():
    x, y = _data(3, d=4)
    logistic, scaler = fit_probe_head(x, y, class_weighting=False, seed=0)
    head = LinearProbeHead.from_logistic(logistic, scaler)

    class MeanPixels(torch.nn.Module):  # a stand-in feature extractor of 4 values a tile
        model = None  # (no timm backbone behind it: no feature stages to declare)

        def forward(self, images):
            return images.mean(dim=(2, 3)) + images[:, :, 0, 0]  # not dihedral-invariant: the views matter

    images = torch.randn(5, 4, 8, 8)
    network = ProbeNetwork(MeanPixels(), head, n_classes=4, tta="dihedral").eval()
    from cellmorph.augment import tta_views

    profile = np.mean([MeanPixels()(v).numpy() for v in tta_views(images, "dihedral")], axis=0)
    logits = network(images)
    assert torch.isinf(logits[:, 3]).all()  # a class without training cells can never be called
    np.testing.assert_allclose(torch.softmax(logits, 1)[:, :3].numpy(), logistic.predict_proba(scaler.transform(profile)),
                               atol=1e-6)


def test_a_head_that_does_not_fit_is_named():
    x, y = _data(3)
    state = LinearProbeHead.from_logistic(*fit_probe_head(x, y, class_weighting=False, seed=0)).state()
    assert probe_head_problem(state, 3, 12) is None
    assert "12-long" in probe_head_problem(state, 3, 20) and "20" in probe_head_problem(state, 3, 20)
    assert "at most 2 classes" in probe_head_problem(state, 2, 12)
    assert "no 'bias'" in probe_head_problem({k: v for k, v in state.items() if k != "bias"}, 3, 12)
    assert "distinct" in probe_head_problem(state | {"classes_index": torch.tensor([0, 0, 1])}, 3, 12)
    assert "above 0" in probe_head_problem(state | {"temperature": torch.tensor(-1.0, dtype=torch.float64)}, 3, 12)
    assert "finite" in probe_head_problem(state | {"mean": torch.full((12,), float("nan"), dtype=torch.float64)}, 3, 12)
