"""Cross-validated fine-tuning on a tile cache: the public :func:`run_cv` API.

::

    from cellmorph.experiment import CVConfig, run_cv
    metrics = run_cv("CACHE", "runs/r50", CVConfig(model="resnet50", cv="loco"))

Run directory (every file written atomically)::

    config.yaml              resolved config, seeds, folds, data fingerprint, versions, git commit
    folds/<k>/predictions.parquet   that fold's test tiles (Metadata_* + prob_<class>)
    folds/<k>/history.json   per-epoch training loss/accuracy/lr/seconds
    folds/<k>/state.pt       model weights + fold info (tensors and plain types; weights_only loads)
    folds/<k>/fold.json      written last: marks the fold finished (resume skips it)
    predictions.parquet      all test tiles: Metadata_* + Metadata_Fold + prob_<class>
    wells.csv, treatments.csv   median aggregates with calls (Predicted_MoA, Correct)
    metrics.json             treatment/well/tile accuracy, counts, per-class accuracy
    classification_report.txt   sklearn report at treatment level (and well, tile)
    confusion_matrix.png/.csv   treatment-level, classes × classes
    learning_curves.png      training loss per epoch per fold

Each fold's seeds derive from (seed, fold number) only, so ``resume=True`` after a
kill gives exactly the predictions of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cellmorph.augment import AugmentConfig, Augmenter
from cellmorph.errors import CellmorphError, validated
from cellmorph.evaluate import (
    PROB_PREFIX,
    TRUE_COLUMN,
    Fold,
    aggregate,
    class_names,
    classification_text,
    compute_metrics,
    confusion,
    make_folds,
    parse_cv,
)
from cellmorph.runinfo import read_yaml_mapping, atomic_path, write_csv, run_info, write_json, write_text

CONFIG_FILE = "config.yaml"
FOLDS_DIR = "folds"
FOLD_DONE = "fold.json"
PAPER_MODELS = ("resnet50", "inception_v3", "inception_resnet_v2")

# Fields that change how a run computes, not what it computes: they may differ on resume.
RUNTIME_FIELDS = ("num_workers", "num_threads", "eval_batch_size")


class CVConfig(BaseModel):
    """Everything that defines a cross-validation run. ``None`` means "per-model default"."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("resnet50", description="any timm model name (paper: resnet50, inception_v3, inception_resnet_v2)")
    init: str = Field("imagenet", description="imagenet | xavier | path to a checkpoint")
    weights: str | None = Field(None, description="explicit ImageNet weights file for init=imagenet")
    allow_network: bool = Field(False, description="let timm download weights (never needed offline)")
    mode: Literal["finetune", "linear", "linear-probe"] = Field(
        "finetune",
        description="finetune: train all layers; linear: train only the new head by SGD; linear-probe: "
        "frozen-backbone embeddings computed once per run, a logistic-regression head per fold",
    )
    epochs: int | None = Field(None, ge=1, description="default 10 (paper)")
    batch_size: int | None = Field(None, ge=2, description="default 8 for the paper's models (paper), 32 otherwise")
    lr: float | None = Field(None, gt=0, description="default 1e-4 for the paper's models (paper), 1e-3 others; ×10 for xavier")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    class_weighting: bool = Field(True, description="class-weighted cross-entropy n/(k·n_c) as in the paper")
    image_size: int | None = Field(None, ge=16, description="model input size; default the model's (224/299)")
    cv: str = Field("loco", description="loco | group-kfold:K | nscb | well[:K] | batch | cell-line (leave one Metadata_Batch out)")
    include_controls_as_class: bool = Field(False, description="DMSO becomes a class (its wells are dealt across folds)")
    skip_untrainable_folds: bool = Field(False, description="skip (and report) folds whose test MoA has no training compound")
    max_tiles_per_fold: int | None = Field(None, ge=2, description="subsample each fold's training tiles (CPU runs)")
    seed: int = Field(0, ge=0)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    device: str = Field("auto", description="auto | cpu | cuda[:N]")
    amp: bool | None = Field(None, description="mixed precision; default on for CUDA, always off on CPU")
    deterministic: bool = True
    num_workers: int = Field(0, ge=0, description="tile-reading worker processes")
    num_threads: int | None = Field(None, ge=1, description="torch.set_num_threads (untouched when None)")
    eval_batch_size: int | None = Field(None, ge=1, description="default 2 × batch_size")

    @field_validator("cv")
    @classmethod
    def _check_cv(cls, value: str) -> str:
        return str(parse_cv(value))

    @classmethod
    def from_yaml(cls, path: Path, **overrides) -> "CVConfig":
        path = Path(path)
        data = read_yaml_mapping(path)
        data = data.get("config", data) if "config" in data and isinstance(data["config"], dict) else data
        data.update({k: v for k, v in overrides.items() if v is not None})
        return validate_config(data, str(path))

    def resolved(self) -> "CVConfig":
        """A copy with the per-model defaults filled in (epochs, batch_size, lr, eval_batch_size)."""
        paper = self.model in PAPER_MODELS
        batch = self.batch_size or (8 if paper else 32)
        lr = self.lr
        if lr is None:
            lr = 1e-4 if paper else 1e-3
            if self.init == "xavier":
                lr *= 10
        return self.model_copy(
            update={
                "epochs": self.epochs or 10,
                "batch_size": batch,
                "lr": lr,
                "eval_batch_size": self.eval_batch_size or 2 * batch,
            }
        )


