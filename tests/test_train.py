"""The training loop, prediction and seeding on a small in-memory tile set."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cellmorph.augment import Augmenter
from cellmorph.datasets import InputPipeline
from cellmorph.errors import CellmorphError
from cellmorph.models import create_model, model_input_spec
from cellmorph.runtime import derive_seeds, deterministic
from cellmorph.train import PredictSettings, TrainSettings, class_weights, fit, predict_tiles, tile_weights

CPU = torch.device("cpu")


def predict(model, pipeline, cache, rows, batch_size, tta="none"):
    """Tile probabilities at ``batch_size`` tiles per forward pass."""
    return predict_tiles(model, pipeline, cache, rows, PredictSettings(batch_size=batch_size, tta=tta), CPU)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: fast and stable on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ArrayCache:
    """The two things training needs from a TileCache: ``tiles(rows)`` and ``tile_shape``."""

    def __init__(self, tiles: np.ndarray) -> None:
        self.array = tiles
        self.tile_shape = tiles.shape[1:]
        self.index = pd.DataFrame({"row": np.arange(len(tiles))})

    def tiles(self, rows):
        return self.array[np.asarray(rows)]


def _toy(n=48, size=16, seed=0):
    """Class 1 tiles are brighter in channel 0: trivially learnable."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    tiles = rng.integers(0, 120, size=(n, 3, size, size)).astype(np.uint8)
    tiles[labels == 1, 0] += 120
    return ArrayCache(tiles), labels


def _train(cache, labels, seed=0, epochs=2):
    torch.manual_seed(seed)
    model = create_model("test_resnet", 2, init="xavier")
    spec = model_input_spec("test_resnet", 16)
    pipe = InputPipeline(spec.mean, spec.std, spec.size, Augmenter(seed=seed))
    settings = TrainSettings(epochs=epochs, batch_size=8, lr=0.01)
    rows = np.arange(len(labels))
    with deterministic():
        history = fit(model, pipe, cache, rows, labels, 2, settings, seed, CPU)
        probs = predict(model, pipe, cache, rows, 16)
    return model, history, probs


def test_fit_is_deterministic_and_predict_keeps_row_order():
    cache, labels = _toy()
    m1, h1, p1 = _train(cache, labels, seed=3)
    m2, h2, p2 = _train(cache, labels, seed=3)
    assert [h["loss"] for h in h1] == [h["loss"] for h in h2]
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert np.array_equal(p1, p2)
    assert p1.shape == (len(labels), 2)
    assert np.allclose(p1.sum(1), 1.0, atol=1e-5)
    assert len(h1) == 2 and {"epoch", "loss", "train_accuracy", "lr", "seconds"} <= set(h1[0])
    # Prediction in a shuffled row order gives the same per-row probabilities.
    spec = model_input_spec("test_resnet", 16)
    pipe = InputPipeline(spec.mean, spec.std, 16)
    perm = np.random.default_rng(0).permutation(len(labels))
    assert np.allclose(predict(m1, pipe, cache, perm, 5), p1[perm], atol=1e-6)
    _, h3, _ = _train(cache, labels, seed=4)
    assert [h["loss"] for h in h3] != [h["loss"] for h in h1]


def test_dihedral_tta_averages_the_softmax_over_the_eight_views():
    from cellmorph.augment import dihedral

    cache, labels = _toy(n=12)
    model, _, plain = _train(cache, labels, seed=1, epochs=1)
    spec = model_input_spec("test_resnet", 16)
    rows = np.arange(len(labels))
    tta = predict(model, InputPipeline(spec.mean, spec.std, 16), cache, rows, 5, tta="dihedral")

    class Turned(InputPipeline):
        def __init__(self, k):
            super().__init__(spec.mean, spec.std, 16)
            self.k = k

        def forward(self, tiles):
            return dihedral(super().forward(tiles), self.k)

    views = [predict(model, Turned(k), cache, rows, 16) for k in range(8)]
    assert np.allclose(views[0], plain, atol=1e-6)
    assert np.allclose(tta, np.mean(views, axis=0), atol=1e-5)
    assert not np.allclose(tta, plain, atol=1e-4)  # the network is not rotation invariant
    assert np.allclose(tta.sum(1), 1.0, atol=1e-5)
    with pytest.raises(CellmorphError, match="tta must be one of none, dihedral"):
        predict(model, InputPipeline(spec.mean, spec.std, 16), cache, rows, 5, tta="flip")


