"""Offline-first ImageNet weights: where they come from, how they are checked, how they load.

One module per concern, each importing only those listed before it:

- :mod:`~cellmorph.models.weights.registry`: the backbones cellmorph knows, their preprocessing
  and their offline sources, as data;
- :mod:`~cellmorph.models.weights.checkpoint`: a weights file's sha256, and reading it without
  executing pickled code;
- :mod:`~cellmorph.models.weights.mapping`: a state dict mapped onto a timm model's keys, strictly;
- :mod:`~cellmorph.models.weights.store`: the user's cache (``$CELLMORPH_HOME/weights``), its
  manifest, and ``cellmorph weights import``;
- :mod:`~cellmorph.models.weights.resolve`: explicit file, cache, package, then (opt-in) hub, and
  loading what was found into a model;
- :mod:`~cellmorph.models.weights.verify`: ``cellmorph weights verify``, the ImageNet photo check.

The private helpers tests replace (``_download_from_hub``, ``_package_file``, ``_prepare_image``)
are not re-exported: a patch must go to the module that calls them (``resolve``, ``verify``), since
rebinding a name in this package changes nothing its modules look up.
"""

from cellmorph.models.weights.checkpoint import (
    extract_state_dict,
    load_state_dict_file,
    require_weights_file,
    sha256_file,
)
from cellmorph.models.weights.mapping import (
    _is_counter,
    classifier_keys,
    detect_layout,
    first_conv_key,
    to_timm_state_dict,
)
from cellmorph.models.weights.registry import (
    BACKBONES,
    IMAGENET_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LAYOUTS,
    TF_INCEPTION_MEAN,
    TF_INCEPTION_STD,
    Backbone,
    PackageSource,
    StateDictLayout,
    check_model_name,
    default_input_size,
    model_preprocessing,
)
from cellmorph.models.weights.resolve import (
    SOURCES,
    ResolvedWeights,
    WeightsStatus,
    list_weights,
    load_pretrained,
    resolve_weights,
)
from cellmorph.models.weights.store import (
    MANIFEST,
    WEIGHT_SUFFIXES,
    cellmorph_home,
    import_weights,
    weights_dir,
)
from cellmorph.models.weights.verify import (
    CAT_CLASSES,
    COFFEE_CLASSES,
    ImageCheck,
    VerifyResult,
    verify_weights,
)

__all__ = [
    "BACKBONES",
    "CAT_CLASSES",
    "COFFEE_CLASSES",
    "IMAGENET_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LAYOUTS",
    "MANIFEST",
    "SOURCES",
    "TF_INCEPTION_MEAN",
    "TF_INCEPTION_STD",
    "WEIGHT_SUFFIXES",
    "Backbone",
    "ImageCheck",
    "PackageSource",
    "ResolvedWeights",
    "StateDictLayout",
    "VerifyResult",
    "WeightsStatus",
    "_is_counter",
    "cellmorph_home",
    "check_model_name",
    "classifier_keys",
    "default_input_size",
    "detect_layout",
    "extract_state_dict",
    "first_conv_key",
    "import_weights",
    "list_weights",
    "load_pretrained",
    "load_state_dict_file",
    "model_preprocessing",
    "require_weights_file",
    "resolve_weights",
    "sha256_file",
    "to_timm_state_dict",
    "verify_weights",
    "weights_dir",
]
