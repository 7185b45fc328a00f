"""create_model: fresh heads on ImageNet backbones, the Glorot baseline, checkpoint round trips."""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from cellmorph.errors import CellmorphError
from cellmorph.models import InputSpec, create_model, load_pretrained, resolve_weights
from cellmorph.models import weights as W

LITE0 = "tf_efficientnet_lite0"
MOBILE = "mobilenetv2_100"


@pytest.fixture
def offline(tmp_path, monkeypatch, no_network):
    """An isolated, empty weights cache, with every network path trapped (conftest's no_network)."""
    monkeypatch.setenv("CELLMORPH_HOME", str(tmp_path / "cmhome"))
    return no_network


def imagenet_body(name: str) -> dict:
    ref = timm.create_model(name, pretrained=False)
    load_pretrained(ref, resolve_weights(name), include_classifier=True)
    return ref.state_dict()


def test_imagenet_init_has_fresh_head(offline):
    model = create_model(LITE0, num_classes=12)
    assert model.get_classifier().out_features == 12
    model.eval()
    with torch.inference_mode():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 12)
    ref = imagenet_body(LITE0)
    got = model.state_dict()
    body = [k for k in ref if not k.startswith("classifier.")]
    assert all(torch.equal(got[k], ref[k]) for k in body)
    # head: timm's own init for a new Linear (zero bias), not ImageNet's
    assert torch.count_nonzero(got["classifier.bias"]) == 0
    assert model.cellmorph_init.source == "package"
    # Lite0's own preprocessing (0.5/0.5), not timm's ImageNet default, travels with the model.
    assert model.cellmorph_input == InputSpec(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_imagenet_init_with_1000_classes_still_drops_head(offline):
    model = create_model(MOBILE, num_classes=1000)
    ref = imagenet_body(MOBILE)
    assert not torch.equal(model.state_dict()["classifier.weight"], ref["classifier.weight"])
    assert torch.equal(model.state_dict()["conv_stem.weight"], ref["conv_stem.weight"])


def test_imagenet_init_other_channel_count(offline):
    model = create_model(MOBILE, num_classes=4, in_chans=5, drop_rate=0.2)
    assert model.conv_stem.weight.shape == (32, 5, 3, 3)
    assert model.drop_rate == 0.2
    with torch.inference_mode():
        assert model.eval()(torch.randn(1, 5, 96, 96)).shape == (1, 4)


def test_xavier_init_reinitialises_everything(offline):
    model = create_model(MOBILE, num_classes=6, init="xavier")
    ref = imagenet_body(MOBILE)
    got = model.state_dict()
    assert not torch.equal(got["conv_stem.weight"], ref["conv_stem.weight"])
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
            assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)
            assert int(m.num_batches_tracked) == 0
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight
            fan_in = w.shape[1] * w[0, 0].numel()
            fan_out = w.shape[0] * w[0, 0].numel()
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert w.abs().max() <= bound + 1e-6
            if w.numel() > 50_000:  # big enough for a tight std estimate
                assert abs(w.std().item() - bound / math.sqrt(3)) < 0.03 * bound / math.sqrt(3)
            if m.bias is not None:
                assert torch.count_nonzero(m.bias) == 0
    head = model.get_classifier()
    assert head.out_features == 6 and torch.count_nonzero(head.bias) == 0
    assert model.cellmorph_init.init == "xavier"


def test_checkpoint_round_trip(offline, tmp_path):
    model = create_model(LITE0, num_classes=5)
    with torch.no_grad():
        model.get_classifier().weight.add_(1.0)
        model.bn2.running_mean.add_(0.5)
    ckpt = tmp_path / "run" / "best.pt"
    ckpt.parent.mkdir()
    # the layout cellmorph.cv.rundir writes (folds/<k>/state.pt)
    torch.save(
        {"model": model.state_dict(), "model_name": LITE0, "classes": ["a", "b"], "fold": {"index": 0},
         "seeds": {"torch": 1}, "input": {"mean": [0.5] * 3, "input_size": 224}, "history": [{"loss": 1.0}]},
        ckpt,
    )

    again = create_model(LITE0, num_classes=5, init=str(ckpt))
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in again.state_dict().items())
    assert again.cellmorph_init.classifier == "loaded"

    plain = tmp_path / "plain.pth"
    torch.save(model.state_dict(), plain)
    other = create_model(LITE0, num_classes=3, init=plain)  # other head size: allowed, head stays fresh
    got = other.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want if not k.startswith("classifier."))
    assert got["classifier.weight"].shape == (3, 1280)
    assert other.cellmorph_init.classifier.startswith("fresh")


def test_checkpoint_mismatches_are_refused(offline, tmp_path):
    sd = create_model(MOBILE, num_classes=5, init="xavier").state_dict()
    f = tmp_path / "m.pth"
    torch.save({"model_name": MOBILE, "state_dict": sd}, f)
    with pytest.raises(CellmorphError, match=f"checkpoint is for '{MOBILE}', not '{LITE0}'"):
        create_model(LITE0, num_classes=5, init=str(f))
    bad = dict(sd)
    bad["conv_head.weight"] = torch.zeros(1280, 321, 1, 1)
    torch.save(bad, f)
    with pytest.raises(CellmorphError, match=r"conv_head.weight has shape .*only the classifier may differ"):
        create_model(MOBILE, num_classes=5, init=str(f))
    del bad["conv_head.weight"]
    torch.save(bad, f)
    with pytest.raises(CellmorphError, match="1 missing key"):
        create_model(MOBILE, num_classes=5, init=str(f))


def test_checkpoint_with_code_is_refused(offline, tmp_path):
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    f = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "x": Evil()}, f)
    try:
        with pytest.raises(CellmorphError, match="refused: the file holds pickled code"):
            create_model(MOBILE, num_classes=2, init=str(f))
        assert not marker.exists()
    finally:
        if marker.exists():
            marker.unlink()


def test_bad_arguments(offline, tmp_path):
    with pytest.raises(CellmorphError, match=r"unknown model 'mobilenetv2_10O'.*mobilenetv2_100"):
        create_model("mobilenetv2_10O", num_classes=2)
    with pytest.raises(CellmorphError, match="init must be 'imagenet', 'xavier' or a checkpoint"):
        create_model(MOBILE, num_classes=2, init="glorot")
    with pytest.raises(CellmorphError, match="^weights applies only to init=imagenet"):
        create_model(MOBILE, num_classes=2, init="xavier", weights=tmp_path / "w.pth")
    with pytest.raises(CellmorphError, match="num_classes"):
        create_model(MOBILE, num_classes=0)


def test_resnet50_offline_without_weights_is_one_clear_error(offline):
    with pytest.raises(CellmorphError, match=r"no ImageNet weights for 'resnet50'.*--online"):
        create_model("resnet50", num_classes=12)
    model = create_model("resnet50", num_classes=12, init="xavier")  # the paper's baseline needs no weights
    assert model.fc.out_features == 12 and model.cellmorph_input.size == 224


def test_explicit_weights_file(offline, tmp_path):
    src = timm.create_model("resnet18", pretrained=False)
    f = tmp_path / "r18.pth"
    torch.save(src.state_dict(), f)
    model = create_model("resnet18", num_classes=3, weights=f)
    assert torch.equal(model.conv1.weight, src.conv1.weight)
    assert model.cellmorph_init.source == "path" and model.cellmorph_init.sha256 == W.sha256_file(f)
