"""Frozen early stages, computed once: the split of a network and the shared feature pool.

:class:`FrozenSplit` splits a network with frozen early stages into a frozen prefix and a
trainable tail; :class:`FrozenFeatures` holds the prefix's output for augmented copies of
tiles, which :func:`compute_frozen_features` fills and :func:`cellmorph.train.fit` reads.


With :func:`~cellmorph.models.factory.freeze_stages` the stem and the first stages keep
their (ImageNet) weights and BatchNorm statistics, so their output for a given input
never changes: not across epochs, and not across the folds of a cross-validation. On a
CPU those early, high-resolution stages cost about half of a training step
(EfficientNet-Lite0 at 320 px, benchmarks/RESULTS.md). :class:`FrozenSplit` lets the
training loop compute that output once and feed it straight into the rest of the
network.

It works on any module tree without knowing the architecture: the *frozen roots* are
the largest submodules whose parameters are all frozen; a probe forward pass records
the order in which they finish, and the last one to finish is the cut. The tail is the
unchanged model with the frozen roots swapped, for the duration of a ``with`` block,
for pass-throughs, and the last root for a module that returns the cached features.
Construction checks on an example batch that ``tail(prefix(x))`` equals ``model(x)``,
so an architecture whose frozen part feeds the tail through more than one path (a skip
connection across the cut) is refused instead of trained wrongly.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cellmorph.errors import CellmorphError

__all__ = ["FrozenFeatures", "FrozenInput", "FrozenSplit", "compute_frozen_features", "example_batch", "frozen_roots"]


class _Stop(Exception):
    """Raised by a hook to end a forward pass at the cut."""


class _Inject(nn.Module):
    """Stands in for the last frozen root: returns the features it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.value


