"""The run directory of a cross-validation run: its one owner, writer and reader.

::

    config.yaml              resolved config, seeds, folds, data fingerprint, versions, git commit
    folds/<k>/predictions.parquet   that fold's test tiles (Metadata_* + prob_<class>)
    folds/<k>/predictions_epoch<e>.parquet   the same after epoch e (eval_epochs)
    folds/<k>/history.json   per epoch: training loss/accuracy/lr/seconds, schema.HELDOUT_ACCURACY where scored
    folds/<k>/state.pt       model weights + fold info (plain tensors; weights_only loads), per keep_checkpoints
    folds/<k>/fold.json      written last: marks the fold finished (resume skips it)
                             (a fold's folder is written under a hidden name, then renamed into place)
    embeddings.npy/.json     linear probe: frozen-backbone embeddings, kept for resume
    frozen_features.npy/.json   frozen-feature cache: kept for resume, deleted when the run ends
    predictions.parquet      all test tiles: Metadata_* + Metadata_Fold + prob_<class>
    wells.csv, treatments.csv   median aggregates with calls (Predicted_MoA, Correct)
    compounds.csv            each compound's call from its treatments together (metrics.aggregate_compounds)
    metrics.json             treatment/well/tile accuracy, counts, per-class accuracy, "map" (copairs mAP summary)
    map_moa.csv, map_replicates.csv   copairs mAP of the held-out probabilities per MoA / treatment
                             (cellmorph.retrieval; replicates only where DMSO wells were held out)
    classification_report.txt   sklearn report at treatment, well and tile level
    confusion_matrix.png/.csv   treatment level, classes × classes
    learning_curves.png      training loss and held-out accuracy per epoch per fold

Every file is written atomically. A run is resumable because each fold's outputs and
its marker carry the fold's fingerprint, a digest of everything that decides its result.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from cellmorph.errors import CellmorphError, option
from cellmorph.runinfo import LOCK_FILE, atomic_path, share_like_new, write_csv, write_json, write_text
from cellmorph.schema import CACHE_ROW_COLUMN, FOLD_COLUMN, TRUE_COLUMN, prob_column

CONFIG_FILE = "config.yaml"
FOLDS_DIR = "folds"
FOLD_DONE = "fold.json"
FOLD_PREDICTIONS = "predictions.parquet"
FOLD_HISTORY = "history.json"
FOLD_STATE = "state.pt"
PREDICTIONS_FILE = "predictions.parquet"
WELLS_FILE = "wells.csv"
TREATMENTS_FILE = "treatments.csv"
COMPOUNDS_FILE = "compounds.csv"
METRICS_FILE = "metrics.json"
REPORT_FILE = "classification_report.txt"
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"
CURVES_PNG = "learning_curves.png"
REPLICATE_DIR = "replicate-{}"  # one run directory per replicate
REPLICATES_CSV = "replicates.csv"
INIT_COMPARISON = "init_comparison"  # .csv, .png and .json of compare_inits
EMBEDDINGS = "embeddings.npy"
EMBEDDINGS_MARKER = "embeddings.json"
CONTROL_EMBEDDINGS = "control_embeddings.npy"  # the probe's negative-control tiles (the novelty score's origin)
CONTROL_EMBEDDINGS_MARKER = "control_embeddings.json"
FROZEN_FEATURES = "frozen_features.npy"
FROZEN_FEATURES_MARKER = "frozen_features.json"  # what the features were computed for


def fold_predictions_name(epoch: int | None = None) -> str:
    return FOLD_PREDICTIONS if epoch is None else f"predictions_epoch{epoch}.parquet"


# --------------------------------------------------------------------------- fingerprints
def digest(*parts) -> str:
    """16 hex digits of sha256 over arrays (their bytes) and JSON-able values."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def data_fingerprint(cache) -> str:
    """The cache's preprocessing, tile shape, tile ids and labels."""
    index = cache.index
    tile = index.get("Metadata_Tile", pd.Series(0, index=index.index))
    ids = index["Metadata_ImageID"].astype(str) + "#" + tile.astype(str)
    labels = index[TRUE_COLUMN].astype(str)
    return digest(cache.manifest.get("config_hash"), list(cache.tile_shape), "\n".join(ids), "\n".join(labels))


