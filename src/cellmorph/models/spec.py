"""Typed records of a network: what input it takes and how it was initialised.

:class:`InputSpec` is the one description of a network's input (square size, per-channel
mean and std of the 0–1 scaled tile); :class:`InitRecord` says where its weights came
from. Run directories and, later, model bundles store both through ``record()``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class InputSpec:
    """A network's input: ``size``×``size`` tiles, standardised by ``mean``/``std`` per channel."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def channels(self) -> int:
        return len(self.mean)

    def with_size(self, size: int | None) -> "InputSpec":
        return self if not size else replace(self, size=int(size))

    def with_channels(self, n: int) -> "InputSpec":
        """The ImageNet statistics cycled over ``n`` channels (e.g. 2-channel BBBC014 tiles)."""
        if n == self.channels:
            return self
        return replace(self, mean=(self.mean * n)[:n], std=(self.std * n)[:n])

    def record(self) -> dict:
        """The plain form stored in run directories (and in their fingerprints, so keep its keys)."""
        return {"mean": list(self.mean), "std": list(self.std), "input_size": self.size}

    @classmethod
    def from_record(cls, record: dict) -> "InputSpec":
        size = record["input_size"]
        if isinstance(size, (tuple, list)):  # timm's (C, H, W)
            size = size[-1]
        return cls(int(size), tuple(record["mean"]), tuple(record["std"]))


@dataclass(frozen=True)
class InitRecord:
    """How a network's weights were initialised: ``init`` and, for loaded weights, their source."""

    init: str
    model: str
    num_classes: int
    in_chans: int = 3
    source: str | None = None  # package | cache | path | hub | checkpoint
    path: str | None = None
    sha256: str | None = None
    classifier: str | None = None  # for checkpoints: loaded, or fresh when its shape differs

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}
