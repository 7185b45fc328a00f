"""Backbones: offline-first ImageNet weights and model construction."""

from cellmorph.models.factory import create_model, load_checkpoint, xavier_init_
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
    "default_input_size",
    "import_weights",
    "list_weights",
    "load_checkpoint",
    "load_pretrained",
    "model_preprocessing",
    "resolve_weights",
    "verify_weights",
    "weights_dir",
    "xavier_init_",
]
