"""Build a timm backbone with a fresh classifier, initialised from ImageNet, Glorot, or a checkpoint.

Every model is created with ``timm.create_model(name, pretrained=False, ...)``: weights never come
from a hidden download. ImageNet weights go through :func:`cellmorph.models.weights.resolve_weights`
(explicit file, cache, installed package, then the hub only with ``allow_network=True``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cellmorph.errors import CellmorphError, option
from cellmorph.models.spec import InitRecord, InputSpec
from cellmorph.models.weights import (
    _is_counter,
    check_model_name,
    classifier_keys,
    extract_state_dict,
    load_pretrained,
    load_state_dict_file,
    model_preprocessing,
    resolve_weights,
)

INITS = ("imagenet", "xavier")
_ARCH_KEYS = ("model_name", "arch", "backbone", "architecture", "model")


def create_model(
    name: str,
    num_classes: int,
    init: str = "imagenet",
    weights: Path | None = None,
    allow_network: bool = False,
    in_chans: int = 3,
    drop_rate: float = 0.0,
) -> torch.nn.Module:
    """A timm ``name`` with a fresh ``num_classes`` head.

    ``init``: ``"imagenet"`` (pretrained backbone, ImageNet head dropped), ``"xavier"`` (the
    paper's baseline: Glorot-uniform conv/linear weights, zero biases, reset batch norm), or the
    path of a cellmorph checkpoint / plain state dict for this architecture (only the classifier
    may differ in shape; it then stays freshly initialised).

    The returned module carries two typed records: ``model.cellmorph_init`` (an
    :class:`InitRecord`: init, source, path, sha256) and ``model.cellmorph_input`` (the
    :class:`InputSpec` of the weights actually loaded: their mean, std and native size).
    """
    import timm

    check_model_name(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise CellmorphError(f"num_classes must be a positive integer, got {num_classes!r}")
    if in_chans < 1:
        raise CellmorphError(f"in_chans must be positive, got {in_chans!r}")
    init_s = str(init)
    checkpoint: Path | None = None
    if init_s not in INITS:
        checkpoint = Path(init_s).expanduser()
        if checkpoint.is_dir():
            raise CellmorphError(f"init {init_s}: is a directory, expected 'imagenet', 'xavier' or a checkpoint file")
        if not checkpoint.is_file():
            raise CellmorphError(
                f"init must be 'imagenet', 'xavier' or a checkpoint file; {init_s!r} is neither (file not found)"
            )
    if weights is not None and init_s != "imagenet":
        raise CellmorphError(f"{option('weights')} applies only to init=imagenet (got init={init_s!r})")

    resolved = resolve_weights(name, weights, allow_network) if init_s == "imagenet" else None

    model = timm.create_model(
        name, pretrained=False, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate
    )
    pre = model_preprocessing(name)
    info: dict = {"init": init_s, "model": name, "num_classes": num_classes, "in_chans": in_chans}
    if resolved is not None:
        load_pretrained(model, resolved, include_classifier=False)
        pre = resolved.preprocessing()
        info.update(source=resolved.source, path=str(resolved.path), sha256=resolved.sha256)
    elif init_s == "xavier":
        xavier_init_(model)
    else:
        assert checkpoint is not None
        info.update(load_checkpoint(model, checkpoint, name))
    model.cellmorph_init = InitRecord(**info)
    model.cellmorph_input = InputSpec.from_record(pre)
    return model


def xavier_init_(model: nn.Module) -> nn.Module:
    """Glorot-uniform on every conv/linear weight, zero biases, batch norm reset (weight 1, bias 0, stats)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._NormBase):
                if m.track_running_stats:
                    m.reset_running_stats()
                if m.affine:
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
    return model


