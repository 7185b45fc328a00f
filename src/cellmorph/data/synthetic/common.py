"""What the BBBC021 and BBBC014 generators share: seeded generators, preset look-up, the Hill dose-response
curve, the camera's shot and read noise, and writing a field's channels as TIFFs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from scipy.special import expit

from cellmorph.data.images import write_tiff
from cellmorph.errors import CellmorphError

__all__ = ["camera_counts", "dose_response", "lookup_preset", "phenotype_strength", "seeded_rng", "write_channels"]

P = TypeVar("P")


def seeded_rng(seed: int, *key: int) -> np.random.Generator:
    """The generator of node ``key`` (a spawn key) of the seed's ``SeedSequence`` tree: what one node (a compound,
    a plate, a well, a field) draws does not depend on the other nodes nor on the order they are drawn in."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key)))


def lookup_preset(presets: Mapping[str, P], name: str, kind: str) -> P:
    """``presets[name]``, or an error naming the ``kind`` of preset and the valid names."""
    if name not in presets:
        raise CellmorphError(f"unknown {kind} preset {name!r}; valid presets: {', '.join(presets)}")
    return presets[name]


# The Hill curve ``emax / (1 + (EC50 / conc) ** hill)`` in the two forms the generators were written with. They
# agree to rounding, not to the bit, and the generated files depend on the bits: each generator keeps its form.


def phenotype_strength(conc, ec50: float, hill: float, emax: float = 1.0):
    """Dose-response: ``emax / (1 + (ec50 / conc) ** hill)``; 0 at conc 0."""
    conc = np.asarray(conc, dtype=float)
    with np.errstate(divide="ignore", over="ignore"):
        out = emax / (1.0 + (ec50 / np.maximum(conc, 1e-300)) ** hill)
    out = np.where(conc > 0, out, 0.0)
    return float(out) if out.ndim == 0 else out


def dose_response(conc, ec50, hill: float):
    """Fraction of maximal translocation, ``1 / (1 + (ec50/conc)^hill)``; 0 at conc 0."""
    conc = np.asarray(conc, dtype=float)
    logit = hill * (np.log(np.maximum(conc, 1e-300)) - np.log(np.asarray(ec50, dtype=float)))
    return np.where(conc > 0, expit(logit), 0.0)


def camera_counts(expected: np.ndarray, adu_per_electron: float, read_noise: float, offset: float,
                  rng: np.random.Generator, max_count: int) -> np.ndarray:
    """A camera's reading of ``expected`` (float32 counts, background included, none negative): shot noise (the
    Gaussian approximation of Poisson at ``adu_per_electron`` counts per photo-electron) and read noise, plus the
    camera ``offset``, rounded and clipped to ``0 … max_count``; float32, for the caller to cast to its bit depth.
    Draws one standard normal per pixel from ``rng``."""
    f32 = np.float32
    counts = expected * f32(adu_per_electron)
    counts += f32(read_noise * read_noise)
    np.sqrt(counts, out=counts)  # the noise's standard deviation, per pixel
    counts *= rng.standard_normal(expected.shape, dtype=f32)
    counts += expected
    counts += f32(offset)
    np.rint(counts, out=counts)
    np.clip(counts, 0, max_count, out=counts)
    return counts


def write_channels(root: Path, paths: Sequence[str], image: np.ndarray) -> None:
    """Each plane of ``image`` as a single-channel TIFF at ``root / paths[c]``."""
    for c, rel in enumerate(paths):
        write_tiff(root / rel, image[c])
