"""The training loop of one network on cache tiles, and its tile predictions.

SGD with momentum and class-weighted cross-entropy (Keras-style: each sample's
loss is multiplied by its class weight n / (k · n_c) and averaged over the batch,
as in the authors' ``class_weight``). On CUDA: mixed precision + channels-last, bf16
autocast where the GPU has it (Ampere and later: no loss scaling needed), else fp16 with
a gradient scaler (:func:`training_autocast_dtype`); on CPU: fp32. A step never waits for
the GPU: loss and accuracy are summed on the device and read once per epoch, so the host
queues the next batch while the GPU works (benchmarks/gpu.py measures both). Every random
draw comes from seeds handed in by the caller, and :func:`deterministic` switches PyTorch to deterministic kernels, so a fold's
result depends only on its seed and data.

Under ``torchrun`` (:mod:`cellmorph.distributed`) :func:`fit` trains data-parallel: each
process takes its share of every global batch, and the gradients are summed over processes
so that each step is the one-process step (see :class:`_Step`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cellmorph.augment import TTA_MODES, tta_views
from cellmorph.datasets import InputPipeline, batch_order, iterate_batches
from cellmorph.distributed import DataParallel, current, rank_seed
from cellmorph.errors import CellmorphError
from cellmorph.models.factory import freeze_stages
from cellmorph.models.frozen import FrozenFeatures, FrozenInput, FrozenSplit, example_batch
from cellmorph.models.heads import fit_probe_head


@dataclass(frozen=True)
class TrainSettings:
    """How :func:`fit` trains; every field is a CVConfig field."""

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
    amp_dtype: str = "auto"
    channels_last: bool = True
    freeze_stages: int = 0
    backbone_lr_scale: float = 1.0
    unfreeze_every: int = 0
    head_init: str = "random"
    compound_weighting: bool = False
    cuda_graphs: bool | None = None  # None: wherever they apply (CUDA, no loss scale, one process)

    @classmethod
    def from_config(cls, config) -> "TrainSettings":
        """The fields of a resolved config (e.g. ``CVConfig.resolved()``) that training reads."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class PredictSettings:
    """How :func:`predict_tiles` scores tiles."""

    batch_size: int = 64
    num_workers: int = 0
    amp: bool | None = None
    channels_last: bool = True
    tta: str = "none"
    mc_dropout: int = 0  # > 0: the mean softmax of this many passes with dropout active (MC dropout)

    @classmethod
    def from_config(cls, config) -> "PredictSettings":
        """Scoring settings of a resolved config: its ``eval_batch_size`` is the batch size."""
        return cls(config.eval_batch_size or 2 * config.batch_size, config.num_workers, config.amp,
                   config.channels_last, config.tta)


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """n / (k · n_c) for the k classes present; 0 for a class with no training tiles."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def tile_weights(labels: np.ndarray, n_classes: int, class_weighting: bool,
                 compounds: np.ndarray | None = None) -> torch.Tensor:
    """Each training tile's loss weight. By class (``class_weighting``): n / (k · n_c), every class
    weighs alike. With ``compounds``: within its class, every compound weighs alike too, a tile of
    compound g in class c weighing (its class's total) / (m_c · n_g) for the m_c compounds of c, so a
    plate's positive control (taxol: over half of the development set's cells) counts as one compound
    of its MoA, not as the MoA. The weights sum to n either way."""
    labels = np.asarray(labels, dtype=np.int64)
    per_class = class_weights(labels, n_classes).numpy() if class_weighting else np.ones(n_classes, np.float32)
    if compounds is None:
        return torch.from_numpy(per_class[labels])
    frame = pd.DataFrame({"c": labels, "g": np.asarray(compounds).astype(str)})
    cells = frame.groupby(["c", "g"])["g"].transform("size").to_numpy(np.float64)
    members = frame.groupby("c")["g"].transform("nunique").to_numpy(np.float64)
    class_total = per_class[labels].astype(np.float64) * frame.groupby("c")["c"].transform("size").to_numpy()
    return torch.tensor(class_total / (members * cells), dtype=torch.float32)


AMP_DTYPES = ("auto", "bfloat16", "float16")


def training_autocast_dtype(device: torch.device, amp_dtype: str = "auto") -> torch.dtype:
    """The autocast type of a mixed-precision training step on ``device``.

    ``auto``: bfloat16 where the GPU computes it natively (its exponent range is float32's, so
    gradients neither underflow nor need a loss scale), else float16 with a gradient scaler.
    """
    if amp_dtype not in AMP_DTYPES:
        raise CellmorphError(f"amp_dtype must be one of {', '.join(AMP_DTYPES)}, got {amp_dtype!r}")
    if amp_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and _native_bf16() else torch.float16
    return torch.bfloat16 if amp_dtype == "bfloat16" else torch.float16


def _native_bf16() -> bool:
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.4 has no emulation to leave out
        return torch.cuda.is_bf16_supported()


def _lr_at(settings: TrainSettings, epoch: int) -> float:
    if settings.lr_schedule == "cosine" and settings.epochs > 1:
        return 0.5 * settings.lr * (1.0 + math.cos(math.pi * epoch / settings.epochs))
    return settings.lr


def _param_groups(model: nn.Module, params: list[nn.Parameter], settings: TrainSettings) -> list[dict]:
    """The head at the learning rate, the rest of the network at ``backbone_lr_scale`` times it
    (discriminative learning rates: pretrained filters move less than the new head)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    groups = [{"params": [p for p in params if id(p) in head_ids], "scale": 1.0},
              {"params": [p for p in params if id(p) not in head_ids], "scale": settings.backbone_lr_scale}]
    return [g for g in groups if g["params"]]