def compute_fields(config, runtime_fields: tuple[str, ...]) -> dict:
    """The config fields that define what a run computes, for its fingerprint.

    Fields at their default are left out: a run started before a new option existed (new
    options default to the old behaviour) still resumes after an upgrade.
    """
    from cellmorph.cv.config import IMPLICIT_EARLIER

    data = config.model_dump(mode="json", exclude_defaults=True)
    for key in runtime_fields:
        data.pop(key, None)
    for key, value in IMPLICIT_EARLIER.items():
        if key in data and getattr(config, key) == value:
            del data[key]
    return data


# --------------------------------------------------------------------------- records
@dataclass
class FoldOutput:
    """What one fold produced: held-out tile probabilities (and after earlier epochs), history."""

    predictions: pd.DataFrame
    history: list[dict]
    interim: dict[int, pd.DataFrame] = field(default_factory=dict)
    seconds: float = 0.0
    resumed: bool = False


def what_differs(old: dict, new: dict, runtime_fields: tuple[str, ...]) -> str:
    """Why a run's fingerprint differs from a config's, in words: the config fields (``old`` a run's recorded
    config, ``new`` the config at hand; runtime fields ignored), else the data or class set."""
    diff = sorted(k for k in set(old) | set(new) if k not in runtime_fields and old.get(k, new.get(k)) != new.get(k))
    return f"config field(s) {', '.join(diff)}" if diff else "the data (tile cache) or class set"


def predictions_frame(cache, rows: np.ndarray, probs: np.ndarray, classes, fold: int) -> pd.DataFrame:
    """Tiles ``rows`` of ``cache``: their ``Metadata_*`` columns, cache row, fold and ``prob_<class>``."""
    index = cache.index.iloc[rows]
    meta = index[[c for c in index.columns if c.startswith("Metadata_")]].reset_index(drop=True).copy()
    meta[CACHE_ROW_COLUMN] = rows.astype(np.int64)
    meta[FOLD_COLUMN] = int(fold)
    prob = pd.DataFrame(probs.astype(np.float32), columns=[prob_column(c) for c in classes])
    return pd.concat([meta, prob], axis=1)