def test_class_weights_balance_classes():
    w = class_weights(np.array([0, 0, 0, 1, 2, 2]), 4)
    assert w.tolist() == pytest.approx([6 / 9, 2.0, 1.0, 0.0])
    counts = np.array([3, 1, 2, 0])
    assert float((w.numpy() * counts).sum()) == pytest.approx(6.0)


def test_compound_weighting_makes_every_compound_of_a_class_weigh_alike():
    labels = np.array([0] * 8 + [0] * 2 + [1] * 2)
    compounds = np.array(["taxol"] * 8 + ["docetaxel"] * 2 + ["other"] * 2)
    by_class = tile_weights(labels, 2, True).numpy()
    np.testing.assert_allclose(by_class, class_weights(labels, 2).numpy()[labels])  # the default: class weights
    w = tile_weights(labels, 2, True, compounds).numpy()
    assert w.sum() == pytest.approx(len(labels))  # the same total as class weighting
    assert w[:8].sum() == pytest.approx(w[8:10].sum())  # taxol's 8 cells weigh as docetaxel's 2
    assert w[:10].sum() == pytest.approx(w[10:].sum())  # and the classes alike
    unbalanced = tile_weights(labels, 2, False, compounds).numpy()
    assert unbalanced[:10].sum() == pytest.approx(10) and unbalanced[:8].sum() == pytest.approx(5)


def test_compound_weighting_changes_training_and_the_default_does_not_move():
    """Per-tile weights taken by the batch's positions: the default (class weights) trains exactly as
    class weights indexed by label did; compound weighting trains another model."""
    cache, labels = _toy()
    cache.index["Metadata_Compound"] = np.where(np.arange(len(labels)) < 40, "a", "b")
    _, h1, p1 = _train(cache, labels, seed=3)
    torch.manual_seed(3)
    model = create_model("test_resnet", 2, init="xavier")
    spec = model_input_spec("test_resnet", 16)
    pipe = InputPipeline(spec.mean, spec.std, spec.size, Augmenter(seed=3))
    settings = TrainSettings(epochs=2, batch_size=8, lr=0.01, compound_weighting=True)
    with deterministic():
        h2 = fit(model, pipe, cache, np.arange(len(labels)), labels, 2, settings, 3, CPU)
    assert [h["loss"] for h in h2] != [h["loss"] for h in h1]


def test_fold_seeds_are_distinct_and_stable():
    a, b = derive_seeds(0, 0), derive_seeds(0, 1)
    assert a == derive_seeds(0, 0)
    assert a != b and len(set(a.values())) == 4
    assert derive_seeds(1, 0) != a


def test_model_input_spec_and_unknown_model():
    assert model_input_spec("resnet50").size == 224
    assert model_input_spec("inception_v3").size == 299
    assert model_input_spec("inception_resnet_v2", 128).size == 128
    with pytest.raises(CellmorphError, match="unknown model"):
        model_input_spec("resnet_5000")


def test_deterministic_context_restores_state():
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic():
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before


def test_freeze_stages_stops_gradients_and_keeps_frozen_statistics():
    from cellmorph.models import freeze_stages, stage_names

    cache, labels = _toy()
    torch.manual_seed(0)
    model = create_model("test_resnet", 2, init="xavier")
    stages = stage_names(model)
    assert stages[0][-1] == "bn1" and all(n.startswith("conv1") for n in stages[0][:-1]) and "fc" in stages[-1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = model_input_spec("test_resnet", 16)
    pipe = InputPipeline(spec.mean, spec.std, spec.size, Augmenter(seed=0))
    settings = TrainSettings(epochs=1, batch_size=8, lr=0.01, freeze_stages=2)  # stem + layer1
    with deterministic():
        fit(model, pipe, cache, np.arange(len(labels)), labels, 2, settings, 0, CPU)
    after = model.state_dict()
    frozen = [k for k in after if k.split(".")[0] in ("conv1", "bn1", "layer1")]
    trained = [k for k in after if k.split(".")[0] in ("layer2", "fc")]
    assert frozen and trained
    for key in frozen:  # weights and BatchNorm running statistics both untouched
        assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    assert not any(p.requires_grad for p in model.layer1.parameters())
    with pytest.raises(CellmorphError, match="at most"):
        freeze_stages(create_model("test_resnet", 2, init="xavier"), len(stages))


def _fit_with(settings, epochs_seed=0):
    cache, labels = _toy()
    torch.manual_seed(0)
    model = create_model("test_resnet", 2, init="xavier")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = model_input_spec("test_resnet", 16)
    pipe = InputPipeline(spec.mean, spec.std, spec.size, Augmenter(seed=0))
    with deterministic():
        fit(model, pipe, cache, np.arange(len(labels)), labels, 2, settings, epochs_seed, CPU)
    return model, before, model.state_dict()


def _changed(before, after, prefix: str, parameters_only: bool, model) -> bool:
    names = {n for n, _ in model.named_parameters()} if parameters_only else set(after)
    return any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix) and k in names)


