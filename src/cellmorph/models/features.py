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

import torch
from torch import nn

from cellmorph.config.features import DEFAULT_FEATURES, GEM_P, HEAD, FeatureSpec, Pool  # noqa: F401
from cellmorph.errors import CellmorphError, option


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
                                     f"use {option('features')} head")
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