# --------------------------------------------------------------------------- the directory
class RunDir:
    """Paths, resume state and every reader and writer of one run directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name

    def fold_dir(self, fold: int) -> Path:
        return self.root / FOLDS_DIR / str(int(fold))

    # ------------------------------------------------------------------ start / resume
    def finished_folds(self) -> list[int]:
        """Folds with a marker, whatever their fingerprint."""
        return sorted(int(p.parent.name) for p in (self.root / FOLDS_DIR).glob(f"*/{FOLD_DONE}") if p.parent.name.isdigit())

    def begin(self, header: dict, fingerprint: str, resume: bool, runtime_fields: tuple[str, ...]) -> None:
        """Write ``config.yaml`` for a new run, or check that ``resume`` continues the same run.

        A directory whose earlier run failed before finishing any fold holds nothing worth
        keeping, so it is started afresh instead of blocking the same command.
        """
        config_path = self.path(CONFIG_FILE)
        finished = self.finished_folds()
        if resume and not config_path.is_file():
            # --resume promises to continue a run; starting a fresh one in its place would hide a
            # mistyped --out until the run (hours later) turns out to be new.
            raise CellmorphError(f"{self.root}: {option('resume')}: not a cellmorph run (no {CONFIG_FILE}); "
                                 f"check {option('out')}, or drop {option('resume')} to start a run there")
        if config_path.is_file() and finished:
            if not resume:
                raise CellmorphError(
                    f"{self.root} already holds a run ({len(finished)} fold(s) finished): "
                    f"continue it with {option('resume')}, or choose another {option('out')}"
                )
            previous = yaml.safe_load(config_path.read_text()) or {}
            if previous.get("fingerprint") != fingerprint:
                what = what_differs(previous.get("config", {}), header["config"], runtime_fields)
                raise CellmorphError(f"{self.root}: cannot resume: {what} differ from the run being resumed")
        self.remove_temporaries()
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(config_path) as tmp:
            tmp.write_text(yaml.safe_dump(header | {"fingerprint": fingerprint}, sort_keys=False, allow_unicode=True))

    def remove_temporaries(self) -> None:
        """What a killed run left half-written: hidden ``.<name>.*`` files of atomic writes and
        hidden staging folders of folds (see :meth:`write_fold`)."""
        folds = self.root / FOLDS_DIR
        for folder in [self.root, folds, *sorted(folds.glob("[!.]*"))]:
            if folder.is_dir():
                for tmp in folder.glob(".*"):
                    if tmp.is_file() and tmp.name != LOCK_FILE:  # the lock is held by this very run
                        tmp.unlink(missing_ok=True)
                    elif tmp.is_dir() and folder == folds:
                        shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------ folds
    def finished_fold(self, fold: int, fingerprint: str) -> dict | None:
        """The fold's marker record if it finished with this fingerprint, else None."""
        marker = self.fold_dir(fold) / FOLD_DONE
        if not marker.is_file() or not (self.fold_dir(fold) / FOLD_PREDICTIONS).is_file():
            return None
        try:
            record = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return record if record.get("fingerprint") == fingerprint else None

    def read_fold_predictions(self, fold: int, epoch: int | None = None) -> pd.DataFrame:
        return pd.read_parquet(self.fold_dir(fold) / fold_predictions_name(epoch))

    def read_fold(self, fold: int, marker: dict, eval_epochs: list[int]) -> FoldOutput:
        folder = self.fold_dir(fold)
        return FoldOutput(
            predictions=pd.read_parquet(folder / FOLD_PREDICTIONS),
            history=json.loads((folder / FOLD_HISTORY).read_text()),
            interim={e: pd.read_parquet(folder / fold_predictions_name(e)) for e in eval_epochs},
            seconds=float(marker.get("seconds", 0.0)),
            resumed=True,
        )

    def write_fold(self, fold: int, output: FoldOutput, state: dict | None, marker: dict, keep: str) -> bool:
        """The fold's outputs, its weights unless ``keep`` is none, and last its marker: all written
        into a hidden staging folder that is then renamed into place, so ``folds/<k>/`` is either
        complete or absent, whichever process (a Dask worker, a Slurm task) wrote it.

        Returns False when another attempt at the same fold (a retry on a second worker after the
        first was presumed lost) finished first: its result, identical by construction, stays.
        """
        folds = self.root / FOLDS_DIR
        folds.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".fold-{int(fold)}.", dir=folds))
        share_like_new(staging)  # mkdtemp's 0700 would survive the rename into folds/<k>
        try:
            for epoch, frame in output.interim.items():
                _write_parquet(staging / fold_predictions_name(epoch), frame)
            _write_parquet(staging / FOLD_PREDICTIONS, output.predictions)
            write_json(staging / FOLD_HISTORY, output.history)
            if state is not None and keep != "none":
                with atomic_path(staging / FOLD_STATE) as tmp:
                    torch.save(state, tmp)
            write_json(staging / FOLD_DONE, marker)
            return self._commit_fold(fold, staging, marker["fingerprint"])
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed into place

    def _commit_fold(self, fold: int, staging: Path, fingerprint: str) -> bool:
        final = self.fold_dir(fold)
        for _ in range(5):
            if self.finished_fold(fold, fingerprint):
                return False  # a concurrent attempt won the race
            if final.exists():
                # An unfinished attempt's leftovers (older releases wrote in place): moved aside
                # first, because a rename cannot replace a non-empty folder.
                aside = final.with_name(f".stale-{int(fold)}.{uuid.uuid4().hex[:8]}")
                try:
                    os.rename(final, aside)
                except FileNotFoundError:
                    continue
                shutil.rmtree(aside, ignore_errors=True)
            try:
                os.rename(staging, final)
                return True
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        raise CellmorphError(f"{final}: could not put the fold's results in place (another process keeps "
                             "writing there)")

    def drop_fold_state(self, fold: int) -> None:
        """Delete a fold's saved weights (keep_checkpoints last: only the last fold's stay)."""
        (self.fold_dir(fold) / FOLD_STATE).unlink(missing_ok=True)

    def fold_state(self, fold: int) -> dict:
        """A fold's saved weights and record (``weights_only`` load: plain tensors and types only)."""
        path = self.fold_dir(fold) / FOLD_STATE
        if not path.is_file():
            raise CellmorphError(f"{path}: no saved weights for fold {fold} (run cv with {option('keep_checkpoints')} all)")
        return torch.load(path, map_location="cpu", weights_only=True)

    # ------------------------------------------------------------------ run-level files
    def write_tables(self, tiles, wells, treatments, compounds, report_text: str, matrix, classes) -> None:
        _write_parquet(self.path(PREDICTIONS_FILE), tiles)
        write_csv(self.path(WELLS_FILE), wells)
        write_csv(self.path(TREATMENTS_FILE), treatments)
        write_csv(self.path(COMPOUNDS_FILE), compounds)
        frame = pd.DataFrame(matrix, index=classes, columns=classes).rename_axis("true\\predicted").reset_index()
        write_csv(self.path(CONFUSION_CSV), frame)
        write_text(self.path(REPORT_FILE), report_text)

    def write_metrics(self, metrics: dict) -> None:
        """Written last: a run with ``metrics.json`` is complete."""
        write_json(self.path(METRICS_FILE), metrics)

    def read_config(self) -> dict:
        path = self.path(CONFIG_FILE)
        if not path.is_file():
            raise CellmorphError(f"{self.root}: not a cellmorph run directory (no {CONFIG_FILE})")
        return yaml.safe_load(path.read_text()) or {}

    def read_metrics(self) -> dict:
        path = self.path(METRICS_FILE)
        if not path.is_file():
            raise CellmorphError(f"{self.root}: not a finished run (no {METRICS_FILE})")
        return json.loads(path.read_text())

    def read_treatments(self) -> pd.DataFrame:
        """Per-treatment median probabilities and calls of a finished run."""
        return pd.read_csv(self.path(TREATMENTS_FILE))

    def read_levels(self) -> dict[str, pd.DataFrame]:
        """A finished run's held-out probabilities per treatment, well and tile."""
        return {"treatments": self.read_treatments(), "wells": pd.read_csv(self.path(WELLS_FILE)),
                "tiles": pd.read_parquet(self.path(PREDICTIONS_FILE))}

    def has_results(self) -> bool:
        return self.path(METRICS_FILE).is_file()

    # ------------------------------------------------------------------ shared feature files
    def read_marked_array(self, name: str, marker_name: str, key: dict, mmap: bool = False) -> np.ndarray | None:
        """An array kept for resume, if its marker records every item of ``key``."""
        path, marker = self.path(name), self.path(marker_name)
        if not (path.is_file() and marker.is_file()):
            return None
        try:
            record = json.loads(marker.read_text())
            if all(record.get(k) == v for k, v in key.items()):
                return np.load(path, mmap_mode="r" if mmap else None)
        except (OSError, ValueError):
            pass
        return None

    def write_marked_array(self, name: str, marker_name: str, marker: dict, fill) -> None:
        """``fill(tmp_path)`` writes the array's .npy; the marker follows once it is complete."""
        with atomic_path(self.path(name), suffix=".npy") as tmp:
            fill(tmp)
        write_json(self.path(marker_name), marker)

    def remove(self, *names: str) -> None:
        for name in names:
            self.path(name).unlink(missing_ok=True)


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
