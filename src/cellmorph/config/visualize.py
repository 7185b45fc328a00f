"""How ``cellmorph visualize filters`` makes filter images (:class:`FilterConfig`), without torch."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_LAYERS = ("stage1", "stage2", "stage3")
_MODULE_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


# --------------------------------------------------------------------------- settings
class FilterConfig(BaseModel):
    """How filter images are made: which layers and filters, and the gradient ascent's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: tuple[str, ...] = Field(DEFAULT_LAYERS, description="timm feature stages (stage0 … stageK, counted as "
                                    "--features counts them) or module paths (layer3, blocks.4), comma-separated")
    filters: int = Field(6, ge=1, le=64, description="filters per layer, spread evenly over its channels")
    size: int = Field(128, ge=16, le=1024, description="image side in px")
    steps: int = Field(128, ge=1, le=10_000, description="gradient-ascent steps")
    lr: float = Field(0.05, gt=0, description="Adam learning rate, in the network's normalised input space")
    seed: int = Field(0, ge=0, description="seed of the start image and the jitter")
    jitter: int = Field(4, ge=0, description="random shift of the image before each step, in px (0: none)")
    blur_every: int = Field(4, ge=0, description="blur the image every this many steps (0: never)")
    blur_sigma: float = Field(0.5, ge=0, description="standard deviation of that Gaussian blur, in px")
    l2: float = Field(1e-3, ge=0, description="weight of the L2 penalty on the normalised image")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: as cv chooses them)")

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, value):
        if isinstance(value, str):
            value = [part for part in value.replace(" ", "").split(",") if part]
        layers = tuple(str(v).strip() for v in value)
        if not layers:
            raise ValueError("give at least one layer (e.g. stage2,stage3)")
        bad = [v for v in layers if not _MODULE_PATH.match(v)]
        if bad:
            raise ValueError(f"{bad[0]!r} is neither a stage (stage3) nor a module path (layer3.1, blocks.4)")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers repeat: {list(layers)}")
        return layers