class _Unfreezing:
    """Gradual unfreezing: the head trains alone first, then one more trainable stage every
    ``every`` epochs, from the top down (ULMFiT's schedule). Stages still waiting neither get
    gradients nor update their BatchNorm statistics."""

    def __init__(self, model: nn.Module, every: int, frozen: int) -> None:
        from cellmorph.models.factory import stage_names

        self.every = every
        modules = dict(model.named_modules())
        stages = stage_names(model)[frozen:-1]  # the trainable stages below the head, input side first
        self.stages = [[modules[n] for n in stage if n in modules] for stage in reversed(stages)]
        self.params = [[p for m in stage for p in m.parameters() if p.requires_grad] for stage in self.stages]

    def apply(self, epoch: int) -> list[nn.Module]:
        """Set which stages train in ``epoch`` (from 0); returns the BatchNorms to keep in eval mode."""
        open_stages = epoch // self.every
        waiting = []
        for k, (stage, params) in enumerate(zip(self.stages, self.params)):
            for p in params:
                p.requires_grad_(k < open_stages)
            if k >= open_stages:
                waiting += [m for module in stage for m in module.modules()
                            if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        return waiting


@torch.no_grad()
def init_head_from_probe(model: nn.Module, pipeline: InputPipeline, cache, rows: np.ndarray, targets: np.ndarray,
                         n_classes: int, class_weighting: bool, seed: int, device: torch.device,
                         batch_size: int = 64) -> None:
    """Start the classifier from a logistic regression on the network's own pooled features of the
    training tiles (un-augmented): linear probing, then fine-tuning (LP-FT, Kumar et al. 2022), so
    the first steps do not distort pretrained features through a random head."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        raise CellmorphError("head_init probe needs a model whose classifier is one linear layer")
    was_training = model.training
    model.eval()
    pipeline.eval()
    features = np.empty((len(rows), head.in_features), dtype=np.float32)
    for tiles, positions in iterate_batches(cache, rows, batch_size, None):
        x = pipeline(tiles.to(device))
        features[positions.numpy()] = model.forward_head(model.forward_features(x), pre_logits=True).float().cpu().numpy()
    probe, scaler = fit_probe_head(features, np.asarray(targets), class_weighting, seed)
    coef = probe.coef_ / scaler.scale_
    intercept = probe.intercept_ - coef @ scaler.mean_
    if coef.shape[0] == 1:  # two classes: scikit-learn keeps one logit, the difference
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    weight = np.zeros((n_classes, head.in_features), dtype=np.float32)
    bias = np.full(n_classes, float(intercept.min()) - 10.0, dtype=np.float32)  # classes without tiles: unlikely
    weight[probe.classes_] = coef
    bias[probe.classes_] = intercept
    head.weight.copy_(torch.from_numpy(weight))
    head.bias.copy_(torch.from_numpy(bias))
    model.train(was_training)


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

    Data-parallel (more than one process in :func:`cellmorph.distributed.current`): every
    process draws the same global batches of ``settings.batch_size`` and trains on its share
    of each (see :class:`_Step`); the history is that of the global batches, the same on
    every process. On CUDA, BatchNorm becomes SyncBatchNorm (statistics of the global batch).
    On the CPU, where torch's SyncBatchNorm does not run (it takes GPU tensors only), each
    process's BatchNorm normalises its own share of the batch, so a BatchNorm network trains
    as with batch statistics of ``batch_size / world_size`` tiles: not the one-process model
    (a LayerNorm or GroupNorm network, e.g. ConvNeXt, is that model up to float rounding).
    Its running statistics are averaged over the processes after every epoch, so all
    processes keep the same model.
    """
    cuda = device.type == "cuda"
    amp = cuda if settings.amp is None else (settings.amp and cuda)
    dp = current()
    sync_norms = dp.active and cuda
    _place_model(model, pipeline, device, dp, sync_norms, settings.channels_last)
    setup = _set_up_training(model, pipeline, cache, rows, targets, n_classes, settings, shuffle_seed, device, amp,
                             dp, frozen_features)
    rng = np.random.default_rng(shuffle_seed)
    history = []
    for epoch in range(settings.epochs):
        record = _train_epoch(model, pipeline, cache, rows, settings, setup, epoch, rng, on_batch, pin_memory=cuda,
                              average_norms_over=dp if dp.active and not sync_norms else None)
        history.append(record)
        if on_epoch:
            on_epoch(record)
    return history


def _place_model(model: nn.Module, pipeline: InputPipeline, device: torch.device, dp: DataParallel,
                 sync_norms: bool, channels_last: bool) -> None:
    """Move ``model`` and ``pipeline`` to ``device``, ``model`` as this process's replica and in its memory layout."""
    model.to(device)
    if dp.active:
        _join(model, dp, sync_norms)
    if channels_last:
        # NHWC: oneDNN's fast convolution layout on CPU (≈1.5× training, ≈1.8× inference
        # for EfficientNet-Lite0 here) and the tensor-core layout on CUDA.
        model.to(memory_format=torch.channels_last)
    pipeline.to(device)


@dataclass(frozen=True)
class _Setup:
    """What :func:`fit` prepares once, before the first epoch, and every epoch uses."""

    frozen_norms: list  # the norms of frozen stages, whose statistics stay
    frozen: FrozenInput | None  # the frozen stages' precomputed outputs, when fit is given them
    unfreezing: _Unfreezing | None
    optimizer: torch.optim.Optimizer
    step: _Step


def _set_up_training(model: nn.Module, pipeline: InputPipeline, cache, rows: np.ndarray, targets: np.ndarray,
                     n_classes: int, settings: TrainSettings, shuffle_seed: int, device: torch.device, amp: bool,
                     dp: DataParallel, frozen_features: FrozenFeatures | None) -> _Setup:
    """Freeze the stages that stay, choose what trains, start the head (random or probe) and build the optimiser."""
    frozen_norms = freeze_stages(model, settings.freeze_stages) if settings.mode == "finetune" else []
    params = _trainable(model, settings.mode)
    frozen = None
    if frozen_features is not None:
        if not frozen_norms:
            raise CellmorphError("precomputed frozen-stage features need mode finetune with freeze_stages > 0")
        frozen = FrozenInput(FrozenSplit(model, example_batch(pipeline, cache, rows, device)), frozen_features,
                             rows, shuffle_seed)
    if settings.head_init == "probe":
        init_head_from_probe(model, pipeline, cache, rows, targets, n_classes, settings.class_weighting, shuffle_seed,
                             device)
    unfreezing = (_Unfreezing(model, settings.unfreeze_every, settings.freeze_stages)
                  if settings.unfreeze_every and settings.mode == "finetune" else None)
    optimizer = torch.optim.SGD(_param_groups(model, params, settings), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    step = _training_step(model, optimizer, cache, rows, targets, n_classes, settings, device, amp, dp,
                          split_network=frozen is not None)
    return _Setup(frozen_norms, frozen, unfreezing, optimizer, step)


def _train_epoch(model: nn.Module, pipeline: InputPipeline, cache, rows: np.ndarray, settings: TrainSettings,
                 setup: _Setup, epoch: int, rng: np.random.Generator, on_batch: Callable[[], None] | None,
                 pin_memory: bool, average_norms_over: DataParallel | None) -> dict:
    """One epoch at its learning rate, on the tiles (or on their frozen-stage features); its history record.

    ``average_norms_over``: the processes whose BatchNorm running statistics are averaged after the
    epoch (data-parallel without SyncBatchNorm); the epoch's time includes it.
    """
    lr = _lr_at(settings, epoch)
    for group in setup.optimizer.param_groups:
        group["lr"] = lr * group["scale"]
    waiting = setup.unfreezing.apply(epoch) if setup.unfreezing is not None else []
    _training_modes(model, settings.mode, setup.frozen_norms + waiting)
    pipeline.train()
    start = time.perf_counter()
    if setup.frozen is None:
        batches = iterate_batches(cache, rows, settings.batch_size, rng, settings.num_workers, min_last=2,
                                  pin_memory=pin_memory)
        totals = setup.step.epoch(((pipeline(x), p) for x, p in batches), None, epoch, on_batch)
    else:
        order = batch_order(len(rows), settings.batch_size, rng, min_last=2)
        totals = setup.step.epoch(setup.frozen.batches(epoch, order), setup.frozen.split, epoch, on_batch)
    if average_norms_over is not None:
        average_norms_over.average_batchnorm_statistics(model)
    return {"epoch": epoch + 1, **totals, "lr": lr, "seconds": time.perf_counter() - start}


def _training_modes(model: nn.Module, mode: str, frozen_norms: list) -> None:
    """Train mode for an epoch, except where statistics must stay: the norms of frozen (and not yet unfrozen)
    stages, and the whole backbone when only the head trains (its BatchNorm statistics stay ImageNet's)."""
    if mode == "finetune":
        model.train()
        for norm in frozen_norms:
            norm.eval()
    else:
        model.eval()


def _training_step(model: nn.Module, optimizer, cache, rows: np.ndarray, targets: np.ndarray, n_classes: int,
                   settings: TrainSettings, device: torch.device, amp: bool, dp: DataParallel,
                   split_network: bool) -> "_Step":
    """The optimisation step of :func:`fit`: the loss weights of the tiles, mixed precision with a loss scale
    where float16 needs one, and, on CUDA where the step allows it, the step replayed as a CUDA graph."""
    compounds = cache.index["Metadata_Compound"].to_numpy()[rows] if settings.compound_weighting else None
    weights = tile_weights(targets, n_classes, settings.class_weighting, compounds)  # indexed like the targets
    dtype = training_autocast_dtype(device, settings.amp_dtype)
    # Only float16 needs a loss scale: its smallest normal (6e-5) is where small gradients vanish.
    scaler = torch.amp.GradScaler("cuda", enabled=amp and dtype == torch.float16)
    graphs = None
    if device.type == "cuda" and settings.cuda_graphs is not False:
        if scaler.is_enabled():
            if settings.cuda_graphs:
                raise CellmorphError("cuda_graphs needs a step without a loss scale: amp_dtype bfloat16 (or auto on a "
                                     "GPU with native bfloat16), or amp off")
        elif not (dp.active or split_network):  # those steps stay eager (collectives, a split network)
            graphs = _GraphedStep(settings.batch_size)
    return _Step(model, optimizer, scaler, weights, torch.as_tensor(np.asarray(targets, dtype=np.int64)), device,
                 amp, settings.channels_last, dp if dp.active else None, dtype, graphs)


def _join(model: nn.Module, dp: DataParallel, sync_norms: bool) -> None:
    """Make ``model`` one replica of the data-parallel model (before stages are frozen, since
    freezing and unfreezing keep references to its BatchNorm modules)."""
    if sync_norms:
        from timm.layers import convert_sync_batchnorm  # also timm's BatchNormAct2d, with its activation

        convert_sync_batchnorm(model)  # the root (a network, never a BatchNorm) is changed in place
    dp.broadcast_state(model)
    # Dropout and stochastic depth draw from torch's global generator: a stream of its own per
    # rank, else every rank would draw the same masks for its (different) samples.
    torch.manual_seed(rank_seed(torch.initial_seed(), dp.rank))


class _Step:
    """One SGD step per batch with class-weighted cross-entropy; sums loss and accuracy over an epoch.

    Data-parallel (``dp`` given): every rank gets the same global batch (already through the
    input pipeline, so its augmentation draws are those of one process) and keeps its
    :meth:`~cellmorph.distributed.DataParallel.shard`. Its loss is its share of the global
    batch's weighted mean: ``sum(per_sample * class_weight) / global_batch_size``, so the sum of
    the ranks' gradients is the one-process gradient, for uneven shards too. One all-reduce per
    step sums the gradients together with the loss and correct count, so every rank records the
    global batch's numbers and sees the same loss in the divergence check.
    """

    def __init__(self, model, optimizer, scaler, weights, y_all, device, amp: bool, channels_last: bool,
                 dp: DataParallel | None = None, dtype: torch.dtype = torch.float16,
                 graphs: "_GraphedStep | None" = None) -> None:
        # weights: one per training tile (tile_weights), taken by the batch's positions as y_all is
        self.model, self.optimizer, self.scaler, self.weights = model, optimizer, scaler, weights
        self.y_all, self.device, self.amp, self.channels_last = y_all, device, amp, channels_last
        self.dp, self.dtype, self.graphs = dp, dtype, graphs

    def forward_backward(self, x, y, w, n: int, split: FrozenSplit | None, cache_casts: bool = True):
        """Loss and correct count of one batch (tile weights ``w``), its gradients in ``.grad`` (not yet
        all-reduced)."""
        with torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=self.amp,
                            cache_enabled=cache_casts):
            logits = self.model(x) if split is None else split.tail(x)
        per_sample = F.cross_entropy(logits.float(), y, reduction="none")
        if self.dp is None:
            loss = (per_sample * w).mean()
        else:
            loss = (per_sample * w).sum() / n
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return loss.detach(), (logits.detach().argmax(1) == y).sum()

    def epoch(self, batches, split: FrozenSplit | None, epoch: int, on_batch) -> dict:
        # Sums stay on the device (float64: the same arithmetic as Python floats, so CPU runs record
        # the numbers they always did); reading them per batch would make the host wait for every step.
        sums = torch.device("cpu") if self.device.type == "mps" else self.device  # MPS has no float64
        total_loss = torch.zeros((), dtype=torch.float64, device=sums)
        total_correct = torch.zeros((), dtype=torch.int64, device=sums)
        seen = 0
        dp = self.dp
        if self.graphs is not None:
            self.graphs.invalidate()  # the learning rate and the trainable stages may differ from the last epoch
        for x, positions in batches:
            n = len(positions)  # the global batch
            if dp is not None:
                part = dp.shard(n)
                x, positions = x[part], positions[part]
            y = self.y_all[positions].to(self.device, non_blocking=True)
            w = self.weights[positions].to(self.device, non_blocking=True)
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.graphs is not None and self.graphs.takes(x):
                loss, correct = self.graphs.step(self, x, y, w)
            else:
                loss, correct = self.forward_backward(x, y, w, n, split)
                if dp is not None:
                    params = (p for group in self.optimizer.param_groups for p in group["params"])
                    loss, correct = dp.all_reduce_gradients(params, torch.stack([loss, correct.float()]))
                self.scaler.step(self.optimizer)
                self.scaler.update()
            total_loss += loss.detach().to(sums).double() * n
            total_correct += correct.to(sums).long()
            seen += n
            if on_batch:
                on_batch()
        # A non-finite batch loss makes the sum non-finite: one check per epoch, not a wait per step.
        summed = float(total_loss)
        if not math.isfinite(summed):
            raise CellmorphError(f"training diverged (loss {summed}) at epoch {epoch + 1}; lower the learning rate")
        return {"loss": summed / max(seen, 1), "train_accuracy": int(total_correct) / max(seen, 1), "n_tiles": seen}


class _GraphedStep:
    """Full-size training batches as one CUDA graph: forward, loss, backward and SGD step replayed
    from a single launch instead of some two thousand kernel launches from Python.

    At the paper's batch of 8 a ResNet50 step is bound by launches, not arithmetic (about 1% of an
    H200's bf16 peak, benchmarks/RESULTS.md 'GPU'). The first ``warmup`` full batches of a run train
    eagerly on a side stream (cuDNN and the allocator settle there, as CUDA graphs require); then
    each epoch captures the step once, on its first full batch, and replays it for the rest. Capture
    per epoch, because the learning rate (a constant inside the graph) and, with gradual unfreezing,
    the trainable stages change between epochs. A smaller last batch trains eagerly. Autocast's
    weight-cast cache is off in captured steps: cached casts would outlive the graph's memory.
    """

    def __init__(self, batch_size: int, warmup: int = 3) -> None:
        self.batch_size, self.warmup = batch_size, warmup
        self.graph = None

    def invalidate(self) -> None:
        self.graph = None

    def takes(self, x: torch.Tensor) -> bool:
        return len(x) == self.batch_size

    def step(self, owner: "_Step", x: torch.Tensor, y: torch.Tensor, w: torch.Tensor):
        if self.warmup > 0:
            self.warmup -= 1
            side = torch.cuda.Stream(owner.device)
            side.wait_stream(torch.cuda.current_stream(owner.device))
            with torch.cuda.stream(side):
                loss, correct = owner.forward_backward(x, y, w, len(x), None, cache_casts=False)
                owner.optimizer.step()
            torch.cuda.current_stream(owner.device).wait_stream(side)
            return loss, correct
        if self.graph is None:
            # the graph's inputs: every replay reads these tensors
            self.x, self.y, self.w = x.clone(), y.clone(), w.clone()
            owner.optimizer.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss, self.correct = owner.forward_backward(self.x, self.y, self.w, len(x), None,
                                                                 cache_casts=False)
                owner.optimizer.step()
        else:
            self.x.copy_(x)
            self.y.copy_(y)
            self.w.copy_(w)
        self.graph.replay()
        return self.loss, self.correct


def enable_dropout(model: nn.Module) -> None:
    """Dropout active, all else in eval mode. timm heads apply ``F.dropout(..., training=self.training)``
    of the top module, so only that flag is set there (its children, batch norm among them, stay in eval);
    dropout layers deeper down are switched on one by one."""
    model.training = True
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.train()


@torch.inference_mode()
def predict_tiles(
    model: nn.Module,
    pipeline: InputPipeline,
    cache,
    rows: np.ndarray,
    settings: PredictSettings,
    device: torch.device,
    on_batch: Callable[[], None] | None = None,
) -> np.ndarray:
    """Softmax probabilities (n, classes), float32, in the order of ``rows``.

    ``settings.tta="dihedral"`` averages each tile's softmax over the 8 dihedral transforms (4 for
    a non-square input), a test-time augmentation; ``"none"`` (the paper) scores each tile once.
    ``settings.mc_dropout=N`` averages N passes with dropout active and everything else (batch norm,
    stochastic depth) in eval mode; draws follow torch's global generator. timm's ``drop_rate`` is
    the dropout of the classifier head, so the backbone runs once and only the head N times. Dropout
    layers inside a backbone (a ViT built with ``drop_rate`` has them) are active too, but since its
    features are computed once per batch, they draw once and the N head passes share that draw.
    """
    if settings.tta not in TTA_MODES:
        raise CellmorphError(f"tta must be one of {', '.join(TTA_MODES)}, got {settings.tta!r}")
    cuda = device.type == "cuda"
    amp = cuda if settings.amp is None else (settings.amp and cuda)
    channels_last = settings.channels_last
    model.to(device).eval()
    if settings.mc_dropout:
        enable_dropout(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    pipeline.to(device).eval()
    out = None
    batches = iterate_batches(cache, rows, settings.batch_size, None, settings.num_workers, pin_memory=cuda)
    for tiles, positions in batches:
        x = pipeline(tiles)
        probs = 0.0
        views = tta_views(x, settings.tta)
        passes = 0
        for view in views:
            if channels_last:
                view = view.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                if settings.mc_dropout:
                    features = model.forward_features(view)
                    heads = [model.forward_head(features) for _ in range(settings.mc_dropout)]
                else:
                    heads = [model(view)]
            for logits in heads:
                probs = probs + torch.softmax(logits.float(), dim=1)
                passes += 1
        probs = (probs / passes).cpu().numpy()
        if out is None:
            out = np.empty((len(rows), probs.shape[1]), dtype=np.float32)
        out[positions.numpy()] = probs
        if on_batch:
            on_batch()
    return out if out is not None else np.empty((0, 0), dtype=np.float32)
