"""The names of the cross-validation schemes and their parsing: no pandas or torch, so configs and the
command line can check a ``--cv`` value without loading the fold machinery (:mod:`cellmorph.cv.splits`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cellmorph.errors import CellmorphError

DEFAULT_WELL_FOLDS = 5
CV_CHOICES = "loco | group-kfold:K | nscb | well[:K] | batch | cell-line | lomo"

_CV_PATTERN = re.compile(r"^(loco|lomo|nscb|batch|cell-line|group-kfold:(\d+)|well(?::(\d+))?)$")
# Leave one Metadata_Batch out; BBBC014 stores the cell line there ("cell-line" is its alias).
BATCH_SCHEMES = ("batch", "cell-line")


@dataclass(frozen=True)
class CVScheme:
    name: str  # loco | group-kfold | nscb | well | batch | cell-line | lomo
    k: int | None = None

    def __str__(self) -> str:
        return self.name if self.k is None or self.name == "loco" else f"{self.name}:{self.k}"

    @property
    def compound_disjoint(self) -> bool:
        """Whether every held-out compound is absent from its fold's training tiles (loco,
        group-kfold, nscb), so held-out scores describe compounds new to the model. well and batch
        folds hold out wells or batches of compounds that other folds train on."""
        return self.name in ("loco", "group-kfold", "nscb", "lomo")

    @property
    def open_set(self) -> bool:
        """Whether each fold holds out a whole MoA (lomo): its classes are unseen in training, so the fold scores
        how novel they look (open_set.json), not whether they are called."""
        return self.name == "lomo"


def parse_cv(spec: str) -> CVScheme:
    """``loco`` | ``group-kfold:K`` | ``nscb`` | ``well`` | ``well:K`` → :class:`CVScheme`."""
    text = str(spec).strip().lower()
    match = _CV_PATTERN.match(text)
    if not match:
        raise CellmorphError(f"cv {spec!r}: expected loco, nscb, group-kfold:K, well[:K], batch, cell-line or lomo")
    if text.startswith("group-kfold"):
        k = int(match.group(2))
        if k < 2:
            raise CellmorphError(f"cv {spec!r}: K must be at least 2")
        return CVScheme("group-kfold", k)
    if text.startswith("well"):
        k = int(match.group(3)) if match.group(3) else DEFAULT_WELL_FOLDS
        if k < 2:
            raise CellmorphError(f"cv {spec!r}: K must be at least 2")
        return CVScheme("well", k)
    return CVScheme(text)