def _is_frozen(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def frozen_roots(model: nn.Module) -> list[str]:
    """Names of the largest submodules whose parameters are all frozen, in definition order."""
    frozen = {name for name, module in model.named_modules() if name and _is_frozen(module)}
    return [name for name in frozen if name.rpartition(".")[0] not in frozen]


class FrozenSplit:
    """``prefix(x)``: the frozen stages' output; ``tail(features)``: the rest of the model.

    ``example`` is a small input batch (two tiles suffice) used to find the cut and to
    check that the split reproduces the whole model.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, rtol: float = 1e-4) -> None:
        self.model = model
        roots = frozen_roots(model)
        if not roots:
            raise CellmorphError(f"{type(model).__name__}: no frozen stages to split off")
        modules = dict(model.named_modules())
        finished: list[str] = []  # every module, in the order its forward() returns
        handles = [
            module.register_forward_hook(lambda m, i, o, name=name: finished.append(name))
            for name, module in modules.items()
            if name
        ]
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                reference = model(example)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        root_set = set(roots)
        called = list(dict.fromkeys(name for name in finished if name in root_set))
        if not called:
            raise CellmorphError(f"{type(model).__name__}: its frozen stages are never called in forward()")
        self.roots = called
        self.cut = called[-1]
        before_cut = finished[: finished.index(self.cut)]
        learning = [n for n in before_cut if any(p.requires_grad for p in modules[n].parameters(recurse=False))]
        # Caching is exact only if nothing before the cut learns or draws random numbers in training.
        random = [n for n in before_cut if float(getattr(modules[n], "p", getattr(modules[n], "drop_prob", 0.0)) or 0.0) > 0]
        if learning or random:
            raise CellmorphError(
                f"{type(model).__name__}: {(learning or random)[0]!r} runs before the frozen stages end at "
                f"{self.cut!r} but {'is trainable' if learning else 'is random in training (dropout)'}, "
                "so the frozen stages' output cannot be cached; set frozen_feature_cache false"
            )
        self._example_shape = tuple(example.shape[1:])
        self.signature = self._signature(modules)
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                features = self.prefix(example)
                rebuilt = self.tail(features)
        finally:
            model.train(was_training)
        self.feature_shape = tuple(features.shape[1:])  # of one tile
        scale = reference.abs().max().clamp_min(1e-6)
        if rebuilt.shape != reference.shape or not bool(((rebuilt - reference).abs().max() / scale) <= rtol):
            raise CellmorphError(
                f"{type(model).__name__}: the frozen stages do not feed the rest of the network through one "
                f"tensor at {self.cut!r}, so their output cannot be cached; set frozen_feature_cache false"
            )

    def _signature(self, modules: dict[str, nn.Module]) -> str:
        """A digest of the frozen weights and buffers: cached features are valid only for these."""
        h = hashlib.sha256()
        for name in sorted(self.roots):
            for key, tensor in sorted(modules[name].state_dict().items()):
                h.update(f"{name}.{key}".encode())
                h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen stages' output for ``x`` (in eval mode: frozen BatchNorm uses its running statistics)."""
        captured: list[torch.Tensor] = []

        def stop(module, inputs, output):
            captured.append(output)
            raise _Stop

        handle = dict(self.model.named_modules())[self.cut].register_forward_hook(stop)
        was_training = self.model.training
        try:
            self.model.eval()
            self.model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
            self.model.train(was_training)
        return captured[0]

    @contextlib.contextmanager
    def bypassed(self):
        """Within the block, ``self.model`` skips its frozen stages; see :meth:`tail`."""
        inject = _Inject()
        saved = []
        for name in self.roots:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            saved.append((parent, child, parent._modules[child]))
            parent._modules[child] = inject if name == self.cut else nn.Identity()
        try:
            yield inject
        finally:
            for parent, child, module in saved:
                parent._modules[child] = module

    def tail(self, features: torch.Tensor) -> torch.Tensor:
        """The model's output given the frozen stages' ``features`` (gradients flow into the tail)."""
        # Parameter-free layers before the cut (an activation, a max-pool) still run, on a
        # zero input of the model's input shape; their output is discarded at the cut. A
        # fresh tensor each call, because such layers may work in place.
        dummy = torch.zeros((features.shape[0], *self._example_shape), device=features.device)
        with self.bypassed() as inject:
            inject.value = features
            return self.model(dummy)


@dataclass
class FrozenFeatures:
    """The frozen stages' output for augmented copies of tiles, computed once and shared by folds.

    ``array[v, i]`` is copy ``v`` (its own draw of the training augmentation) of cache row
    ``rows[i]`` after the frozen stages (float32). :func:`cellmorph.train.fit` gives each tile a
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


def example_batch(pipeline, cache, rows: np.ndarray, device: torch.device) -> torch.Tensor:
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
    pipeline,
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
    from cellmorph.datasets import iterate_batches

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


class FrozenInput:
    """Precomputed frozen-stage features standing in for the frozen stages of ``split.model``
    while it trains on cache ``rows``: epoch by epoch, each tile's next augmented copy."""

    def __init__(self, split: FrozenSplit, features: FrozenFeatures, rows: np.ndarray, shuffle_seed: int) -> None:
        if split.signature != features.signature:
            raise CellmorphError("the precomputed frozen-stage features belong to other weights than this model's")
        missing = [int(r) for r in rows if int(r) not in features.position]
        if missing:
            raise CellmorphError(f"no precomputed frozen-stage features for cache row(s) {missing[:5]}")
        self.split, self.features = split, features
        self.index = np.array([features.position[int(r)] for r in rows], dtype=np.int64)
        # Each tile's copies in a seeded random order: epoch e uses copy order[e % copies].
        copy_rng = np.random.default_rng([int(shuffle_seed), 1])
        self.copy_of = np.argsort(copy_rng.random((len(rows), features.copies)), axis=1)

    def batches(self, epoch: int, order):
        """(float32 frozen-stage features, positions) for each batch of positions in ``order``."""
        copies = self.copy_of[:, epoch % self.features.copies]
        for positions in order:
            x = np.asarray(self.features.array[copies[positions], self.index[positions]], dtype=np.float32)
            yield torch.from_numpy(x), torch.from_numpy(np.asarray(positions, dtype=np.int64))
