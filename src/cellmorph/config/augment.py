"""Augmentation settings (:class:`AugmentConfig`) and test-time augmentation modes, without torch
(:mod:`cellmorph.augment` applies them)."""

from __future__ import annotations

import math
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field


class AugmentConfig(BaseModel):
    """Augmentation settings; defaults reproduce the paper."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    dihedral: bool = Field(True, description="random rotation by k·90° and mirror (8 transforms)")
    jitter: float = Field(0.25, ge=0.0, lt=1.0, description="per-channel intensity scale change ±jitter")
    jitter_p: float = Field(0.5, ge=0.0, le=1.0, description="probability a channel is jittered")
    blur_p: float = Field(0.5, ge=0.0, le=1.0, description="probability of a box blur")
    blur_size: int = Field(3, ge=1, description="box blur kernel size (odd)")
    noise_p: float = Field(0.5, ge=0.0, le=1.0, description="probability of additive Gaussian noise")
    noise_std: float = Field(math.sqrt(50.0), ge=0.0, description="noise σ in 8-bit grey levels (paper: √50)")


# Test-time augmentation at prediction: "dihedral" averages a tile's softmax over its dihedral views.
TTAMode = Literal["none", "dihedral"]
TTA_MODES: tuple[str, ...] = get_args(TTAMode)
