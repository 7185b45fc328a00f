"""Batched augmentation and the input pipeline."""

from __future__ import annotations

import torch

from cellmorph.augment import (
    AugmentConfig,
    Augmenter,
    box_blur,
    dihedral,
    intensity_jitter,
    random_blur,
    random_dihedral,
    random_noise,
)
from cellmorph.datasets import InputPipeline, batch_order


def _batch(n=6, c=3, h=9, w=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, c, h, w), generator=g)


def test_dihedral_group_has_eight_distinct_elements_preserving_pixels():
    x = torch.arange(3 * 5 * 5, dtype=torch.float32).view(1, 3, 5, 5)  # no symmetry
    images = [dihedral(x, k) for k in range(8)]
    assert len({tuple(im.flatten().tolist()) for im in images}) == 8
    for im in images:
        assert im.shape == x.shape
        for c in range(3):  # each channel keeps its own pixel multiset
            assert torch.equal(im[0, c].flatten().sort().values, x[0, c].flatten().sort().values)
    # Closed under composition: rotating any element gives another element.
    keys = {tuple(im.flatten().tolist()) for im in images}
    assert all(tuple(torch.rot90(im, 1, dims=(-2, -1)).flatten().tolist()) in keys for im in images)


def test_random_dihedral_applies_one_group_element_per_image():
    x = _batch(n=32)
    out = random_dihedral(x, torch.Generator().manual_seed(1))
    used = set()
    for i in range(len(x)):
        matches = [k for k in range(8) if torch.equal(out[i], dihedral(x[i], k))]
        assert matches, f"image {i} is not a dihedral transform of its input"
        used.add(matches[0])
    assert len(used) > 3  # independent draws per image, not one per batch
    # Non-square: only the shape-preserving elements.
    y = _batch(n=8, h=6, w=10)
    assert random_dihedral(y, torch.Generator().manual_seed(0)).shape == y.shape


def test_photometric_ops_change_values_not_shape():
    x = _batch(n=16)
    g = torch.Generator().manual_seed(0)
    for out in (
        intensity_jitter(x, 0.25, 1.0, g),
        random_blur(x, 1.0, 3, g),
        random_noise(x, 1.0, 0.05, g),
    ):
        assert out.shape == x.shape
        assert not torch.equal(out, x)
    # Jitter scales whole channels by exactly 1 ± 0.25.
    j = intensity_jitter(x, 0.25, 1.0, torch.Generator().manual_seed(3))
    ratios = (j / x).flatten(2)
    assert torch.allclose(ratios.min(-1).values, ratios.max(-1).values, atol=1e-5)
    assert set(torch.round(ratios[:, :, 0] * 100).unique().tolist()) <= {75.0, 125.0}
    # Box blur of a constant image is the constant; p=0 leaves the batch alone.
    const = torch.full((2, 3, 7, 7), 0.4)
    assert torch.allclose(box_blur(const, 3), const)
    assert torch.equal(random_blur(x, 0.0, 3, g), x)
    assert torch.equal(random_noise(x, 0.0, 0.05, g), x)


def test_augmenter_is_identity_in_eval_and_seeded_in_training():
    x = _batch(n=12)
    aug = Augmenter(AugmentConfig(), seed=5)
    aug.eval()
    assert torch.equal(aug(x), x)
    aug.train()
    a = aug(x)
    assert a.shape == x.shape and not torch.equal(a, x)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    b = Augmenter(AugmentConfig(), seed=5).train()(x)
    assert torch.equal(a, b)
    assert not torch.equal(aug(x), a)  # the generator advances from batch to batch
    assert not torch.equal(a, Augmenter(AugmentConfig(), seed=6).train()(x))
    assert torch.equal(Augmenter(AugmentConfig(enabled=False)).train()(x), x)


def test_input_pipeline_resizes_normalises_and_augments_only_in_training():
    tiles = (torch.rand(4, 3, 20, 20) * 255).to(torch.uint8)
    pipe = InputPipeline([0.5, 0.5, 0.5], [0.25, 0.25, 0.25], 16, Augmenter(seed=0))
    pipe.eval()
    a, b = pipe(tiles), pipe(tiles)
    assert a.shape == (4, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    same = InputPipeline([0.5] * 3, [0.25] * 3, 20).eval()(tiles)
    assert torch.allclose(same, (tiles.float() / 255 - 0.5) / 0.25)
    pipe.train()
    assert not torch.equal(pipe(tiles), a)


def test_batch_order_drops_a_trailing_singleton():
    import numpy as np

    batches = batch_order(9, 4, np.random.default_rng(0), min_last=2)
    assert [len(b) for b in batches] == [4, 4]
    assert [len(b) for b in batch_order(9, 4)] == [4, 4, 1]
    assert sorted(np.concatenate(batch_order(10, 3, np.random.default_rng(1))).tolist()) == list(range(10))
