"""Backbones: offline-first ImageNet weights, model construction and frozen stages."""

from cellmorph.models.build import Network, build_model, check_input_size, input_size_errors, model_input_spec
from cellmorph.models.factory import (
    create_model,
    freeze_stages,
    load_checkpoint,
    network_from_weights,
    stage_names,
    xavier_init_,
)
from cellmorph.models.spec import InitRecord, InputSpec
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
    "InitRecord",
    "InputSpec",
    "Network",
    "ResolvedWeights",
    "VerifyResult",
    "WeightsStatus",
    "build_model",
    "cellmorph_home",
    "check_input_size",
    "create_model",
    "default_input_size",
    "freeze_stages",
    "import_weights",
    "input_size_errors",
    "list_weights",
    "load_checkpoint",
    "load_pretrained",
    "model_input_spec",
    "model_preprocessing",
    "network_from_weights",
    "resolve_weights",
    "stage_names",
    "verify_weights",
    "weights_dir",
    "xavier_init_",
]