def load_checkpoint(model: nn.Module, path: Path, name: str) -> dict:
    """Load a cellmorph checkpoint or plain state dict into ``model`` (``weights_only=True``).

    All keys and shapes must match except the classifier: a classifier of another shape (e.g. a
    different number of classes) is left freshly initialised. Returns the source fields of its :class:`InitRecord`.
    """
    from cellmorph.models.weights import sha256_file

    obj = load_state_dict_file(path)
    if isinstance(obj, dict):
        for key in _ARCH_KEYS:
            arch = obj.get(key)
            if isinstance(arch, str) and arch != name:
                raise CellmorphError(f"{path}: checkpoint is for {arch!r}, not {name!r}")
    sd = extract_state_dict(obj, str(path))
    target = model.state_dict()
    head = set(classifier_keys(model))
    missing = [k for k in target if k not in sd and not _is_counter(k) and k not in head]
    unexpected = [k for k in sd if k not in target and not _is_counter(k) and k not in head]
    if missing or unexpected:
        raise CellmorphError(
            f"{path}: does not fit {name!r}: {len(missing)} missing key(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:3]}"
        )
    body = {}
    for k, v in sd.items():
        if k in head or k not in target:
            continue
        if tuple(v.shape) != tuple(target[k].shape):
            raise CellmorphError(
                f"{path}: {k} has shape {tuple(v.shape)}, {name} expects {tuple(target[k].shape)} "
                "(only the classifier may differ)"
            )
        body[k] = v
    head_ok = bool(head) and all(k in sd and tuple(sd[k].shape) == tuple(target[k].shape) for k in head)
    if head_ok:
        body.update({k: sd[k] for k in head})
    model.load_state_dict(body, strict=False)
    return {
        "source": "checkpoint",
        "path": str(path),
        "sha256": sha256_file(path),
        "classifier": "loaded" if head_ok else "fresh (shape differs or absent in checkpoint)",
    }


def stage_names(model: nn.Module) -> list[list[str]]:
    """Module names of each coarse stage of a timm model, input side first (stage 0 is the stem).

    Uses timm's own ``group_matcher(coarse=True)``, the grouping timm uses for layer-wise
    learning-rate decay, so the stages are those the architecture defines (ResNet: stem,
    layer1..4, head; EfficientNet: stem, blocks.0..6, head).
    """
    from timm.models import group_modules

    if not hasattr(model, "group_matcher"):
        raise CellmorphError(f"{type(model).__name__} does not declare its stages; freeze_stages needs a timm model")
    groups = group_modules(model, model.group_matcher(coarse=True))
    return [list(names) for _, names in sorted(groups.items())]


def network_from_weights(name: str, n_classes: int, in_chans: int, weights: dict, drop_rate: float = 0.0,
                         classifier: bool = True) -> torch.nn.Module:
    """``name``'s network with ``weights`` (a fold's or a bundle's state dict), in eval mode: the one way a saved
    network is rebuilt. Built with init xavier, which draws nothing from anywhere (no download) before the weights
    replace it. ``classifier=False``: a backbone saved without its classifier (a linear probe's)."""
    module = create_model(name, n_classes if classifier else 1, init="xavier", in_chans=in_chans, drop_rate=drop_rate)
    if not classifier:
        module.reset_classifier(0)
    module.load_state_dict(weights)
    return module.eval()


def freeze_stages(model: nn.Module, n: int) -> list[nn.Module]:
    """Freeze the stem and the following stages, ``n`` coarse stages in all (0 = nothing).

    Frozen parameters stop requiring gradients, so backpropagation ends at the first
    trainable stage: on CPU the early, high-resolution stages dominate the cost, which is
    why freezing them pays (see benchmarks/RESULTS.md). Their BatchNorm layers are returned
    so the training loop can keep them in eval mode (ImageNet running statistics, not
    this batch's). The classifier head can never be frozen.
    """
    if n <= 0:
        return []
    stages = stage_names(model)
    if n > len(stages) - 2:  # the last group holds the classifier; keep at least one stage trainable before it
        raise CellmorphError(
            f"freeze_stages={n}: {type(model).__name__} has {len(stages)} stages including the stem and the head; "
            f"at most {len(stages) - 2} can be frozen"
        )
    names = {name for stage in stages[:n] for name in stage}
    modules = dict(model.named_modules())
    norms = []
    for name in sorted(names):
        module = modules.get(name)
        if module is None:
            continue
        for sub in module.modules():
            for p in sub.parameters(recurse=False):
                p.requires_grad_(False)
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                norms.append(sub)
    model.cellmorph_frozen_norms = norms
    return norms
