"""One entry point from a run's settings to a ready network: :func:`build_model`.

It returns a :class:`Network`: the module plus its typed records (:class:`InputSpec` for
the input it takes, :class:`InitRecord` for where its weights came from), so callers
never read settings off attributes of the module or unpack a config into loose arguments.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from cellmorph.errors import CellmorphError, option
from cellmorph.models.factory import create_model
from cellmorph.models.spec import InitRecord, InputSpec


class NetworkSettings(Protocol):
    """What :func:`build_model` reads from a config (a :class:`cellmorph.cv.CVConfig` has these)."""

    model: str
    init: str
    weights: str | None
    allow_network: bool
    image_size: int | None
    drop_rate: float


@dataclass
class Network:
    module: nn.Module
    input: InputSpec
    init: InitRecord


def model_input_spec(name: str, image_size: int | None = None) -> InputSpec:
    """The input ``name``'s ImageNet weights expect, without building it (``image_size`` overrides the size).

    Raises :class:`CellmorphError` (with close matches) for a name timm does not know.
    """
    from cellmorph.models.weights import check_model_name, model_preprocessing

    check_model_name(name)
    return InputSpec.from_record(model_preprocessing(name)).with_size(image_size)


def build_model(settings: NetworkSettings, n_classes: int, in_chans: int = 3) -> Network:
    """A timm backbone with a fresh ``n_classes`` head, initialised as ``settings.init`` says
    (``imagenet`` from offline weights, ``xavier``, or a checkpoint path such as a fold's ``state.pt``).

    The input spec carries the mean/std of the weights actually loaded, the configured
    ``image_size`` (else the model's own) and one mean/std per input channel.
    """
    module = create_model(
        settings.model,
        n_classes,
        init=settings.init,
        weights=None if settings.weights is None else Path(settings.weights),
        allow_network=settings.allow_network,
        in_chans=in_chans,
        drop_rate=getattr(settings, "drop_rate", 0.0),
    )
    spec = module.cellmorph_input.with_size(settings.image_size).with_channels(in_chans)
    return Network(module, spec, module.cellmorph_init)


@contextmanager
def input_size_errors(spec: InputSpec, name: str):
    """Within the block, a network's complaint about its input size becomes one clear line.

    inception_v3 shrinks 16 px to nothing (RuntimeError); a vision transformer asserts its
    patch grid (AssertionError). Wrap only a network's first forward pass: once one batch
    went through, the size is fine and later errors are something else.
    """
    try:
        yield
    except (RuntimeError, AssertionError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CellmorphError(
            f"image size {spec.size} px: {name} cannot take it ({reason[:160]}); choose another {option('image_size')}"
        ) from None


def check_input_size(module: nn.Module, spec: InputSpec, name: str) -> None:
    """Refuse an input size the architecture cannot take, before any output is written:
    one forward pass of a single blank tile."""
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad(), input_size_errors(spec, name):
            module(torch.zeros(1, spec.channels, spec.size, spec.size))
    finally:
        module.train(was_training)
