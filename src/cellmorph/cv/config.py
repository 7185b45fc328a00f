"""The settings of a cross-validation run: :class:`CVConfig`, loadable from YAML.

Field descriptions double as the command-line help (``cellmorph cv --help``), so they are
written once, here. Rules between fields are pydantic model validators: a config file
that loads is a config that can run (up to what only the data can tell, e.g. its channels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cellmorph.config.augment import AugmentConfig, TTAMode
from cellmorph.config.features import DEFAULT_FEATURES, FeatureSpec
from cellmorph.config.runtime import MAX_THREADS
from cellmorph.config.scheme import CV_CHOICES, parse_cv
from cellmorph.errors import CellmorphError, validated
from cellmorph.runinfo import read_yaml_mapping

PAPER_MODELS = ("resnet50", "inception_v3", "inception_resnet_v2")
DEFAULT_EPOCHS = 10

# Fields an ensemble's members share: the folds and classes (so their held-out predictions are of the
# same tiles), where they run, and the ensemble list itself.
ENSEMBLE_SHARED_FIELDS = ("ensemble", "cv", "fold_seed", "include_controls_as_class", "strict", "skip_untrainable_folds",
                          "max_tiles_per_fold", "device", "num_threads", "num_workers", "deterministic")

# Fields that change how a run computes, what it keeps or how it is evaluated, not what its folds compute: they
# may differ on resume and stay out of the run's fingerprint.
RUNTIME_FIELDS = ("num_workers", "num_threads", "eval_batch_size", "keep_checkpoints", "open_set_reference")

KeepCheckpoints = Literal["all", "last", "none"]

# Values that every run made before a field existed computed with: left out of fingerprints like
# defaults, so those runs still resume (before `features`, every linear probe used the head; before
# `probe_head`, the logistic one).
IMPLICIT_EARLIER = {"features": FeatureSpec(), "probe_head": "logistic"}


class CVConfig(BaseModel):
    """Everything that defines a cross-validation run. ``None`` means "per-model default"."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("resnet50", description="timm backbone (paper: resnet50, inception_v3, inception_resnet_v2)")
    init: str = Field("imagenet", description="imagenet | xavier | path to a checkpoint")
    weights: str | None = Field(None, description="explicit ImageNet weights file for init imagenet")
    allow_network: bool = Field(False, description="let timm download weights from the hub (never needed offline)")
    mode: Literal["finetune", "linear", "linear-probe"] = Field(
        "finetune",
        description="finetune: train all unfrozen layers; linear: train only the new head by SGD; linear-probe: "
        "frozen-backbone embeddings computed once per run, a head per fold (probe_head); train saves the frozen "
        "backbone and the head as the bundle",
    )
    epochs: int | None = Field(None, ge=1, description="training epochs per fold (default 10, the paper's)")
    batch_size: int | None = Field(None, ge=2, description="default 8 for the paper's models (paper), 32 otherwise")
    lr: float | None = Field(
        None, gt=0, description="learning rate; default 1e-4 for the paper's models (×10 for xavier), 1e-2 for "
        "other models at batch 32 (best of 1e-3/1e-2/3e-2 on mini, benchmarks/RESULTS.md)",
    )
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0.0, description="SGD weight decay")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="constant | cosine over the epochs")
    class_weighting: bool = Field(True, description="class-weighted cross-entropy n/(k·n_c) as in the paper")
    compound_weighting: bool = Field(
        False, description="finetune/linear: within each class, every training compound weighs alike in the loss (a "
        "plate's positive control counts as one compound of its MoA, not as the MoA)")
    image_size: int | None = Field(None, ge=16, description="network input size in px (default the model's 224/299)")
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before the classifier (timm's drop_rate; "
                             "0 as in the paper); > 0 makes `predict --mc-dropout` possible")
    cv: str = Field("loco", description=f"{CV_CHOICES} (cell-line: leave one Metadata_Batch out; lomo: leave one "
                    "MoA out, the open-set evaluation, RUN/open_set.json)")
    open_set_reference: str | None = Field(
        None, description="cv lomo of a network (mode finetune or linear, one member): a finished loco run of the "
        "same recipe on the same cache, whose held-out compounds are the new compounds of known MoAs (the linear "
        "probe scores those itself)")
    include_controls_as_class: bool = Field(False, description="make DMSO a class (its wells are dealt across folds)")
    skip_untrainable_folds: bool = Field(False, description="skip (and report) folds whose test MoA has no training compound")
    strict: bool = Field(
        False, description="refuse a MoA with a single compound (compound-held-out schemes) instead of keeping that "
        "compound in training in every fold, unscored, and saying so")
    max_tiles_per_fold: int | None = Field(None, ge=2, description="subsample each fold's training tiles (CPU runs)")
    freeze_stages: int = Field(
        0, ge=0, description="fine-tune only: freeze the stem and following stages, N coarse timm stages in all "
        "(0 = train everything); frozen early stages need no backward pass, the big CPU saving",
    )
    backbone_lr_scale: float = Field(
        1.0, ge=0.0, le=1.0, description="fine-tune: the backbone's learning rate as a fraction of the head's "
        "(discriminative learning rates; 1 = one rate for all, the paper)")
    unfreeze_every: int = Field(
        0, ge=0, description="fine-tune: gradual unfreezing, the head alone first, then one more trainable stage "
        "(top down) every N epochs; 0 = all trainable stages from the start")
    head_init: Literal["random", "probe"] = Field(
        "random", description="the classifier's start: random (the paper), or a logistic regression on the "
        "pretrained features of the training tiles (linear probe, then fine-tune)")
    frozen_feature_cache: bool = Field(
        False, description="with freeze_stages: run the frozen stages once per run on `epochs` augmented copies "
        "of every tile and train each fold's remaining stages on those outputs (LOCO: 38 folds × epochs passes "
        "become `epochs`; 1.4× faster training steps for lite0 at 320 px on CPU); needs copies × tiles × "
        "feature-map float32 disk in the run directory while the run goes on (mini at 320 px: 1.5 GB)",
    )
    cuda_graphs: bool | None = Field(
        None, description="CUDA: replay each full-size training step as one CUDA graph, which removes the "
        "per-kernel launch cost that bounds small batches (the paper's ResNet50 fold at batch 8: 2.6x faster on an "
        "H200, benchmarks/RESULTS.md 'GPU'); default: wherever it applies (bfloat16 or fp32 steps, one process, "
        "no frozen-feature cache); true: refuse a float16 loss-scaled step; false: eager steps")
    channels_last: bool = Field(True, description="NHWC tensors (oneDNN's fast layout on CPU, cuDNN's on CUDA)")
    eval_epochs: list[int] = Field(
        default_factory=list,
        description="also score each fold's model after these epochs, e.g. 1,5 (accuracy against training time, "
        "as in the paper's Fig. 4); the last epoch is always scored",
    )
    tta: TTAMode = Field(
        "none", description="test-time augmentation: dihedral averages each held-out tile's softmax over its 8 "
        "rotations/mirrors before the median aggregation (not in the paper; 8× prediction cost); linear-probe: "
        "every tile's embedding is the mean over its 8 views, for training and held-out tiles alike",
    )
    features: FeatureSpec | None = Field(
        None, description="linear-probe: the embedding, head (the backbone's pooled output) or timm feature "
        "stages counted from 0 with their spatial pools, e.g. stage3, stage3+stage4/mean+max, stage3/gem "
        "(default stage3: mean-pooled stage 3; stage3+stage4 for crop tables)")
    probe_c: float | Literal["nested"] | None = Field(
        None, description="linear-probe: the logistic regression's inverse regularisation C, or nested: chosen in "
        "each fold from a grid by an inner group-kfold over that fold's training compounds only (default nested; "
        "benchmarks/RESULTS.md, 'Probe regularisation')")
    probe_head: Literal["logistic", "centroid"] | None = Field(
        None, description="linear-probe: logistic (a logistic regression on the cells, C from probe_c) or centroid "
        "(cosine to each MoA's mean profile, its compounds weighted alike; a temperature chosen like a nested C); "
        "default centroid for crop tables, logistic otherwise (benchmarks/RESULTS.md, 'Probe heads')")
    aggregate: Literal["median", "mean", "logmean"] = Field(
        "median", description="tile → well → treatment probabilities: the median at each step (the paper), the "
        "mean, or logmean (mean log-probability: for the linear probe, its head applied to the mean profile); "
        "default logmean for a crop table's linear probe")
    seed: int = Field(0, ge=0, description="random seed; each fold's seeds derive from it and the fold number")
    fold_seed: int | None = Field(
        None, ge=0, description="the seed of the fold assignment (group-kfold, well); default: seed. An ensemble's "
        "members that differ in seed keep the first member's folds")
    ensemble: list[dict[str, Any]] = Field(
        default_factory=list, description="further ensemble members, each the fields in which it differs from "
        "this config (e.g. {seed: 1} or {model: tf_efficientnet_lite2}); this config is the first member. Each "
        "level's held-out (cv) or predicted (predict) probabilities are the mean of the members' (README, "
        "'Ensembles'); on the command line --ensemble-seeds N and --ensemble-models A,B")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    device: str = Field("auto", description="auto | cpu | cuda[:N]")
    amp: bool | None = Field(None, description="mixed precision; default on for CUDA, always off on CPU")
    amp_dtype: Literal["auto", "bfloat16", "float16"] = Field(
        "auto", description="mixed-precision type of training steps: auto is bfloat16 on GPUs that compute it "
        "natively (no loss scaling), else float16 with a gradient scaler (benchmarks/RESULTS.md, 'GPU')")
    deterministic: bool = True
    num_workers: int = Field(0, ge=0, description="tile-reading worker processes")
    num_threads: int | None = Field(
        None, ge=1, le=MAX_THREADS, description="torch CPU threads (default: $CELLMORPH_THREADS, $SLURM_CPUS_PER_TASK, "
        "$OMP_NUM_THREADS, else the physical cores this process may use); use 1 beside other jobs",
    )
    eval_batch_size: int | None = Field(None, ge=1, description="default 2 × batch_size")
    # "last" by default: `visualize filters --run` and the report's Grad-CAM need one fold's network.
    keep_checkpoints: KeepCheckpoints = Field(
        "last", description="fold weights to keep as folds/<k>/state.pt: all, last (only the latest fold's, "
        "which visualize filters and the report's Grad-CAM use) or none; resuming never needs them (a LOCO run "
        "keeping all holds 38 models)",
    )

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        # The name is checked here, at the boundary; whether this machine has it, when a run starts.
        if value != "auto":
            from cellmorph.runtime import check_device_name  # torch parses the name: loaded here for start-up time

            check_device_name(value)
        return value

    @field_validator("probe_c")
    @classmethod
    def _check_probe_c(cls, value):
        if isinstance(value, float) and not (value > 0 and value < float("inf")):
            raise ValueError("probe_c must be a positive finite number or 'nested'")
        return value

    @field_validator("cv")
    @classmethod
    def _check_cv(cls, value: str) -> str:
        return str(parse_cv(value))

    @field_validator("ensemble")
    @classmethod
    def _check_ensemble(cls, members: list[dict]) -> list[dict]:
        for k, member in enumerate(members, start=2):  # this config is member 1
            fixed = sorted(set(member) & set(ENSEMBLE_SHARED_FIELDS))
            if fixed:
                raise ValueError(f"member {k}: {', '.join(fixed)} must be the same for every member (set "
                                 "it on the ensemble's own config)")
            unknown = sorted(set(member) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"member {k}: unknown field(s) {', '.join(unknown)}")
        return members

    @field_validator("eval_epochs")
    @classmethod
    def _check_eval_epochs(cls, value: list[int]) -> list[int]:
        if any(int(e) < 1 for e in value):
            raise ValueError("eval_epochs must be ≥ 1")
        return sorted({int(e) for e in value})

    @model_validator(mode="after")
    def _check_combinations(self) -> "CVConfig":
        """Combinations that cannot work, refused when the config is made, not hours into a run."""
        if self.features is not None and not self.features.is_head and self.mode != "linear-probe":
            raise ValueError(f"features {self.features.describe()} apply to mode linear-probe; finetune and linear "
                             "train the network's own head")
        if self.mode != "finetune" and (self.backbone_lr_scale != 1.0 or self.unfreeze_every):
            raise ValueError("backbone_lr_scale and unfreeze_every act on the backbone: mode finetune only")
        if self.probe_c is not None and self.mode != "linear-probe":
            raise ValueError("probe_c is the linear probe's regularisation: mode linear-probe only")
        if self.compound_weighting and self.mode == "linear-probe":
            raise ValueError("compound_weighting weighs the training loss of mode finetune or linear; the probe's "
                             "centroid head already weighs compounds alike")
        if self.probe_head is not None and self.mode != "linear-probe":
            raise ValueError("probe_head is the linear probe's head: mode linear-probe only")
        if self.probe_head == "centroid" and self.probe_c is not None:
            raise ValueError("probe_c regularises the logistic head; the centroid head has none (its temperature is "
                             "chosen inside each fold)")
        if self.head_init == "probe" and self.mode == "linear-probe":
            raise ValueError("head_init probe starts a trained head; linear-probe is the probe itself")
        if self.freeze_stages and self.mode == "finetune" and self.init == "xavier":
            # Frozen stages keep their initial weights and BatchNorm statistics: for Xavier that is a
            # fixed random filter bank with unit-variance BN, on which the head cannot learn (measured:
            # loss stays at ln 12 on mini). A from-scratch baseline must train every stage.
            raise ValueError("freeze_stages keeps the early stages at their initial weights, which for "
                             "init=xavier are random: use freeze_stages 0 with xavier")
        if self.frozen_feature_cache and not (self.mode == "finetune" and self.freeze_stages > 0):
            raise ValueError("frozen_feature_cache needs mode finetune with freeze_stages > 0 "
                             "(there is nothing frozen to cache)")
        epochs = self.epochs or DEFAULT_EPOCHS
        late = [e for e in self.eval_epochs if e > epochs]
        if late:
            raise ValueError(f"eval_epochs {late} exceed epochs={epochs}")
        return self

    @property
    def split_seed(self) -> int:
        """The seed of the fold assignment."""
        return self.seed if self.fold_seed is None else self.fold_seed

    def members(self) -> list["CVConfig"]:
        """The ensemble's member configs, this config (without the list) first; [self] without an ensemble.
        Each member is validated as a config of its own, from the fields given (not the defaults filled
        in), so a member of another model still takes its own per-model and per-layout defaults."""
        if not self.ensemble:
            return [self]
        given = self.model_dump(exclude_unset=True)
        given["ensemble"] = []  # given, so that no layout default makes a member an ensemble again
        members = [validate_config(given, "ensemble member 1")]
        for k, member in enumerate(self.ensemble, 2):
            # A member of the other kind (a linear probe beside fine-tunes, or the reverse) leaves out the fields
            # only the first member's kind uses: a probe trains nothing, so it has no epochs or frozen stages.
            own = {key: v for key, v in given.items() if key not in _OTHER_KIND_FIELDS.get(
                (self.mode == "linear-probe", member.get("mode", self.mode) == "linear-probe"), ())}
            config = validate_config(own | member, f"ensemble member {k}")
            if config.split_seed != self.split_seed:  # the same compounds held out in the same folds
                config = validate_config(own | member | {"fold_seed": self.split_seed}, f"ensemble member {k}")
            members.append(config)
        return members

    @classmethod
    def from_yaml(cls, path: Path, **overrides) -> "CVConfig":
        """A YAML file (a run's ``config.yaml`` works too) with ``overrides`` on top (``None`` = not given)."""
        path = Path(path)
        data = read_yaml_mapping(path)
        data = data["config"] if isinstance(data.get("config"), dict) else data
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = data[key] | value  # a nested record (augment): the fields given replace the file's
            elif value is not None:
                data[key] = value
        return validate_config(data, str(path))

    @property
    def is_paper_model(self) -> bool:
        return self.model in PAPER_MODELS

    def resolved(self) -> "CVConfig":
        """A copy with the per-model defaults filled in (epochs, batch_size, lr, eval_batch_size)."""
        batch = self.batch_size or (8 if self.is_paper_model else 32)
        lr = self.lr
        if lr is None:
            if self.is_paper_model:
                lr = 1e-3 if self.init == "xavier" else 1e-4
            else:
                # Small nets at batch 32: 1e-2 fine-tuned EfficientNet-Lite0 far better than 1e-3
                # (group-kfold:4 on mini: treatment 0.69 vs 0.48) and 3e-2 was worse.
                lr = 1e-2
        epochs = self.epochs or DEFAULT_EPOCHS
        features = self.features
        if self.mode == "linear-probe" and features is None:
            features = DEFAULT_FEATURES
        # Nested by default: C = 1 (scikit-learn's) cost 10-15 points of treatment accuracy on real cells.
        probe_head = self.probe_head
        if self.mode == "linear-probe" and probe_head is None:
            probe_head = "logistic"
        probe_c = self.probe_c if self.probe_c is not None or probe_head != "logistic" else "nested"
        return self.model_copy(
            update={
                "features": features,
                "probe_head": probe_head,
                "probe_c": probe_c,
                "eval_epochs": [e for e in self.eval_epochs if e < epochs],
                "epochs": epochs,
                "batch_size": batch,
                "lr": lr,
                "eval_batch_size": self.eval_batch_size or 2 * batch,
            }
        )