def test_a_zero_backbone_rate_trains_the_head_alone():
    """Discriminative rates: backbone_lr_scale scales every non-head parameter's rate (0: frozen weights)."""
    model, before, after = _fit_with(TrainSettings(epochs=1, batch_size=8, lr=0.05, backbone_lr_scale=0.0))
    assert _changed(before, after, "fc", True, model)
    for stage in ("conv1", "layer1", "layer2", "layer3", "layer4"):
        assert not _changed(before, after, stage, True, model), stage
    scaled, _, _ = _fit_with(TrainSettings(epochs=1, batch_size=8, lr=0.05, backbone_lr_scale=0.5))
    assert _changed(before, scaled.state_dict(), "layer4", True, scaled)


def test_gradual_unfreezing_opens_one_stage_per_period_from_the_top():
    """Epoch 1: the head alone (the other stages' weights and BatchNorm statistics untouched);
    epoch 2: layer4 too; the stages below stay as they were."""
    model, before, after = _fit_with(TrainSettings(epochs=1, batch_size=8, lr=0.05, unfreeze_every=1))
    assert _changed(before, after, "fc", True, model)
    for stage in ("conv1", "layer1", "layer2", "layer3", "layer4"):
        assert not _changed(before, after, stage, False, model), stage
    model, before, after = _fit_with(TrainSettings(epochs=2, batch_size=8, lr=0.05, unfreeze_every=1))
    assert _changed(before, after, "layer4", False, model)
    for stage in ("conv1", "layer1", "layer2", "layer3"):
        assert not _changed(before, after, stage, False, model), stage
    assert all(p.requires_grad for p in model.layer4.parameters())


def test_the_head_can_start_from_a_linear_probe_of_the_pretrained_features():
    """head_init probe: before any step, the network's softmax on the (un-augmented) training tiles is
    the logistic regression's predict_proba on their pooled features."""
    from cellmorph.cv.probe import fit_probe_head
    from cellmorph.train import init_head_from_probe

    cache, labels = _toy()
    torch.manual_seed(0)
    model = create_model("test_resnet", 2, init="xavier").eval()
    spec = model_input_spec("test_resnet", 16)
    pipe = InputPipeline(spec.mean, spec.std, spec.size).eval()
    rows = np.arange(len(labels))
    init_head_from_probe(model, pipe, cache, rows, labels, 2, True, 0, CPU)
    with torch.no_grad():
        x = pipe(torch.from_numpy(cache.tiles(rows)))
        features = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
        probs = torch.softmax(model(x), 1).numpy()
    probe, scaler = fit_probe_head(features, labels, True, 0)
    np.testing.assert_allclose(probs, probe.predict_proba(scaler.transform(features)), atol=1e-5)
    assert (probs.argmax(1) == labels).mean() > 0.9  # the toy task is linear in these features
    # and the full fit starts from it
    model, before, after = _fit_with(TrainSettings(epochs=1, batch_size=8, lr=0.01, head_init="probe"))
    assert _changed(before, after, "fc", True, model)


def test_autocast_type_names_are_checked_and_the_cpu_never_picks_bf16_by_itself():
    from cellmorph.train import training_autocast_dtype

    assert training_autocast_dtype(CPU) == torch.float16  # amp is off on the CPU anyway: no bf16 guess
    assert training_autocast_dtype(CPU, "bfloat16") == torch.bfloat16
    with pytest.raises(CellmorphError, match="amp_dtype must be one of auto, bfloat16, float16"):
        training_autocast_dtype(CPU, "half")
