"""Which activations of a backbone become a profile: the head, one stage, or several, pooled.

::

    spec = FeatureSpec.parse("stage3+stage4/mean+max")
    extractor = FeatureExtractor(model, spec)   # model: a timm network, classifier removed
    profiles = extractor(x)                      # (n, 2 × (112 + 320)) for tf_efficientnet_lite0

``head`` is the backbone's own pooled output before the classifier (1,280 values for
EfficientNet-Lite0), what ``embed`` and ``--mode linear-probe`` used until now. ``stageK`` is the
output of timm's K-th feature stage (``model.feature_info[K]``, counted from 0, as
``features_only``/``out_indices`` count them), read with timm's ``forward_intermediates`` and
pooled over space by the mean, the max or the generalised mean (GeM, p = 3, of the positive
part: a stage ending in a linear bottleneck, as EfficientNet's do, has negative outputs too).
Several stages and pools are concatenated in the order given.

Why stages at all: on real BBBC021 single-cell crops, mean-pooled intermediate stages of
ImageNet Lite0 matched MoAs better than the head features (LOCO treatment accuracy 0.66–0.69
against 0.47–0.51; issue 19), as DeepProfiler also profiles from an intermediate block.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from cellmorph.errors import CellmorphError

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
        from cellmorph.errors import validated

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


def _pool(maps: torch.Tensor, how: str) -> torch.Tensor:
    if how == "mean":
        return maps.mean(dim=(2, 3))
    if how == "max":
        return maps.amax(dim=(2, 3))
    return maps.clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P)


class FeatureExtractor(nn.Module):
    """``model`` (a timm network whose classifier was removed) → (n, d) profiles of ``spec``."""

    def __init__(self, model: nn.Module, spec: FeatureSpec, model_name: str = "") -> None:
        super().__init__()
        self.model, self.spec = model, spec
        if not spec.is_head:
            name = model_name or type(model).__name__
            if not hasattr(model, "forward_intermediates") or not getattr(model, "feature_info", None):
                raise CellmorphError(f"features {spec.describe()}: {name} has no timm feature stages; "
                                     "use --features head")
            stages = len(model.feature_info)
            beyond = [k for k in spec.layers if k >= stages]
            if beyond:
                raise CellmorphError(f"features {spec.describe()}: {name} has stages 0–{stages - 1} "
                                     f"({', '.join(str(i['num_chs']) for i in model.feature_info)} channels)")

    @property
    def dim(self) -> int | None:
        """Profile length, where the stages say it without a forward pass (None for the head)."""
        if self.spec.is_head:
            return None
        return sum(self.model.feature_info[k]["num_chs"] for k in self.spec.layers) * len(self.spec.pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.is_head:
            return self.model(x)
        order = sorted(self.spec.layers)
        maps = self.model.forward_intermediates(x, indices=order, intermediates_only=True, stop_early=True)
        by_stage = dict(zip(order, maps))
        return torch.cat([_pool(by_stage[k], how) for k in self.spec.layers for how in self.spec.pool], dim=1)