# Fields that only a trained network uses, and those only the linear probe uses: an ensemble member of the other
# kind than the first member does not inherit them (CVConfig.members). Keyed (first is a probe, member is one).
TRAINING_ONLY_FIELDS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "lr_schedule", "compound_weighting",
                        "drop_rate", "freeze_stages", "backbone_lr_scale", "unfreeze_every", "head_init",
                        "frozen_feature_cache", "cuda_graphs", "eval_epochs", "augment", "amp_dtype", "mode")
PROBE_ONLY_FIELDS = ("features", "probe_c", "probe_head", "mode")
_OTHER_KIND_FIELDS = {(False, True): TRAINING_ONLY_FIELDS, (True, False): PROBE_ONLY_FIELDS}

# Defaults per input layout (the cache manifest's ``source``), for fields a config leaves unset.
# Crops: the fine-tune that led on real BBBC021 crops (group-kfold:4: 0.612 treatment, 0.530 per
# cell, against 0.573 / 0.349 for the linear probe; LOCO 0.670 / 0.484 in about an hour on 2
# cores): 128 px, the first 4 stages frozen and computed once per run, dihedral test-time
# augmentation. They apply to pretrained fine-tuning only (frozen random filters do not learn).
CROP_FINETUNE_DEFAULTS = {"freeze_stages": 4, "frozen_feature_cache": True, "tta": "dihedral"}
# Crops, linear probe: the centroid head on mean profiles (logmean aggregation). On the real 12-MoA development
# set, LOCO, it called 0.739 of 46 treatments against 0.565 for the nested-C logistic head on the same
# embeddings (benchmarks/RESULTS.md, 'Probe heads').
CROP_PROBE_DEFAULTS = {"probe_head": "centroid", "aggregate": "logmean"}
# Crops, pretrained fine-tune: an ensemble of two seeds. The recipe is unstable (three seeds called 0.435 to
# 0.652 of the development set's treatments under group-kfold:4); under LOCO, two seeds averaged called
# 0.696 against 0.630 and 0.587 alone, balanced cell accuracy 0.439 against 0.362 and 0.423, in 34 min
# on 2 cores (the budget: 60). benchmarks/RESULTS.md, 'Fine-tune levers'. --ensemble-seeds 1 trains one.
CROP_FINETUNE_SEEDS = 2
# ... and the crop probe beside them, as a third member (its own defaults: centroid head, logmean). In the use
# case (train on some compounds of the development set, predict the others: 46 treatments, outer group-kfold:4)
# the three called 0.674 of the treatments against 0.587 for the two seeds, and their sets at α = 0.2 covered
# 0.891 (2.26 MoAs a set) against 0.870 (2.65); under LOCO 0.717 against 0.696, balanced cell accuracy 0.426
# against 0.439, for 4 more minutes (on an AMD EPYC, where the same seeds train other networks: 0.630 against
# 0.609, balanced 0.403 against 0.400). benchmarks/RESULTS.md, 'A linear probe in the bundle' and 'Snapshot
# ensembles'. --ensemble-seeds N alone gives an ensemble of N fine-tunes; --ensemble-probe adds the probe to it.
CROP_FINETUNE_PROBE_MEMBER = {"mode": "linear-probe"}


