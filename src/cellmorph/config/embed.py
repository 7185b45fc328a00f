"""What ``cellmorph embed`` computes (:class:`EmbedConfig`), without numpy, pandas or torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cellmorph.config.features import FeatureSpec


class EmbedConfig(BaseModel):
    """What ``cellmorph embed`` computes: the network, its features, and the well profiles."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("tf_efficientnet_lite0", description="timm backbone name")
    init: str = Field("imagenet", description="imagenet | xavier | checkpoint path")
    weights: str | None = Field(None, description="explicit ImageNet weights file")
    allow_network: bool = Field(False, description="allow fetching weights from the hub")
    image_size: int | None = Field(None, ge=16, description="input size (default: 128 px for crops, else the model's)")
    features: FeatureSpec | None = Field(None, description=(
        "which activations, pooled how: head (the backbone's pooled output), or timm feature stages counted from 0 "
        "with their spatial pools, e.g. stage3, stage3+stage4/mean+max, stage3/gem (default: mean-pooled stage3; "
        "stage3+stage4 for crops)"))
    tta: Literal["none", "dihedral"] | None = Field(
        None, description="dihedral: each tile's embedding is the mean over its 8 rotations/mirrors (default for "
        "crops, where it raised cross-plate accuracy on real cells; none for fields: 5-7x the embedding time)")
    batch_size: int = Field(64, ge=1)
    device: str = Field("cpu", description="cpu | cuda")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: see cellmorph.runtime)")
    aggregate: Literal["median", "mean"] = Field("median", description="a well's profile: the median (pycytominer's "
                                                 "default) or the mean of its tiles")
    standardize: Literal["plate", "batch", "all", "none"] | None = Field(
        None, description="wells_normalized.parquet: z-score to the DMSO wells of each plate, batch or all plates "
        "(a plate without DMSO: its batch's); none writes no normalised table (default: batch for crop tables, "
        "plate otherwise)")
    whiten: Literal["none", "spherize", "tvn", "coral"] = Field(
        "none", description="then whiten on DMSO wells: spherize (ZCA), tvn (PCA whitening) or coral (per batch)")
    strength: float | None = Field(None, gt=0, description="whitening regulariser: ridge for spherize/coral (10), "
                                   "components for tvn (100)")
    h5ad: bool = Field(False, description="also write the well (and normalised well) and treatment profiles as "
                       ".h5ad (AnnData: obs the Metadata_* columns, X the features, uns the provenance) for scanpy")