def load_cv_config(path: Path | None = None, **overrides) -> CVConfig:
    """For the CLI: a YAML file (optional) with command-line options on top (``None`` = not given)."""
    if path is not None:
        return CVConfig.from_yaml(Path(path), **overrides)
    return validate_config({k: v for k, v in overrides.items() if v is not None}, "cv options")


def validate_config(data: Any, where: str = "config") -> CVConfig:
    if isinstance(data, CVConfig):
        return data
    if isinstance(data, (str, Path)):
        return CVConfig.from_yaml(Path(data))
    if not isinstance(data, dict):
        raise CellmorphError(f"{where}: expected a CVConfig, a mapping or a YAML path")
    return validated(CVConfig, data, where)


# --------------------------------------------------------------------------- helpers
def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _data_fingerprint(cache) -> str:
    index = cache.index
    ids = (index["Metadata_ImageID"].astype(str) + "#" + index.get("Metadata_Tile", pd.Series(0, index=index.index)).astype(str))
    labels = index[TRUE_COLUMN].astype(str)
    return _digest(cache.manifest.get("config_hash"), list(cache.tile_shape), "\n".join(ids), "\n".join(labels))


def _compute_fields(config: CVConfig) -> dict:
    data = config.model_dump(mode="json")
    for key in RUNTIME_FIELDS:
        data.pop(key, None)
    return data