def ensemble_members(seed: int = 0, seeds: int = 1, models: tuple[str, ...] | list[str] = (),
                     probe: bool = False) -> list[dict]:
    """A config's ``ensemble`` list: the further members that make ``seeds`` seeds (seed, seed+1, …) of its
    own model and of each of ``models`` (the config itself is the first member), and with ``probe`` a linear
    probe of its model."""
    members = [{"seed": seed + k} for k in range(1, seeds)]
    for name in models:
        members += [{"model": name} | ({"seed": seed + k} if k else {}) for k in range(seeds)]
    return members + ([dict(CROP_FINETUNE_PROBE_MEMBER)] if probe else [])


def with_layout_defaults(config: CVConfig, source: str | None) -> CVConfig:
    """``config`` with the defaults of the cache's layout ``source`` for the fields it leaves unset
    (pydantic's ``model_fields_set``: what a YAML file or an option gave)."""
    from cellmorph.data.layouts import layout_embedding, layout_input_size

    unset = set(CVConfig.model_fields) - config.model_fields_set
    update: dict[str, Any] = {}
    size = layout_input_size(source)
    if size is not None and "image_size" in unset:
        update["image_size"] = size
    if source == "crops" and config.mode == "finetune" and config.init != "xavier":
        update.update({k: v for k, v in CROP_FINETUNE_DEFAULTS.items() if k in unset})
        if not update.get("freeze_stages", config.freeze_stages):
            update.pop("frozen_feature_cache", None)  # asked for no frozen stages: nothing to cache
        if "ensemble" in unset:
            update["ensemble"] = ensemble_members(config.seed, CROP_FINETUNE_SEEDS, probe=True)
    if config.mode == "linear-probe":  # its embeddings: the layout's, as embed makes them
        update.update({k: v for k, v in layout_embedding(source).items() if k in unset})
        if source == "crops" and config.probe_c is None:  # a given C asks for the logistic head
            update.update({k: v for k, v in CROP_PROBE_DEFAULTS.items() if k in unset})
    # Validated from a mapping: a model_copy(update=...) would hold the raw values (a features string)
    # until validated, and pydantic warns when it serialises them.
    return validate_config(config.model_dump(exclude_unset=True) | update) if update else config


def field_help(name: str) -> str:
    """A CVConfig field's description: the command-line help of its option."""
    return CVConfig.model_fields[name].description or ""


def load_cv_config(path: Path | None = None, **overrides) -> CVConfig:
    """For the CLI: a YAML file (optional) with command-line options on top (``None`` = not given)."""
    if path is not None:
        return CVConfig.from_yaml(Path(path), **overrides)
    return validate_config({k: v for k, v in overrides.items() if v is not None}, "cv options")


def validate_config(data: Any, where: str = "config") -> CVConfig:
    """A CVConfig from a CVConfig, a mapping or a YAML path; every rule checked, errors as one line.

    A CVConfig is validated again: ``model_copy(update=...)`` skips pydantic's validators.
    """
    if isinstance(data, CVConfig):
        # only the fields it was given: those left unset may still take a layout's defaults
        data = data.model_dump(exclude_unset=True)
    elif isinstance(data, (str, Path)):
        return CVConfig.from_yaml(Path(data))
    if not isinstance(data, dict):
        raise CellmorphError(f"{where}: expected a CVConfig, a mapping or a YAML path")
    return validated(CVConfig, data, where)
