"""Which activations of a backbone become a profile (:class:`FeatureSpec`), as a setting: no torch here, so
configs and the command line read it without loading networks (:mod:`cellmorph.models.features` computes it)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cellmorph.errors import validated

Pool = Literal["mean", "max", "gem"]
HEAD = "head"
GEM_P = 3.0
_STAGE = re.compile(r"^stage(\d+)$")


class FeatureSpec(BaseModel):
    """Layers (``"head"`` or stage numbers) and the spatial pools applied to each stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: Literal["head"] | tuple[int, ...] = Field(
        HEAD, description="head (the backbone's pooled output) or timm feature-stage numbers, from 0")
    pool: tuple[Pool, ...] = Field(("mean",), description="spatial pools of each stage, concatenated: "
                                   "mean, max, gem (generalised mean, p = 3); the head is pooled by the backbone")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value):
        """``"stage3+stage4/mean+max"`` (or ``"head"``), the form :meth:`describe` writes."""
        if isinstance(value, str):
            layers, _, pool = value.partition("/")
            return {"layers": layers, "pool": pool or "mean"}
        return value

    @field_validator("layers", mode="before")
    @classmethod
    def _stages(cls, value):
        if isinstance(value, str):
            if value == HEAD:
                return value
            value = _parse_layers(value)
        stages = tuple(int(v) for v in value)
        if not stages or min(stages) < 0 or len(set(stages)) != len(stages):
            raise ValueError(f"stage numbers must be distinct and at least 0, got {list(value)}")
        return stages

    @field_validator("pool", mode="before")
    @classmethod
    def _pools(cls, value):
        pools = tuple(p for p in value.split("+")) if isinstance(value, str) else tuple(value)
        if not pools or len(set(pools)) != len(pools):
            raise ValueError(f"pools must be distinct and at least one, got {value!r}")
        return pools

    @classmethod
    def parse(cls, text: str) -> "FeatureSpec":
        """``"head"``, ``"stage3"`` or ``"stage3+stage4"``, optionally followed by ``/`` and the pools:
        ``mean`` (the default), ``max``, ``gem`` or a ``+``-joined combination (``stage3/mean+max``)."""
        layers, _, pool = str(text).partition("/")
        return validated(cls, {"layers": layers, "pool": pool or "mean"}, "features")

    @property
    def is_head(self) -> bool:
        return self.layers == HEAD

    def describe(self) -> str:
        """``head`` or e.g. ``stage3+stage4/mean+max``: how run directories and embeddings name it."""
        if self.is_head:
            return HEAD
        return "+".join(f"stage{k}" for k in self.layers) + "/" + "+".join(self.pool)

    def record(self) -> dict:
        return {"layers": HEAD if self.is_head else list(self.layers), "pool": list(self.pool),
                "name": self.describe()}


# The default profile of `embed` and of the linear probe: mean-pooled timm feature stage 3. On
# real BBBC021 single-cell crops (LOCO over 38 compounds, issue 19), frozen ImageNet Lite0 scored
# 0.689 treatment accuracy with stage 3 at 128 px and 0.660 with stage 4 at 224 px, against
# 0.466–0.505 for the head features (1,280-d) used before, and 0.64–0.65 against 0.49 for NSC
# matching of embed's profiles. No real full-field data here can confirm it for BBBC021 fields.
DEFAULT_FEATURES = FeatureSpec(layers=(3,))


def _parse_layers(text: str) -> tuple[int, ...]:
    stages = []
    for part in text.replace(" ", "").split("+"):
        match = _STAGE.match(part)
        if not match:
            raise ValueError(f"{text!r}: expected head, or stages such as stage3 or stage3+stage4")
        stages.append(int(match.group(1)))
    return tuple(stages)
