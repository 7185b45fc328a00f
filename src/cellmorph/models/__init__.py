"""Backbones: offline-first ImageNet weights and model construction."""

from cellmorph.models.factory import create_model, freeze_stages, load_checkpoint, stage_names, xavier_init_
from cellmorph.models.weights import (
    BACKBONES,
    ResolvedWeights,
    VerifyResult,
    WeightsStatus,
    cellmorph_home,
    default_input_size,
    import_weights,
    list_weights,
    load_pretrained,
    model_preprocessing,
    resolve_weights,
    verify_weights,
    weights_dir,
)

__all__ = [
    "BACKBONES",
    "ResolvedWeights",
    "VerifyResult",
    "WeightsStatus",
    "cellmorph_home",
    "create_model",
    "freeze_stages",
    "default_input_size",
    "import_weights",
    "list_weights",
    "load_checkpoint",
    "load_pretrained",
    "model_preprocessing",
    "resolve_weights",
    "stage_names",
    "verify_weights",
    "weights_dir",
    "xavier_init_",
]
