"""Model construction, the training loop of one fold, and prediction.

SGD with momentum and class-weighted cross-entropy (Keras-style: each sample's
loss is multiplied by its class weight n / (k · n_c) and averaged over the batch,
as in the authors' ``class_weight``). On CUDA: mixed precision + channels-last;
on CPU: fp32. Every random draw comes from seeds handed in by the caller, and
:func:`deterministic` switches PyTorch to deterministic kernels, so a fold's
result depends only on its seed and data.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cellmorph.augment import TTA_MODES, dihedral
from cellmorph.datasets import InputPipeline, batch_order, iterate_batches
from cellmorph.errors import CellmorphError
from cellmorph.models.factory import freeze_stages
from cellmorph.models.split import FrozenSplit

# --------------------------------------------------------------------------- models
def model_spec(name: str, image_size: int | None = None) -> dict:
    """{"mean", "std", "input_size"} the ImageNet weights of ``name`` expect; ``image_size`` overrides the size.

    Raises :class:`CellmorphError` (with close matches) for a name timm does not know.
    """
    from cellmorph.models import model_preprocessing
    from cellmorph.models.weights import check_model_name

    check_model_name(name)
    spec = dict(model_preprocessing(name))
    return _normalised_spec(spec, image_size)


def _normalised_spec(spec: dict, image_size: int | None) -> dict:
    size = spec.get("input_size")
    if isinstance(size, (tuple, list)):
        size = int(size[-1])
    return {
        "mean": [float(v) for v in spec["mean"]],
        "std": [float(v) for v in spec["std"]],
        "input_size": int(image_size) if image_size else int(size),
    }


def create_network(
    name: str,
    num_classes: int,
    init: str = "imagenet",
    weights: str | None = None,
    allow_network: bool = False,
    in_chans: int = 3,
) -> nn.Module:
    """A timm backbone with a fresh ``num_classes`` head, via :func:`cellmorph.models.create_model`
    (init ``imagenet`` from offline weights, ``xavier``, or a checkpoint path such as a fold's ``state.pt``)."""
    from cellmorph.models import create_model

    return create_model(
        name, num_classes, init=init, weights=None if weights is None else Path(weights),
        allow_network=allow_network, in_chans=in_chans,
    )


def network_spec(model: nn.Module, fallback: dict, image_size: int | None = None) -> dict:
    """Mean/std recorded by ``create_model`` for the weights actually loaded (else ``fallback``)."""
    info = getattr(model, "cellmorph_init", None) or {}
    spec = dict(fallback)
    if info.get("mean") and info.get("std"):
        spec.update(mean=info["mean"], std=info["std"])
    if not image_size and info.get("input_size"):
        spec["input_size"] = info["input_size"]
    return _normalised_spec(spec, image_size)


# --------------------------------------------------------------------------- determinism
@contextmanager
def deterministic(enabled: bool = True):
    """Deterministic kernels (warn-only where none exists); restores the previous state."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous_cudnn


def derive_seeds(seed: int, fold: int) -> dict[str, int]:
    """Independent seeds for one fold (init, shuffle, augmentation, subsampling)."""
    ss = np.random.SeedSequence([int(seed), int(fold)])
    init, shuffle, augment, subsample = (int(v) for v in ss.generate_state(4, dtype=np.uint32))
    return {"init": init, "shuffle": shuffle, "augment": augment, "subsample": subsample}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CellmorphError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


# --------------------------------------------------------------------------- training
@dataclass
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    class_weighting: bool = True
    mode: str = "finetune"
    num_workers: int = 0
    eval_batch_size: int | None = None
    amp: bool | None = None
    channels_last: bool = True
    freeze_stages: int = 0


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """n / (k · n_c) for the k classes present; 0 for a class with no training tiles."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def _lr_at(settings: TrainSettings, epoch: int) -> float:
    if settings.lr_schedule == "cosine" and settings.epochs > 1:
        return 0.5 * settings.lr * (1.0 + math.cos(math.pi * epoch / settings.epochs))
    return settings.lr


def _trainable(model: nn.Module, mode: str) -> list[nn.Parameter]:
    if mode == "finetune":
        return [p for p in model.parameters() if p.requires_grad]
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if head is None or not any(True for _ in head.parameters()):
        raise CellmorphError("mode 'linear' needs a model with a separate classifier head")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    return list(head.parameters())


@dataclass
class FrozenFeatures:
    """The frozen stages' output for augmented copies of tiles, computed once and shared by folds.

    ``array[v, i]`` is copy ``v`` (its own draw of the training augmentation) of cache row
    ``rows[i]`` after the frozen stages (float32). :func:`fit` gives each tile a
    different copy in every epoch, so with as many copies as epochs a fold sees the same
    augmentation distribution as when augmenting on the fly; only the draws are shared
    between folds. ``signature`` identifies the frozen weights the features belong to.
    """

    array: np.ndarray  # (copies, n, C, h, w); may be a read-only memmap
    rows: np.ndarray
    signature: str

    def __post_init__(self) -> None:
        self.position = {int(r): i for i, r in enumerate(self.rows)}

    @property
    def copies(self) -> int:
        return int(self.array.shape[0])


def example_batch(pipeline: InputPipeline, cache, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Two un-augmented, model-ready tiles: the probe input of :class:`FrozenSplit`."""
    was_training = pipeline.training
    pipeline.to(device).eval()
    try:
        return pipeline(torch.from_numpy(cache.tiles(np.asarray(rows[:2]))))
    finally:
        pipeline.train(was_training)


@torch.inference_mode()
def compute_frozen_features(
    split: FrozenSplit,
    pipeline: InputPipeline,
    cache,
    rows: np.ndarray,
    out: np.ndarray,
    batch_size: int,
    device: torch.device,
    channels_last: bool = True,
    on_batch: Callable[[], None] | None = None,
) -> np.ndarray:
    """Fill ``out`` (copies, len(rows), C, h, w) with the frozen stages' output of augmented tiles.

    Copy after copy, tiles in ``rows`` order: the augmentation draws depend only on the
    pipeline's seed. The network runs in eval mode (frozen BatchNorm keeps its running
    statistics, as during training); the pipeline runs in training mode (augmentation on).
    """
    split.model.to(device)
    if channels_last:
        split.model.to(memory_format=torch.channels_last)
    pipeline.to(device).train()
    for copy in range(out.shape[0]):
        for tiles, positions in iterate_batches(cache, rows, batch_size, None, pin_memory=device.type == "cuda"):
            x = pipeline(tiles)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out[copy, positions.numpy()] = split.prefix(x).float().cpu().numpy().astype(out.dtype)
            if on_batch:
                on_batch()
    return out


def fit(
    model: nn.Module,
    pipeline: InputPipeline,
    cache,
    rows: np.ndarray,
    targets: np.ndarray,
    n_classes: int,
    settings: TrainSettings,
    shuffle_seed: int,
    device: torch.device,
    on_batch: Callable[[], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    frozen_features: FrozenFeatures | None = None,
) -> list[dict]:
    """Train ``model`` in place on cache tiles ``rows`` with integer ``targets``; per-epoch history.

    With ``frozen_features`` (and ``settings.freeze_stages``), the frozen stages are not run:
    each tile's precomputed output for one augmented copy feeds the trainable stages. The
    batch order is the same as without them.
    """
    cuda = device.type == "cuda"
    amp = cuda if settings.amp is None else (settings.amp and cuda)
    model.to(device)
    if settings.channels_last:
        # NHWC: oneDNN's fast convolution layout on CPU (≈1.5× training, ≈1.8× inference
        # for EfficientNet-Lite0 here) and the tensor-core layout on CUDA.
        model.to(memory_format=torch.channels_last)
    pipeline.to(device)
    frozen_norms = freeze_stages(model, settings.freeze_stages) if settings.mode == "finetune" else []
    params = _trainable(model, settings.mode)
    split, copy_of = None, None
    if frozen_features is not None:
        if not frozen_norms:
            raise CellmorphError("precomputed frozen-stage features need mode finetune with freeze_stages > 0")
        split = FrozenSplit(model, example_batch(pipeline, cache, rows, device))
        if split.signature != frozen_features.signature:
            raise CellmorphError("the precomputed frozen-stage features belong to other weights than this model's")
        missing = [int(r) for r in rows if int(r) not in frozen_features.position]
        if missing:
            raise CellmorphError(f"no precomputed frozen-stage features for cache row(s) {missing[:5]}")
        feature_index = np.array([frozen_features.position[int(r)] for r in rows], dtype=np.int64)
        # Each tile's copies in a seeded random order: epoch e uses copy order[e % copies].
        copy_rng = np.random.default_rng([int(shuffle_seed), 1])
        copy_of = np.argsort(copy_rng.random((len(rows), frozen_features.copies)), axis=1)
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    weights = (class_weights(targets, n_classes) if settings.class_weighting else torch.ones(n_classes)).to(device)
    y_all = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    rng = np.random.default_rng(shuffle_seed)
    history = []
    for epoch in range(settings.epochs):
        lr = _lr_at(settings, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if settings.mode == "finetune":
            model.train()
            for norm in frozen_norms:  # frozen stages keep ImageNet's running statistics
                norm.eval()
        else:
            model.eval()  # frozen backbone: BatchNorm statistics stay ImageNet's
        pipeline.train()
        start = time.perf_counter()
        total_loss, total_correct, seen = 0.0, 0, 0
        if split is None:
            batches = iterate_batches(cache, rows, settings.batch_size, rng, settings.num_workers, min_last=2,
                                      pin_memory=cuda)
        else:
            batches = _feature_batches(frozen_features, feature_index, copy_of[:, epoch % frozen_features.copies],
                                       batch_order(len(rows), settings.batch_size, rng, min_last=2))
        for inputs, positions in batches:
            y = y_all[positions].to(device, non_blocking=True)
            x = pipeline(inputs) if split is None else inputs.to(device, non_blocking=True)
            if settings.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                logits = model(x) if split is None else split.tail(x)
            per_sample = F.cross_entropy(logits.float(), y, reduction="none")
            loss = (per_sample * weights[y]).mean()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if not torch.isfinite(loss):
                raise CellmorphError(f"training diverged (loss {loss.item()}) at epoch {epoch + 1}; lower the learning rate")
            n = len(y)
            total_loss += float(loss.detach()) * n
            total_correct += int((logits.detach().argmax(1) == y).sum())
            seen += n
            if on_batch:
                on_batch()
        record = {
            "epoch": epoch + 1,
            "loss": total_loss / max(seen, 1),
            "train_accuracy": total_correct / max(seen, 1),
            "lr": lr,
            "n_tiles": seen,
            "seconds": time.perf_counter() - start,
        }
        history.append(record)
        if on_epoch:
            on_epoch(record)
    return history


def _feature_batches(features: FrozenFeatures, index: np.ndarray, copies: np.ndarray, batches):
    """(float32 frozen-stage features, positions) per batch of positions."""
    for positions in batches:
        x = np.asarray(features.array[copies[positions], index[positions]], dtype=np.float32)
        yield torch.from_numpy(x), torch.from_numpy(np.asarray(positions, dtype=np.int64))


def _tta_views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    if tta == "none":
        return [x]
    # Cell images have no preferred orientation, so every dihedral view is an equally valid look.
    ks = range(8) if x.shape[-1] == x.shape[-2] else (0, 2, 4, 6)
    return [dihedral(x, k) for k in ks]


@torch.inference_mode()
def predict(
    model: nn.Module,
    pipeline: InputPipeline,
    cache,
    rows: np.ndarray,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    amp: bool | None = None,
    on_batch: Callable[[], None] | None = None,
    channels_last: bool = True,
    tta: str = "none",
) -> np.ndarray:
    """Softmax probabilities (n, classes), float32, in the order of ``rows``.

    ``tta="dihedral"`` averages each tile's softmax over the 8 dihedral transforms (4 for a
    non-square input), a test-time augmentation; ``"none"`` (the paper) scores each tile once.
    """
    if tta not in TTA_MODES:
        raise CellmorphError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    cuda = device.type == "cuda"
    amp = cuda if amp is None else (amp and cuda)
    model.to(device).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    pipeline.to(device).eval()
    out = None
    for tiles, positions in iterate_batches(cache, rows, batch_size, None, num_workers, pin_memory=cuda):
        x = pipeline(tiles)
        probs = 0.0
        views = _tta_views(x, tta)
        for view in views:
            if channels_last:
                view = view.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                logits = model(view)
            probs = probs + torch.softmax(logits.float(), dim=1)
        probs = (probs / len(views)).cpu().numpy()
        if out is None:
            out = np.empty((len(rows), probs.shape[1]), dtype=np.float32)
        out[positions.numpy()] = probs
        if on_batch:
            on_batch()
    return out if out is not None else np.empty((0, 0), dtype=np.float32)