def _subsample(rows: np.ndarray, labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most ``limit`` rows, proportionally per class (at least one each), seeded."""
    if limit is None or len(rows) <= limit:
        return rows
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.maximum(1, np.floor(limit * counts / counts.sum()).astype(int))
    while quota.sum() > limit:
        quota[np.argmax(quota)] -= 1
    remainder = limit - quota.sum()
    order = np.argsort(-(limit * counts / counts.sum() - quota), kind="stable")
    for i in order[:remainder]:
        quota[i] += 1
    chosen = []
    for cls, q in zip(classes, quota):
        pool = rows[labels == cls]
        chosen.append(pool[rng.permutation(len(pool))[: min(q, len(pool))]])
    return np.sort(np.concatenate(chosen))


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not enabled,
        transient=False,
    )


def _write_yaml(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(payload, sort_keys=False, allow_unicode=True))


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def _remove_temporaries(out: Path) -> None:
    """Half-written files a killed run left behind (atomic writes use hidden ``.<name>.*`` temporaries)."""
    for folder in [out, *sorted((out / FOLDS_DIR).glob("*"))]:
        if folder.is_dir():
            for tmp in folder.glob(".*"):
                if tmp.is_file():
                    tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- one fold
def _fold_done(fold_dir: Path, fingerprint: str) -> bool:
    marker = fold_dir / FOLD_DONE
    if not marker.is_file() or not (fold_dir / "predictions.parquet").is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("fingerprint") == fingerprint
    except (OSError, json.JSONDecodeError):
        return False


def _run_fold(cache, fold: Fold, classes, targets, config: CVConfig, spec: dict, seeds: dict, device, bar, tasks):
    from cellmorph.datasets import InputPipeline
    from cellmorph.train import TrainSettings, create_network, fit, predict

    train_rows = _subsample(fold.train, targets[fold.train], config.max_tiles_per_fold, seeds["subsample"])
    torch.manual_seed(seeds["init"])
    model = create_network(
        config.model,
        len(classes),
        init=config.init,
        weights=config.weights,
        allow_network=config.allow_network,
        in_chans=cache.tile_shape[0],
    )
    augmenter = Augmenter(config.augment, seed=seeds["augment"])
    pipeline = InputPipeline(spec["mean"], spec["std"], spec["input_size"], augmenter)
    settings = TrainSettings(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        lr_schedule=config.lr_schedule,
        class_weighting=config.class_weighting,
        mode=config.mode,
        num_workers=config.num_workers,
        eval_batch_size=config.eval_batch_size,
        amp=config.amp,
    )
    n_batches = max(1, len(train_rows) // config.batch_size + (len(train_rows) % config.batch_size >= 2))
    bar.reset(tasks["epochs"], total=config.epochs, description=f"  epochs ({fold.name})", info="")
    bar.reset(tasks["batches"], total=n_batches, description="  batches", info="")

    def on_batch():
        bar.advance(tasks["batches"])

    def on_epoch(record):
        bar.advance(tasks["epochs"])
        bar.update(tasks["epochs"], info=f"loss {record['loss']:.3f}  acc {record['train_accuracy']:.2f}")
        if record["epoch"] < config.epochs:
            bar.reset(tasks["batches"], total=n_batches)

    torch.manual_seed(seeds["init"] + 1)  # dropout / stochastic depth draws
    history = fit(model, pipeline, cache, train_rows, targets[train_rows], len(classes), settings,
                  seeds["shuffle"], device, on_batch, on_epoch)
    n_eval = -(-len(fold.test) // config.eval_batch_size)
    bar.reset(tasks["batches"], total=n_eval, description="  predicting", info="")
    probs = predict(model, pipeline, cache, fold.test, config.eval_batch_size, device, config.num_workers,
                    config.amp, on_batch)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return train_rows, probs, history, state


def _probe_features(cache, rows: np.ndarray, config: CVConfig, spec: dict, device, out: Path, fingerprint: str):
    """Frozen-backbone embeddings of ``rows``, computed once per run and kept in ``out`` for resume."""
    from cellmorph.embed import embed_tiles

    path = out / "embeddings.npy"
    marker = out / "embeddings.json"
    if path.is_file() and marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
        return np.load(path)
    feats = embed_tiles(
        cache, config.model, rows, config.init, Path(config.weights) if config.weights else None,
        spec["input_size"], config.eval_batch_size, str(device), config.allow_network, progress=False,
    )
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, feats)
    write_json(marker, {"fingerprint": fingerprint, "rows": int(len(rows)), "dim": int(feats.shape[1])})
    return feats


def _run_probe_fold(features: np.ndarray, position: dict, fold: Fold, targets, n_classes: int, config: CVConfig, seeds):
    """A logistic-regression head on frozen embeddings (standardised inside the fold)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train_rows = _subsample(fold.train, targets[fold.train], config.max_tiles_per_fold, seeds["subsample"])
    x_train = features[[position[r] for r in train_rows]]
    scaler = StandardScaler().fit(x_train)
    head = LogisticRegression(
        max_iter=2000, class_weight="balanced" if config.class_weighting else None, random_state=seeds["init"]
    ).fit(scaler.transform(x_train), targets[train_rows])
    probs = np.zeros((len(fold.test), n_classes), dtype=np.float64)
    probs[:, head.classes_] = head.predict_proba(scaler.transform(features[[position[r] for r in fold.test]]))
    state = {
        "coef": torch.from_numpy(head.coef_.astype(np.float32)),
        "intercept": torch.from_numpy(head.intercept_.astype(np.float32)),
        "classes_index": torch.from_numpy(head.classes_.astype(np.int64)),
        "scaler_mean": torch.from_numpy(scaler.mean_.astype(np.float32)),
        "scaler_scale": torch.from_numpy(scaler.scale_.astype(np.float32)),
    }
    return train_rows, probs, [], state


def _predictions_frame(cache, rows: np.ndarray, probs: np.ndarray, classes, fold: int) -> pd.DataFrame:
    index = cache.index.iloc[rows]
    meta = index[[c for c in index.columns if c.startswith("Metadata_")]].reset_index(drop=True).copy()
    meta["Metadata_CacheRow"] = rows.astype(np.int64)
    meta["Metadata_Fold"] = int(fold)
    prob = pd.DataFrame(probs.astype(np.float32), columns=[PROB_PREFIX + c for c in classes])
    return pd.concat([meta, prob], axis=1)


# --------------------------------------------------------------------------- the run
def run_cv(
    data: Path,
    out: Path,
    config: CVConfig | dict | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Cross-validate ``config.model`` on the tile cache ``data``; write the run to ``out``.

    Returns the metrics dict (also in ``out/metrics.json``). ``resume=True`` continues
    a run in ``out`` made with the same config and data, skipping finished folds.
    """
    from cellmorph.cache import TileCache
    from cellmorph.train import create_network, derive_seeds, deterministic, model_spec, network_spec, resolve_device

    started = time.perf_counter()
    base = validate_config(config if config is not None else {}, "config")
    cache = TileCache(Path(data))
    out = Path(out)
    index = cache.index
    classes = class_names(index, base.include_controls_as_class)
    folds, skipped = make_folds(index, base.cv, base.include_controls_as_class, base.seed, base.skip_untrainable_folds)
    if not folds:
        raise CellmorphError(f"cv {base.cv}: every fold was skipped; nothing to train")
    if cache.tile_shape[0] != 3 and base.init != "xavier":
        raise CellmorphError(
            f"{data}: tiles have {cache.tile_shape[0]} channels but ImageNet models take 3; "
            "prepare with pad_channels=3 or use init=xavier"
        )
    spec = model_spec(base.model, base.image_size)  # unknown model → CellmorphError before any work
    # Build the network once up front: a missing weights file or bad checkpoint fails here,
    # and the mean/std are those of the weights actually resolved.
    probe = create_network(base.model, len(classes), base.init, base.weights, base.allow_network, cache.tile_shape[0])
    spec = network_spec(probe, spec, base.image_size)
    init_info = {k: v for k, v in (getattr(probe, "cellmorph_init", None) or {}).items() if isinstance(v, (str, int, float, list))}
    del probe
    cfg = base.resolved().model_copy(update={"image_size": spec["input_size"]})
    if len(spec["mean"]) != cache.tile_shape[0]:
        spec["mean"] = (spec["mean"] * cache.tile_shape[0])[: cache.tile_shape[0]]
        spec["std"] = (spec["std"] * cache.tile_shape[0])[: cache.tile_shape[0]]
    device = resolve_device(cfg.device)
    label_of = {c: i for i, c in enumerate(classes)}
    targets = index[TRUE_COLUMN].astype(str).map(label_of).fillna(-1).astype(np.int64).to_numpy()

    fold_seeds = {f.index: derive_seeds(cfg.seed, f.index) for f in folds}
    data_fp = _data_fingerprint(cache)
    run_fp = _digest(_compute_fields(cfg), data_fp, classes, spec, init_info.get("sha256"))
    fold_fps = {f.index: _digest(run_fp, f.index, f.train, f.test, fold_seeds[f.index]) for f in folds}

    config_path = out / CONFIG_FILE
    if config_path.is_file():
        if not resume:
            raise CellmorphError(f"{out} already holds a run; pass resume=True (--resume) to continue it or choose another output")
        previous = yaml.safe_load(config_path.read_text()) or {}
        if previous.get("fingerprint") != run_fp:
            old = previous.get("config", {})
            new = _compute_fields(cfg)
            diff = sorted(k for k in set(old) | set(new) if k not in RUNTIME_FIELDS and old.get(k) != new.get(k))
            what = f"config field(s) {', '.join(diff)}" if diff else "the data (tile cache) or class set"
            raise CellmorphError(f"{out}: cannot resume: {what} differ from the run being resumed")
        _remove_temporaries(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_yaml(
        config_path,
        {
            "config": cfg.model_dump(mode="json"),
            "data": str(Path(data).resolve()),
            "data_fingerprint": data_fp,
            "fingerprint": run_fp,
            "classes": classes,
            "model_input": spec,
            "model_init": init_info,
            "device": str(device),
            "seeds": {"seed": cfg.seed, "folds": {str(k): v for k, v in fold_seeds.items()}},
            "cv": {
                "scheme": cfg.cv,
                "n_folds": len(folds),
                "folds": [f.describe() for f in folds],
                "skipped": skipped,
            },
            "provenance": run_info(),
        },
    )

    old_threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    parts: list[pd.DataFrame] = []
    histories: dict[str, list[dict]] = {}
    fold_seconds: list[float] = []
    try:
        with deterministic(cfg.deterministic), _progress(progress) as bar:
            tasks = {
                "folds": bar.add_task("folds", total=len(folds), info=""),
                "epochs": bar.add_task("  epochs", total=cfg.epochs, info=""),
                "batches": bar.add_task("  batches", total=1, info=""),
            }
            probe_features, probe_position = None, {}
            if cfg.mode == "linear-probe":
                # Embeddings once for every tile any fold uses; each fold then fits only a head.
                probe_rows = np.unique(np.concatenate([np.concatenate([f.train, f.test]) for f in folds]))
                probe_position = {int(r): i for i, r in enumerate(probe_rows)}
                bar.update(tasks["folds"], info=f"embedding {len(probe_rows)} tiles once")
                probe_features = _probe_features(cache, probe_rows, cfg, spec, device, out, run_fp)
            for fold in folds:
                fold_dir = out / FOLDS_DIR / str(fold.index)
                if resume and _fold_done(fold_dir, fold_fps[fold.index]):
                    parts.append(pd.read_parquet(fold_dir / "predictions.parquet"))
                    histories[fold.name] = json.loads((fold_dir / "history.json").read_text())
                    bar.advance(tasks["folds"])
                    continue
                (fold_dir / FOLD_DONE).unlink(missing_ok=True)
                bar.update(tasks["folds"], info=f"fold {fold.index}: {fold.name}")
                t0 = time.perf_counter()
                seeds = fold_seeds[fold.index]
                if cfg.mode == "linear-probe":
                    train_rows, probs, history, state = _run_probe_fold(
                        probe_features, probe_position, fold, targets, len(classes), cfg, seeds
                    )
                else:
                    train_rows, probs, history, state = _run_fold(
                        cache, fold, classes, targets, cfg, spec, seeds, device, bar, tasks
                    )
                frame = _predictions_frame(cache, fold.test, probs, classes, fold.index)
                _write_parquet(fold_dir / "predictions.parquet", frame)
                write_json(fold_dir / "history.json", history)
                with atomic_path(fold_dir / "state.pt") as tmp:
                    torch.save(
                        {
                            "model": state,
                            "model_name": cfg.model,
                            "classes": list(classes),
                            "fold": fold.describe(),
                            "seeds": dict(seeds),
                            "input": dict(spec),
                            "history": history,
                        },
                        tmp,
                    )
                seconds = time.perf_counter() - t0
                fold_seconds.append(seconds)
                write_json(
                    fold_dir / FOLD_DONE,
                    fold.describe()
                    | {"fingerprint": fold_fps[fold.index], "seeds": seeds, "n_train_used": int(len(train_rows)), "seconds": seconds},
                )
                parts.append(frame)
                histories[fold.name] = history
                bar.advance(tasks["folds"])
    finally:
        if cfg.num_threads:
            torch.set_num_threads(old_threads)

    tiles = pd.concat(parts, ignore_index=True)
    _write_parquet(out / "predictions.parquet", tiles)
    tiles, wells, treatments = aggregate(tiles)
    metrics = compute_metrics(tiles, wells, treatments, classes, len(folds))
    epoch_seconds = [h["seconds"] for hist in histories.values() for h in hist]
    metrics.update(
        {
            "cv": cfg.cv,
            "model": cfg.model,
            "init": cfg.init,
            "image_size": spec["input_size"],
            "epochs": cfg.epochs,
            "skipped_folds": skipped,
            "seconds_per_epoch": float(np.mean(epoch_seconds)) if epoch_seconds else None,
            "seconds": time.perf_counter() - started,
            "device": str(device),
        }
    )
    write_csv(out / "wells.csv", wells)
    write_csv(out / "treatments.csv", treatments)
    matrix = confusion(treatments, classes)
    write_csv(out / "confusion_matrix.csv", pd.DataFrame(matrix, index=classes, columns=classes).rename_axis("true\\predicted").reset_index())
    report = (
        f"Treatment level ({len(treatments)} treatments, median of well medians)\n"
        + classification_text(treatments, classes)
        + f"\nWell level ({len(wells)} wells, median of tiles)\n"
        + classification_text(wells, classes)
        + f"\nTile level ({len(tiles)} tiles)\n"
        + classification_text(tiles, classes)
    )
    write_text(out / "classification_report.txt", report)
    from cellmorph.report import plot_confusion, plot_learning_curves

    plot_confusion(matrix, classes, out / "confusion_matrix.png",
                   title=f"{cfg.model} {cfg.cv}: treatment accuracy {metrics['treatment_accuracy']:.3f}")
    if any(histories.values()):  # a linear probe has no epochs to plot
        plot_learning_curves(histories, out / "learning_curves.png")
    write_json(out / "metrics.json", metrics)
    return metrics
