"""Training-time augmentation on whole batches (float tensors in [0, 1], N×C×H×W).

The defaults are those of the authors' code (Kensert et al. 2019, ``model_utils``):

* one of the 8 dihedral transforms (4 rotations × optional mirror), uniformly;
* per-channel intensity jitter: each channel is scaled by 1 ± 0.25 with probability
  ``jitter_p`` = 0.5 (the paper draws from {0, 0, +0.25, −0.25});
* a 3×3 box blur with probability 0.5;
* additive Gaussian noise of variance 50 grey levels² (σ ≈ 7.07 on the 8-bit scale)
  with probability 0.5; then clipping back to [0, 1].

Every random number comes from one seeded :class:`torch.Generator`, and each op
acts on the whole batch with tensor ops (no per-image Python loops), so a run is
reproducible and cheap on CPU. An :class:`Augmenter` in ``eval()`` mode is the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cellmorph.config.augment import TTA_MODES, AugmentConfig, TTAMode  # noqa: F401


# --------------------------------------------------------------------------- dihedral group
def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th (0..7) element of the dihedral group D4 on the last two dims.

    k = 0..3: rotation by k·90°; k = 4..7: mirror (left-right) then rotation by (k−4)·90°.
    """
    if not 0 <= k < 8:
        raise ValueError(f"dihedral index {k} not in 0..7")
    y = x.flip(-1) if k >= 4 else x
    return torch.rot90(y, k % 4, dims=(-2, -1)) if k % 4 else y


def tta_views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The test-time views of a batch: itself (``none``), or its 8 dihedral transforms (4 rotations
    if the images are not square)."""
    if tta == "none":
        return [x]
    # Cell images have no preferred orientation, so every dihedral view is an equally valid look.
    ks = range(8) if x.shape[-1] == x.shape[-2] else (0, 2, 4, 6)
    return [dihedral(x, k) for k in ks]


def random_dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply an independently drawn dihedral transform to each image of the batch.

    Non-square images only use the 4 shape-preserving elements (0, 2, 4, 6).
    """
    n = x.shape[0]
    square = x.shape[-1] == x.shape[-2]
    ks = torch.randint(0, 8 if square else 4, (n,), generator=generator, device=generator.device)
    if not square:
        ks = ks * 2
    ks = ks.to(x.device)
    out = torch.empty_like(x)
    for k in range(8):
        idx = torch.nonzero(ks == k, as_tuple=True)[0]
        if idx.numel():
            out[idx] = dihedral(x[idx], k)
    return out


# --------------------------------------------------------------------------- photometric
def _bernoulli(shape, p: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device) < p


def intensity_jitter(x: torch.Tensor, amount: float, p: float, generator: torch.Generator) -> torch.Tensor:
    """Scale each channel of each image by 1 ± ``amount`` with probability ``p`` (else 1)."""
    n, c = x.shape[:2]
    on = _bernoulli((n, c), p, generator)
    sign = torch.where(_bernoulli((n, c), 0.5, generator), 1.0, -1.0)
    scale = (1.0 + amount * sign * on.float()).to(device=x.device, dtype=x.dtype)
    return x * scale.view(n, c, 1, 1)


def box_blur(x: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Mean filter of ``size``×``size`` with reflected borders (like OpenCV's ``cv2.blur``)."""
    if size <= 1:
        return x
    left = (size - 1) // 2
    right = size - 1 - left
    padded = F.pad(x, (left, right, left, right), mode="reflect")
    return F.avg_pool2d(padded, size, stride=1)


def random_blur(x: torch.Tensor, p: float, size: int, generator: torch.Generator) -> torch.Tensor:
    on = _bernoulli((x.shape[0],), p, generator).to(x.device)
    idx = torch.nonzero(on, as_tuple=True)[0]
    if idx.numel() == 0:
        return x
    out = x.clone()
    out[idx] = box_blur(x[idx], size)
    return out


def random_noise(x: torch.Tensor, p: float, std: float, generator: torch.Generator) -> torch.Tensor:
    """Add N(0, std²) (std in [0, 1] units) to a random ``p`` fraction of the images."""
    on = _bernoulli((x.shape[0],), p, generator).to(device=x.device, dtype=x.dtype)
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return x + noise.to(device=x.device, dtype=x.dtype) * (std * on).view(-1, 1, 1, 1)


# --------------------------------------------------------------------------- module
class Augmenter(nn.Module):
    """Batched augmentation; the identity in ``eval()`` mode or when disabled."""

    def __init__(self, config: AugmentConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.config = config or AugmentConfig()
        self.seed = int(seed)
        self._generator: torch.Generator | None = None
        self._generator_device: torch.device | None = None

    def reseed(self, seed: int) -> None:
        self.seed = int(seed)
        self._generator = None

    def generator(self, device: torch.device) -> torch.Generator:
        """The seeded generator on ``device``; created (and seeded) once, then advanced batch by batch."""
        device = torch.device(device)
        if self._generator is None or self._generator_device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            self._generator_device = device
        return self._generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not self.training or not cfg.enabled:
            return x
        gen = self.generator(x.device if x.device.type == "cuda" else torch.device("cpu"))
        if cfg.dihedral:
            x = random_dihedral(x, gen)
        if cfg.jitter > 0 and cfg.jitter_p > 0:
            x = intensity_jitter(x, cfg.jitter, cfg.jitter_p, gen)
        if cfg.blur_p > 0 and cfg.blur_size > 1:
            x = random_blur(x, cfg.blur_p, cfg.blur_size, gen)
        if cfg.noise_p > 0 and cfg.noise_std > 0:
            x = random_noise(x, cfg.noise_p, cfg.noise_std / 255.0, gen)
        return x.clamp(0.0, 1.0)

    def extra_repr(self) -> str:
        return f"seed={self.seed}, {self.config!r}"
