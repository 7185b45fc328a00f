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

from cellmorph.augment import AugmentConfig, Augmenter, TTAMode
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
ACCURACY_KEYS = ("treatment_accuracy", "well_accuracy", "tile_accuracy")

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
    lr: float | None = Field(None, gt=0, description="default 1e-4 for the paper's models (paper; ×10 for xavier), 1e-2 for other models "
                              "(batch 32; measured best of 1e-3/1e-2/3e-2 on mini, benchmarks/RESULTS.md)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    class_weighting: bool = Field(True, description="class-weighted cross-entropy n/(k·n_c) as in the paper")
    image_size: int | None = Field(None, ge=16, description="model input size; default the model's (224/299)")
    cv: str = Field("loco", description="loco | group-kfold:K | nscb | well[:K] | batch | cell-line (leave one Metadata_Batch out)")
    include_controls_as_class: bool = Field(False, description="DMSO becomes a class (its wells are dealt across folds)")
    skip_untrainable_folds: bool = Field(False, description="skip (and report) folds whose test MoA has no training compound")
    max_tiles_per_fold: int | None = Field(None, ge=2, description="subsample each fold's training tiles (CPU runs)")
    freeze_stages: int = Field(
        0, ge=0, description="fine-tune only: freeze the stem and following stages, N coarse timm stages in all "
        "(0 = train everything); frozen early stages need no backward pass, the big CPU saving",
    )
    frozen_feature_cache: bool = Field(
        False, description="with freeze_stages: run the frozen stages once per run on `epochs` augmented copies "
        "of every tile and train each fold's remaining stages on those outputs, instead of re-running the "
        "frozen stages in every fold and epoch (LOCO: 38 folds × epochs passes become `epochs`; "
        "1.4× faster training steps for lite0 at 320 px on CPU). Each epoch of a fold uses a different copy, so a fold sees the same "
        "augmentation distribution; the copies are shared by folds. Needs copies × tiles × feature-map "
        "float32 disk in the run directory while the run is going (mini at 320 px: 1.5 GB)",
    )
    channels_last: bool = Field(True, description="NHWC tensors (oneDNN's fast layout on CPU, cuDNN's on CUDA)")
    eval_epochs: list[int] = Field(
        default_factory=list,
        description="also score each fold's model after these epochs (accuracy against training time, "
        "as in the paper's Fig. 4); the last epoch is always scored",
    )
    tta: TTAMode = Field(
        "none", description="test-time augmentation: dihedral averages each held-out tile's softmax over its 8 "
        "rotations/mirrors before the median aggregation (not in the paper; 8× prediction cost)",
    )
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

    @field_validator("eval_epochs")
    @classmethod
    def _check_eval_epochs(cls, value: list[int]) -> list[int]:
        if any(int(e) < 1 for e in value):
            raise ValueError("eval_epochs must be ≥ 1")
        return sorted({int(e) for e in value})

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
            if paper:
                lr = 1e-3 if self.init == "xavier" else 1e-4
            else:
                # Small nets at batch 32: 1e-2 fine-tuned EfficientNet-Lite0 far better than 1e-3
                # (group-kfold:4 on mini: treatment 0.69 vs 0.48) and 3e-2 was worse.
                lr = 1e-2
        epochs = self.epochs or 10
        late = [e for e in self.eval_epochs if e > epochs]
        if late:
            raise CellmorphError(f"eval_epochs {late} exceed epochs={epochs}")
        return self.model_copy(
            update={
                "eval_epochs": [e for e in self.eval_epochs if e < epochs],
                "epochs": epochs,
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
    """The fields that define what a run computes, for its fingerprint.

    Fields at their default are left out: a run started before a new option existed (new
    options default to the old behaviour) still resumes after an upgrade.
    """
    data = config.model_dump(mode="json", exclude_defaults=True)
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
def _finished_fold(fold_dir: Path, fingerprint: str) -> dict | None:
    """The fold's marker record if it finished with this fingerprint, else None."""
    marker = fold_dir / FOLD_DONE
    if not marker.is_file() or not (fold_dir / "predictions.parquet").is_file():
        return None
    try:
        record = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("fingerprint") == fingerprint else None


def _run_fold(cache, fold: Fold, classes, targets, config: CVConfig, spec: dict, seeds: dict, device, bar, tasks,
              frozen_features=None):
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
        channels_last=config.channels_last,
        freeze_stages=config.freeze_stages,
    )
    n_batches = max(1, len(train_rows) // config.batch_size + (len(train_rows) % config.batch_size >= 2))
    bar.reset(tasks["epochs"], total=config.epochs, description=f"  epochs ({fold.name})", info="")
    bar.reset(tasks["batches"], total=n_batches, description="  batches", info="")

    def on_batch():
        bar.advance(tasks["batches"])

    n_eval = -(-len(fold.test) // config.eval_batch_size)
    interim: dict[int, np.ndarray] = {}

    def on_epoch(record):
        bar.advance(tasks["epochs"])
        bar.update(tasks["epochs"], info=f"loss {record['loss']:.3f}  acc {record['train_accuracy']:.2f}")
        if record["epoch"] in config.eval_epochs:
            # Scoring in eval mode draws no random numbers, so the final model is the same with or without it.
            bar.reset(tasks["batches"], total=n_eval, description=f"  predicting (epoch {record['epoch']})")
            interim[record["epoch"]] = predict(model, pipeline, cache, fold.test, config.eval_batch_size, device,
                                               config.num_workers, config.amp, on_batch,
                                               channels_last=config.channels_last, tta=config.tta)
        if record["epoch"] < config.epochs:
            bar.reset(tasks["batches"], total=n_batches, description="  batches")

    torch.manual_seed(seeds["init"] + 1)  # dropout / stochastic depth draws
    history = fit(model, pipeline, cache, train_rows, targets[train_rows], len(classes), settings,
                  seeds["shuffle"], device, on_batch, on_epoch, frozen_features)
    bar.reset(tasks["batches"], total=n_eval, description="  predicting", info="")
    probs = predict(model, pipeline, cache, fold.test, config.eval_batch_size, device, config.num_workers,
                    config.amp, on_batch, channels_last=config.channels_last, tta=config.tta)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return train_rows, probs, history, state, interim


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


FROZEN_FEATURES = "frozen_features.npy"
FROZEN_FEATURES_MARKER = "frozen_features.json"  # what the features were computed for


def _frozen_feature_pool(cache, folds, targets, classes, config: CVConfig, spec: dict, device, out: Path,
                         fingerprint: str, fold_fps: dict, resume: bool, bar, tasks):
    """The frozen stages' output for ``epochs`` augmented copies of every tile some fold trains on.

    Kept in ``out`` while the run goes on, so ``--resume`` need not recompute it; the run
    deletes it once every fold is done. Returns None when every fold is already finished.
    """
    from cellmorph.datasets import InputPipeline
    from cellmorph.models import freeze_stages
    from cellmorph.models.split import FrozenSplit
    from cellmorph.train import FrozenFeatures, compute_frozen_features, create_network, example_batch

    if all(resume and _finished_fold(out / FOLDS_DIR / str(f.index), fold_fps[f.index]) for f in folds):
        return None
    # Every fold's rows, not only the unfinished folds': a tile's augmentation draws depend
    # on the rows before it, and a resumed run must train on the same copies.
    rows = np.unique(np.concatenate([f.train for f in folds]))
    rows = rows[targets[rows] >= 0]
    model = create_network(config.model, len(classes), config.init, config.weights, config.allow_network,
                           cache.tile_shape[0])
    freeze_stages(model, config.freeze_stages)
    # The copies' augmentation draws: a seed of their own, recorded through the run's seed.
    seed = int(np.random.SeedSequence([int(config.seed), 0xF7]).generate_state(1)[0])
    pipeline = InputPipeline(spec["mean"], spec["std"], spec["input_size"], Augmenter(config.augment, seed=seed))
    split = FrozenSplit(model.to(device), example_batch(pipeline, cache, rows, device))
    path, marker = out / FROZEN_FEATURES, out / FROZEN_FEATURES_MARKER
    key = {"fingerprint": fingerprint, "signature": split.signature, "rows": _digest(rows), "seed": seed}
    if path.is_file() and marker.is_file() and json.loads(marker.read_text()) == key:
        return FrozenFeatures(np.load(path, mmap_mode="r"), rows, split.signature)
    copies = int(config.epochs)
    # Batches of the training batch size (a fingerprinted field), not eval_batch_size (a runtime
    # field), because the augmentation draws depend on how tiles are batched.
    batches = -(-len(rows) // config.batch_size)
    bar.reset(tasks["batches"], total=copies * batches, description="  frozen stages, once",
              info=f"{copies} augmented copies × {len(rows)} tiles")
    with atomic_path(path, suffix=".npy") as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(copies, len(rows), *split.feature_shape))
        compute_frozen_features(split, pipeline, cache, rows, array, config.batch_size, device,
                                config.channels_last, lambda: bar.advance(tasks["batches"]))
        array.flush()
        del array
    write_json(marker, key)
    return FrozenFeatures(np.load(path, mmap_mode="r"), rows, split.signature)


def _fit_probe_head(features: np.ndarray, position: dict, train_rows: np.ndarray, targets, config: CVConfig, seed: int):
    """(logistic regression, scaler) on frozen embeddings of the training rows only (standardised inside the fold)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from threadpoolctl import threadpool_limits

    x_train = features[[position[r] for r in train_rows]]
    # One BLAS thread: these (n × 1280) problems are too small to share, and multi-threaded
    # BLAS spin-waits made each fold ~9× slower beside other work (benchmarks/RESULTS.md).
    with threadpool_limits(limits=1):
        scaler = StandardScaler().fit(x_train)
        head = LogisticRegression(
            max_iter=2000, class_weight="balanced" if config.class_weighting else None, random_state=seed
        ).fit(scaler.transform(x_train), targets[train_rows])
    return head, scaler


def _run_probe_fold(features: np.ndarray, position: dict, fold: Fold, targets, n_classes: int, config: CVConfig, seeds):
    """A logistic-regression head on frozen embeddings."""
    train_rows = _subsample(fold.train, targets[fold.train], config.max_tiles_per_fold, seeds["subsample"])
    head, scaler = _fit_probe_head(features, position, train_rows, targets, config, seeds["init"])
    probs = np.zeros((len(fold.test), n_classes), dtype=np.float64)
    probs[:, head.classes_] = head.predict_proba(scaler.transform(features[[position[r] for r in fold.test]]))
    state = {
        "coef": torch.from_numpy(head.coef_.astype(np.float32)),
        "intercept": torch.from_numpy(head.intercept_.astype(np.float32)),
        "classes_index": torch.from_numpy(head.classes_.astype(np.int64)),
        "scaler_mean": torch.from_numpy(scaler.mean_.astype(np.float32)),
        "scaler_scale": torch.from_numpy(scaler.scale_.astype(np.float32)),
    }
    return train_rows, probs, [], state, {}


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
    # Config combinations that cannot work, refused before any network is built.
    if base.tta != "none" and base.mode == "linear-probe":
        raise CellmorphError("tta applies to the finetune and linear modes; linear-probe embeds each tile once")
    if base.freeze_stages and base.mode == "finetune" and base.init == "xavier":
        # Frozen stages keep their initial weights and BatchNorm statistics: for Xavier that is a
        # fixed random filter bank with unit-variance BN, on which the head cannot learn (measured:
        # loss stays at ln 12 on mini). A from-scratch baseline must train every stage.
        raise CellmorphError("freeze_stages keeps the early stages at their initial weights, which for "
                             "init=xavier are random: use freeze_stages 0 with xavier")
    if base.frozen_feature_cache and not (base.mode == "finetune" and base.freeze_stages > 0):
        raise CellmorphError("frozen_feature_cache needs mode finetune with freeze_stages > 0 (there is nothing frozen to cache)")
    spec = model_spec(base.model, base.image_size)  # unknown model → CellmorphError before any work
    # Build the network once up front: a missing weights file or bad checkpoint fails here,
    # and the mean/std are those of the weights actually resolved.
    probe = create_network(base.model, len(classes), base.init, base.weights, base.allow_network, cache.tile_shape[0])
    spec = network_spec(probe, spec, base.image_size)
    if base.freeze_stages and base.mode == "finetune":
        from cellmorph.models import freeze_stages

        freeze_stages(probe, base.freeze_stages)  # too many stages → CellmorphError before any work
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
            new = cfg.model_dump(mode="json")
            diff = sorted(k for k in set(old) | set(new)
                          if k not in RUNTIME_FIELDS and old.get(k, new.get(k)) != new.get(k))
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
    interim_parts: dict[int, list[pd.DataFrame]] = {e: [] for e in cfg.eval_epochs}
    histories: dict[str, list[dict]] = {}
    fold_seconds: dict[int, float] = {}  # training + prediction time per fold, resumed folds included
    resumed_folds: list[int] = []
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
            frozen_features = None
            if cfg.frozen_feature_cache:
                frozen_features = _frozen_feature_pool(cache, folds, targets, classes, cfg, spec, device, out, run_fp,
                                                       fold_fps, resume, bar, tasks)
            for fold in folds:
                fold_dir = out / FOLDS_DIR / str(fold.index)
                finished = _finished_fold(fold_dir, fold_fps[fold.index]) if resume else None
                if finished:
                    parts.append(pd.read_parquet(fold_dir / "predictions.parquet"))
                    for e in cfg.eval_epochs:
                        interim_parts[e].append(pd.read_parquet(fold_dir / f"predictions_epoch{e}.parquet"))
                    histories[fold.name] = json.loads((fold_dir / "history.json").read_text())
                    fold_seconds[fold.index] = float(finished.get("seconds", 0.0))
                    resumed_folds.append(fold.index)
                    bar.advance(tasks["folds"])
                    continue
                (fold_dir / FOLD_DONE).unlink(missing_ok=True)
                bar.update(tasks["folds"], info=f"fold {fold.index}: {fold.name}")
                t0 = time.perf_counter()
                seeds = fold_seeds[fold.index]
                if cfg.mode == "linear-probe":
                    train_rows, probs, history, state, interim = _run_probe_fold(
                        probe_features, probe_position, fold, targets, len(classes), cfg, seeds
                    )
                else:
                    train_rows, probs, history, state, interim = _run_fold(
                        cache, fold, classes, targets, cfg, spec, seeds, device, bar, tasks, frozen_features
                    )
                frame = _predictions_frame(cache, fold.test, probs, classes, fold.index)
                for e, interim_probs in interim.items():
                    interim_frame = _predictions_frame(cache, fold.test, interim_probs, classes, fold.index)
                    _write_parquet(fold_dir / f"predictions_epoch{e}.parquet", interim_frame)
                    interim_parts[e].append(interim_frame)
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
                fold_seconds[fold.index] = seconds
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

    # Every fold is done: the frozen-stage features were only kept for resuming.
    (out / FROZEN_FEATURES).unlink(missing_ok=True)
    (out / FROZEN_FEATURES_MARKER).unlink(missing_ok=True)
    tiles = pd.concat(parts, ignore_index=True)
    _write_parquet(out / "predictions.parquet", tiles)
    tiles, wells, treatments = aggregate(tiles)
    metrics = compute_metrics(tiles, wells, treatments, classes, len(folds))
    if cfg.eval_epochs:
        by_epoch = {}
        for e in cfg.eval_epochs:
            t, w, tr = aggregate(pd.concat(interim_parts[e], ignore_index=True))
            by_epoch[str(e)] = {k: compute_metrics(t, w, tr, classes, len(folds))[k] for k in ACCURACY_KEYS}
        by_epoch[str(cfg.epochs)] = {k: metrics[k] for k in ACCURACY_KEYS}
        metrics["by_epoch"] = by_epoch
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
            # A resumed run's wall time covers only its last invocation; the fold sum covers them all.
            "seconds": time.perf_counter() - started,
            "fold_seconds_total": float(sum(fold_seconds.values())),
            "resumed_folds": resumed_folds,
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


# --------------------------------------------------------------------------- replicates
REPLICATE_DIR = "replicate-{}"


def run_replicates(
    data: Path,
    out: Path,
    config: CVConfig | dict | Path | None = None,
    replicates: int = 1,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """``replicates`` complete :func:`run_cv` runs that differ only in their seed (seed, seed+1, …).

    Each goes to ``out/replicate-<r>/`` (a normal run directory, resumable on its own).
    ``out/replicates.csv`` holds one row per replicate and scored epoch; ``out/metrics.json``
    holds the mean and standard deviation over replicates of every accuracy (the ``*_accuracy``
    keys are the means, so the file reads like a single run's) and the per-replicate figures.
    """
    if replicates < 1:
        raise CellmorphError(f"replicates must be ≥ 1, got {replicates}")
    base = validate_config(config if config is not None else {}, "config")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, runs = [], []
    for r in range(replicates):
        seed = base.seed + r
        run_dir = out / REPLICATE_DIR.format(r)
        done = (run_dir / "metrics.json").is_file()
        if done and not resume:
            raise CellmorphError(f"{run_dir} already holds a run; pass resume=True (--resume) to continue")
        metrics = run_cv(data, run_dir, base.model_copy(update={"seed": seed}), resume=resume, progress=progress)
        runs.append(metrics)
        scored = metrics.get("by_epoch") or {str(metrics["epochs"]): {k: metrics[k] for k in ACCURACY_KEYS}}
        for epoch, values in scored.items():
            rows.append({"replicate": r, "seed": seed, "init": metrics["init"], "model": metrics["model"],
                         "epoch": int(epoch), **{k: values[k] for k in ACCURACY_KEYS}})
    table = pd.DataFrame(rows)
    write_csv(out / "replicates.csv", table)
    summary = summarise_replicates(table)
    last = runs[-1]
    final = summary["by_epoch"][str(last["epochs"])]
    result = {
        **{k: final[k]["mean"] for k in ACCURACY_KEYS},
        **{f"{k}_std": final[k]["std"] for k in ACCURACY_KEYS},
        "n_replicates": replicates,
        "seeds": [base.seed + r for r in range(replicates)],
        "n_treatments": last["n_treatments"],
        "n_wells": last["n_wells"],
        "n_tiles": last["n_tiles"],
        "n_folds": last["n_folds"],
        "classes": last["classes"],
        "cv": last["cv"],
        "model": last["model"],
        "init": last["init"],
        "epochs": last["epochs"],
        "image_size": last["image_size"],
        "by_epoch": summary["by_epoch"],
        "replicates": [{"replicate": r, "seed": base.seed + r, **{k: m[k] for k in ACCURACY_KEYS}}
                       for r, m in enumerate(runs)],
        "seconds": float(sum(m["seconds"] for m in runs)),
        "provenance": run_info(),
    }
    write_json(out / "metrics.json", result)
    return result


def summarise_replicates(table: pd.DataFrame) -> dict:
    """Mean, standard deviation (ddof 1; 0 for one replicate), min and max per scored epoch."""
    by_epoch = {}
    for epoch, group in table.groupby("epoch", sort=True):
        stats = {}
        for key in ACCURACY_KEYS:
            values = group[key].to_numpy(dtype=float)
            stats[key] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "min": float(np.min(values)),
                "max": float(np.max(values)),
                "n": int(len(values)),
            }
        by_epoch[str(int(epoch))] = stats
    return {"by_epoch": by_epoch}


def compare_inits(
    data: Path,
    out: Path,
    config: CVConfig | dict | Path | None = None,
    inits: tuple[str, ...] = ("imagenet", "xavier"),
    epochs: tuple[int, ...] = (1, 5, 20),
    replicates: int = 3,
    metric: str = "well_accuracy",
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """The paper's Fig. 4: accuracy after each of ``epochs`` for every init, over replicates.

    One training of max(epochs) epochs per fold and replicate, scored after each listed
    epoch (``eval_epochs``), for each init in ``out/<init>/``; then
    ``out/init_comparison.csv`` and ``out/init_comparison.png``.
    """
    if metric not in ACCURACY_KEYS:
        raise CellmorphError(f"metric must be one of {', '.join(ACCURACY_KEYS)}, got {metric!r}")
    if not epochs or min(epochs) < 1:
        raise CellmorphError("epochs must be a non-empty list of positive integers")
    base = validate_config(config if config is not None else {}, "config")
    last = max(epochs)
    tables = []
    summary = {}
    for init in inits:
        update = {"init": init, "epochs": last, "eval_epochs": sorted(set(epochs) - {last})}
        if init == "xavier":
            update["freeze_stages"] = 0  # a from-scratch network trains every stage (see run_cv)
            update["frozen_feature_cache"] = False  # so nothing is frozen to cache
        cfg = base.model_copy(update=update)
        replicate_metrics = run_replicates(data, Path(out) / _safe_name(init), cfg, replicates, resume, progress)
        table = pd.read_csv(Path(out) / _safe_name(init) / "replicates.csv")
        table["init"] = init
        tables.append(table[table["epoch"].isin(epochs)])
        summary[init] = {e: replicate_metrics["by_epoch"][str(e)][metric] for e in sorted(epochs)}
    combined = pd.concat(tables, ignore_index=True)
    write_csv(Path(out) / "init_comparison.csv", combined)
    from cellmorph.report import plot_init_comparison

    n_classes = len(replicate_metrics["classes"])
    plot_init_comparison(combined, Path(out) / "init_comparison.png", metric=metric,
                         title=f"{base.model}, {base.cv} CV, {replicates} replicate(s)", chance=1.0 / n_classes)
    result = {"metric": metric, "epochs": sorted(epochs), "replicates": replicates,
              "by_init": {init: {str(e): v for e, v in s.items()} for init, s in summary.items()}}
    write_json(Path(out) / "init_comparison.json", result)
    return result


def _safe_name(init: str) -> str:
    return init if init in ("imagenet", "xavier") else "checkpoint-" + hashlib.sha256(init.encode()).hexdigest()[:8]
