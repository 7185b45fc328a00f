"""What the network looks at: filter images (the paper's Fig. 5) and Grad-CAM, API and CLI.

Fast by construction: EfficientNet-Lite0 (offline ImageNet weights) at 48–64 px, a few dozen
gradient-ascent steps, one thread.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from cellmorph.errors import CellmorphError
from cellmorph.visualize import (
    FilterConfig,
    filter_activations,
    gradcam_heatmaps,
    gradcam_overlays,
    layer_channels,
    maximise_filters,
    spread_filters,
)
from tests.conftest import one_line_error, run_cli_here

FAST = FilterConfig(size=64, steps=24, threads=1)


@pytest.fixture(scope="module")
def lite0():
    from cellmorph.models import create_model

    torch.manual_seed(0)  # the fresh 4-class head
    return create_model("tf_efficientnet_lite0", 4, init="imagenet").eval()


# --------------------------------------------------------------------------- filter images
def test_filter_images_are_deterministic_for_a_seed_and_differ_across_seeds(lite0):
    images = maximise_filters(lite0, "stage2", [0, 13], FAST)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, maximise_filters(lite0, "stage2", [0, 13], FAST))
    other = maximise_filters(lite0, "stage2", [0, 13], FAST.model_copy(update={"seed": 1}))
    assert not np.array_equal(images, other)
    assert lite0.training is False and all(p.grad is None for p in lite0.parameters())


@pytest.mark.parametrize("layer", ["stage2", "stage3"])
def test_a_maximising_image_raises_its_filter_far_above_uniform_noise(lite0, layer):
    """Measured on the saved uint8 images against 32 uniform-noise images of the same size:
    at least 10 noise standard deviations above the noise mean and 3x its magnitude (measured
    at 24 steps: 28–48 SD above, 5.6–26x the noise mean's magnitude)."""
    filters = spread_filters(layer_channels(lite0, layer, FAST.size), 3)
    images = maximise_filters(lite0, layer, filters, FAST)
    reached = filter_activations(lite0, layer, images, filters, threads=1)
    noise = np.random.default_rng(0).integers(0, 256, (32, FAST.size, FAST.size, 3), dtype=np.uint8)
    for filt, value in zip(filters, reached):
        base = filter_activations(lite0, layer, noise, [filt], threads=1)
        z = (value - base.mean()) / base.std()
        assert value > base.max() and z >= 10 and value >= 3 * abs(base.mean()), (layer, filt, value, base.mean(), z)


def test_layers_and_filters_are_checked(lite0):
    with pytest.raises(CellmorphError, match="stage0–stage4"):
        maximise_filters(lite0, "stage9", [0], FAST)
    with pytest.raises(CellmorphError, match="did you mean"):
        maximise_filters(lite0, "blocks.44", [0], FAST)
    with pytest.raises(CellmorphError, match="filters 0–39"):
        maximise_filters(lite0, "stage2", [40], FAST)
    assert layer_channels(lite0, "blocks.2", 64) == 40  # a module path works as a layer
    with pytest.raises(ValueError):
        FilterConfig(layers="stage1,bad-name")


# --------------------------------------------------------------------------- Grad-CAM
@pytest.fixture(scope="module")
def two_tiles(tiny_cache):
    """Two real tiles of the tiny screen of different MoAs."""
    from cellmorph.cache import TileCache

    cache = TileCache(tiny_cache)
    labels = cache.index["Metadata_MoA"].astype(str)
    moas = [m for m in labels.unique() if m != "DMSO"][:2]
    rows = [int(np.flatnonzero(labels.to_numpy() == m)[0]) for m in moas]
    return cache.tiles(rows)


def test_gradcam_overlays_have_the_tile_shape_are_deterministic_and_follow_the_class(lite0, two_tiles):
    spec = lite0.cellmorph_input.with_size(64)
    n, _, h, w = two_tiles.shape
    overlays = gradcam_overlays(lite0, two_tiles, spec, [0, 0], threads=1)
    assert overlays.shape == (n, h, w, 3) and overlays.dtype == np.uint8
    np.testing.assert_array_equal(overlays, gradcam_overlays(lite0, two_tiles, spec, [0, 0], threads=1))
    assert not np.array_equal(overlays[..., :3], np.transpose(two_tiles, (0, 2, 3, 1)))
    heat0 = gradcam_heatmaps(lite0, two_tiles, spec, [0, 0], threads=1)
    heat1 = gradcam_heatmaps(lite0, two_tiles, spec, [1, 1], threads=1)
    assert heat0.shape == (n, h, w) and 0.0 <= heat0.min() and heat0.max() <= 1.0
    assert np.abs(heat0 - heat1).mean() > 0.02  # another class: other evidence
    assert np.abs(heat0[0] - heat0[1]).mean() > 0.02  # another tile: another map
    assert all(p.grad is None for p in lite0.parameters())
    with pytest.raises(CellmorphError, match="target classes must be 0–3"):
        gradcam_overlays(lite0, two_tiles, spec, [0, 4])


# --------------------------------------------------------------------------- the CLI contract
@pytest.fixture(scope="module")
def kept_run(tiny_cache, tmp_path_factory):
    """A CV run of ImageNet Lite0 fine-tuned for one epoch at 64 px, with cv's default
    --keep-checkpoints (last: the last fold's weights stay)."""
    run = tmp_path_factory.mktemp("visualize") / "run"
    proc = run_cli_here("cv", "--data", tiny_cache, "--model", "tf_efficientnet_lite0", "--init", "imagenet",
                   "--image-size", "64", "--epochs", "1", "--max-tiles-per-fold", "40", "--threads", "1",
                   "--cv", "group-kfold:2", "--out", run)
    assert proc.returncode == 0, proc.stderr
    return run


@pytest.mark.slow
def test_visualize_filters_of_a_default_cv_run_writes_one_png_per_layer(kept_run, tmp_path):
    """The contract command, `visualize filters --run RUN --out DIR`, on a run made with cv's defaults."""
    from PIL import Image

    out = tmp_path / "filters"
    proc = run_cli_here("visualize", "filters", "--run", kept_run, "--out", out, "--layers", "stage1,stage3",
                   "--filters", "3", "--steps", "8", "--size", "48", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load((kept_run / "config.yaml").read_text())["config"]["keep_checkpoints"] == "last"
    assert sorted(p.name for p in out.glob("*.png")) == ["stage1.png", "stage3.png"]
    for png in out.glob("*.png"):
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.shape[0] > 100 and pixels.std() > 10  # not blank
    record = json.loads((out / "filters.json").read_text())
    assert record["source"] == {"kind": "run", "path": str(kept_run), "fold": 1}
    reached = record["layers"][1]["activations"]
    assert list(reached) == ["ImageNet", "fine-tuned (fold 1)"]
    assert reached["ImageNet"] != reached["fine-tuned (fold 1)"]  # two different networks


def test_a_bundle_works_too_and_missing_imagenet_weights_are_one_clear_error(kept_run, tmp_path):
    from cellmorph.bundle import save_bundle
    from cellmorph.cv import RunDir
    from cellmorph.models import InputSpec
    from cellmorph.visualize import imagenet_network, visualize_filters

    state = RunDir(kept_run).fold_state(1)
    bundle = save_bundle(tmp_path / "model", state["model"], state["model_name"], state["classes"],
                         InputSpec.from_record(state["input"]), {}, {"config": {"init": "imagenet"}})
    summary = visualize_filters(tmp_path / "out", FAST.model_copy(update={"layers": ("stage1",), "filters": 2,
                                                                          "steps": 4, "size": 32}), model=bundle)
    assert summary["pngs"] == ["stage1.png"] and (tmp_path / "out" / "stage1.png").is_file()
    with pytest.raises(CellmorphError, match="ImageNet counterpart of the fine-tuned test_resnet: no ImageNet"):
        imagenet_network("test_resnet", 4)


def test_a_run_without_fold_weights_is_one_line_error(kept_run, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(kept_run, bare)
    for state in bare.glob("folds/*/state.pt"):
        state.unlink()
    out = tmp_path / "out"
    one_line_error(run_cli_here("visualize", "filters", "--run", bare, "--out", out), str(bare), "--keep-checkpoints last")
    assert not out.exists()
    from cellmorph.visualize import visualize_filters

    with pytest.raises(CellmorphError, match="exactly one of run RUN"):
        visualize_filters(out, FAST, run=bare, model=bare)
