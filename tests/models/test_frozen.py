"""FrozenSplit: the frozen prefix and the trainable tail reproduce the whole network."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from cellmorph.errors import CellmorphError
from cellmorph.models import freeze_stages
from cellmorph.models.frozen import FrozenSplit, frozen_roots


@pytest.mark.parametrize(
    ("name", "stages", "cut"),
    [("tf_efficientnet_lite0", 4, "blocks.2"), ("resnet18", 2, "layer1"), ("mobilenetv2_100", 3, "blocks.1")],
)
def test_tail_of_prefix_equals_the_model(name, stages, cut):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5)
    freeze_stages(model, stages)
    x = torch.randn(3, 3, 64, 64)
    split = FrozenSplit(model, x[:2])
    assert split.cut == cut
    assert split.feature_shape == tuple(split.prefix(x).shape[1:])
    model.eval()
    with torch.no_grad():
        whole = model(x)
        rebuilt = split.tail(split.prefix(x))
    torch.testing.assert_close(rebuilt, whole, rtol=1e-4, atol=1e-5)
    # The model is whole again after the tail ran.
    assert type(model.get_submodule(cut)).__name__ == "Sequential"
    with torch.no_grad():
        torch.testing.assert_close(model(x), whole)
    # Training through the tail reaches every trainable parameter and no frozen one.
    model.train()
    split.tail(split.prefix(x)).sum().backward()
    for pname, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, pname


def test_signature_follows_the_frozen_weights():
    model = timm.create_model("resnet18", num_classes=3)
    freeze_stages(model, 2)
    x = torch.randn(2, 3, 32, 32)
    first = FrozenSplit(model, x).signature
    assert FrozenSplit(model, x).signature == first
    with torch.no_grad():
        model.fc.weight.add_(1.0)  # trainable: not part of the cached features
    assert FrozenSplit(model, x).signature == first
    with torch.no_grad():
        model.conv1.weight.add_(1.0)
    assert FrozenSplit(model, x).signature != first


class _SkipAcrossTheCut(nn.Module):
    """The input reaches the head around the frozen stem: its output alone is not enough."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)) + x.mean())


def test_a_network_that_bypasses_the_cut_is_refused():
    model = _SkipAcrossTheCut()
    model.stem.requires_grad_(False)
    assert frozen_roots(model) == ["stem"]
    with pytest.raises(CellmorphError, match="cannot be cached"):
        FrozenSplit(model, torch.randn(2, 3, 8, 8) + 1.0)


def test_nothing_frozen_is_refused():
    with pytest.raises(CellmorphError, match="no frozen stages"):
        FrozenSplit(timm.create_model("resnet18", num_classes=2), torch.randn(2, 3, 32, 32))


def test_trainable_or_random_layers_before_the_cut_are_refused():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=2)
    freeze_stages(model, 2)
    model.layer1[0].conv1.weight.requires_grad_(True)  # trainable, inside the frozen prefix
    with pytest.raises(CellmorphError, match="'layer1.0.conv1' runs before the frozen stages end at 'layer1.1' but is trainable"):
        FrozenSplit(model, torch.randn(2, 3, 32, 32))
    noisy = timm.create_model("resnet18", num_classes=2, drop_path_rate=0.2)
    freeze_stages(noisy, 3)
    with pytest.raises(CellmorphError, match="random in training"):
        FrozenSplit(noisy, torch.randn(2, 3, 32, 32))
