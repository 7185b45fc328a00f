"""The estimator: a scikit-learn-style face over ``train`` and ``predict`` for notebooks.

::

    from cellmorph.api import MoAClassifier

    clf = MoAClassifier({"model": "tf_efficientnet_lite0", "epochs": 5}, calibration="loco")
    clf.fit("cache", "model")                       # = cellmorph train --data cache --calibration loco --out model
    levels = clf.predict_proba("new-cache")         # {"tiles", "wells", "treatments", "compounds"} → frames
    treatments = clf.predict_sets("new-cache", alpha=0.2)
    same = MoAClassifier.load("model")              # a bundle from `cellmorph train` or from fit

A fitted classifier is a model bundle on disk (the weights, the calibration scores, the recipe): ``fit``
writes one exactly as ``cellmorph train`` does, so the command line and the notebook share every
artefact and every check. Data are a prepared tile cache (:func:`cellmorph.prepare`) or, for
prediction, an :class:`~cellmorph.data.table.ImageTable` of raw images, prepared into a temporary cache
with the bundle's own recipe. The parameters are validated when they are given, as scikit-learn's
estimators validate theirs at the boundary.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from cellmorph.bundle import Bundle, load_bundle
from cellmorph.cache import TileCache
from cellmorph.config.predict import PredictConfig
from cellmorph.cv.config import CVConfig, validate_config
from cellmorph.config.scheme import parse_cv
from cellmorph.errors import CellmorphError
from cellmorph.final_model import train_final
from cellmorph.predict import images_recipe, in_model_channel_order, score_cache

if TYPE_CHECKING:
    from cellmorph.data.table import ImageTable

LEVELS = ("tiles", "wells", "treatments", "compounds")


class NotFittedError(CellmorphError):
    """The classifier has no model yet: call ``fit`` or ``MoAClassifier.load`` first."""


class MoAClassifier:
    """Calls each treatment's mechanism of action, with a calibrated confidence and a conformal set.

    ``config``: a :class:`~cellmorph.cv.config.CVConfig`, a dict of its fields or a YAML path (the
    recipe; the crop-table defaults apply as in ``cellmorph train``). ``calibration``: the CV whose
    held-out treatments calibrate the confidence and the sets (``loco``, ``group-kfold:K``, …; None: no
    sets). ``predict``: the scoring settings (:class:`~cellmorph.config.predict.PredictConfig`).
    """

    def __init__(self, config: CVConfig | dict | Path | str | None = None, calibration: str | None = "loco",
                 predict: PredictConfig | dict | None = None, progress: bool = False) -> None:
        self.config = validate_config(config if config is not None else {}, "config")
        self.calibration = str(parse_cv(calibration)) if calibration is not None else None
        self.predict_config = predict if isinstance(predict, PredictConfig) else PredictConfig(**(predict or {}))
        self.progress = progress
        self.bundle_: Bundle | None = None

    # ------------------------------------------------------------------ fit / load / save
    def fit(self, data: Path | str, out: Path | str, calibration_run: Path | str | None = None,
            resume: bool = False) -> "MoAClassifier":
        """Train on every labelled tile of the cache ``data`` (and run the calibration CV first); the model
        bundle goes to ``out``, as ``cellmorph train`` writes it. ``calibration_run``: a finished
        :func:`cellmorph.run_cv` run of this recipe on ``data`` whose held-out probabilities calibrate the
        model instead (``train --calibration-run``; its scheme replaces ``calibration``). Returns the
        classifier."""
        run = Path(calibration_run) if calibration_run is not None else None
        train_final(Path(data), Path(out), self.config, calibration=None if run else self.calibration,
                    resume=resume, progress=self.progress, calibration_run=run)
        self.bundle_ = load_bundle(Path(out))
        self.calibration = (self.bundle_.manifest["training"].get("calibration") or {}).get("cv")
        return self

    @classmethod
    def load(cls, path: Path | str, predict: PredictConfig | dict | None = None,
             progress: bool = False) -> "MoAClassifier":
        """A fitted classifier from a model bundle (``cellmorph train`` or :meth:`fit`); it is verified."""
        bundle = load_bundle(Path(path))
        record = bundle.manifest["training"]
        calibration = (record.get("calibration") or {}).get("cv")
        classifier = cls(record["config"], calibration=calibration, predict=predict, progress=progress)
        classifier.bundle_ = bundle
        return classifier

    def save(self, path: Path | str) -> Path:
        """Copy the fitted bundle to ``path`` (a new folder); ``MoAClassifier.load(path)`` reads it back."""
        bundle = self._fitted()
        target = Path(path)
        if target.exists():
            raise CellmorphError(f"{target}: already exists; save into a new folder")
        shutil.copytree(bundle.root, target)
        return target

    # ------------------------------------------------------------------ predictions
    @property
    def classes_(self) -> list[str]:
        return self._fitted().classes

    def predict_proba(self, data: "Path | str | TileCache | ImageTable",
                      alpha: float | None = None) -> dict[str, pd.DataFrame]:
        """``{"tiles", "wells", "treatments", "compounds"}`` → a frame of ``Metadata_*`` columns, ``prob_<class>``,
        the call (``Predicted_MoA``), ``Confidence`` and, where calibrated, the conformal set at ``alpha``
        (default: the classifier's ``predict`` settings); a compound is called from its treatments together."""
        bundle = self._fitted()
        config = self.predict_config if alpha is None else self.predict_config.model_copy(update={"alpha": alpha})
        PredictConfig.model_validate(config.model_dump())  # an alpha outside (0, 1) is refused here
        if isinstance(data, TileCache):
            return score_cache(bundle, data, config, self.progress)
        if isinstance(data, (str, Path)):
            return score_cache(bundle, TileCache(Path(data)), config, self.progress)
        return self._predict_table(bundle, data, config)

    def predict(self, data: "Path | str | TileCache | ImageTable") -> pd.Series:
        """Each treatment's call, indexed by compound and concentration."""
        treatments = self.predict_proba(data)["treatments"]
        return treatments.set_index(["Metadata_Compound", "Metadata_Concentration"])["Predicted_MoA"]

    def predict_sets(self, data: "Path | str | TileCache | ImageTable", alpha: float = 0.1) -> pd.DataFrame:
        """The treatments with their conformal prediction sets at level ``1 − alpha``."""
        bundle = self._fitted()
        if "treatments" not in bundle.calibration:
            raise CellmorphError(f"{bundle.root}: the model holds no calibration scores, so it makes no sets; fit it "
                                 "with calibration='loco' (or another compound hold-out)")
        return self.predict_proba(data, alpha=alpha)["treatments"]

    # ------------------------------------------------------------------ helpers
    def _fitted(self) -> Bundle:
        if self.bundle_ is None:
            raise NotFittedError("this MoAClassifier is not fitted: call fit(cache, out) or MoAClassifier.load(path)")
        return self.bundle_

    def _predict_table(self, bundle: Bundle, table: "ImageTable", config: PredictConfig) -> dict[str, pd.DataFrame]:
        """Raw images: prepared with the bundle's recipe into a temporary cache, scored, the cache removed."""
        from cellmorph.preprocess import prepare  # the image pipeline, only for raw images

        table = in_model_channel_order(bundle, table)
        with tempfile.TemporaryDirectory(prefix="cellmorph-predict-") as scratch:
            cache = Path(scratch) / "cache"
            prepare(table, cache, images_recipe(bundle, table, config), progress=self.progress,
                    threads=config.threads)
            return score_cache(bundle, TileCache(cache), config, self.progress)

    def __repr__(self) -> str:
        state = f"fitted: {self.bundle_.root}" if self.bundle_ is not None else "not fitted"
        return (f"MoAClassifier(model={self.config.model!r}, mode={self.config.mode!r}, "
                f"calibration={self.calibration!r}; {state})")
