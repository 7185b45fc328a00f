"""The final model: trained on every labelled treatment of a cache, saved as a bundle.

::

    from cellmorph.final_model import train_final
    train_final("CACHE", "MODEL", {"model": "tf_efficientnet_lite0", "epochs": 5}, calibration="loco")

Same recipe and config schema as ``cv``. With ``calibration``, a cross-validation with that
scheme runs first (into ``MODEL.cv/``, resumable), and its out-of-fold treatment probabilities,
scored by models that never saw those compounds, are stored in the bundle for calibrated
prediction sets. The final model's seeds derive from (seed, :data:`FINAL_FOLD`).

Under ``torchrun`` the final model trains data-parallel (:mod:`cellmorph.distributed`): every
process trains, rank 0 alone prints progress and writes the bundle, whose training record
says how (``data_parallel``: world size, backend); the calibration CV's folds train
data-parallel too (:func:`cellmorph.cv.run_cv`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cellmorph.cache import cache_source
from cellmorph.cv.config import CVConfig, validate_config, with_layout_defaults
from cellmorph.cv.ensemble import check_finished_run, member_dir
from cellmorph.cv.splits import Fold, parse_cv
from cellmorph.errors import CellmorphError, option

FINAL_FOLD = 999_999  # a fold number no CV uses: the final model's own seeds


def calibration_run_dir(out: Path) -> Path:
    return Path(str(out) + ".cv")


def train_final(data: Path, out: Path, config: CVConfig | dict | Path | None = None,
                calibration: str | None = None, resume: bool = False, progress: bool = True,
                executor=None, calibration_run: Path | None = None) -> dict:
    """Train on all labelled tiles of ``data``, write the bundle ``out``; returns a summary.

    ``calibration`` runs that CV into ``out.cv`` first; ``calibration_run`` reuses a finished CV run of the
    same recipe on ``data`` instead (checked by its fingerprint; its scheme is the run's own).

    ``executor`` runs the calibration CV's folds (see :func:`cellmorph.cv.run_cv`). One ``train``
    at a time writes ``out`` (a lock beside it; rank 0 alone takes it under torchrun)."""
    from contextlib import nullcontext

    from cellmorph import distributed
    from cellmorph.runinfo import output_lock, require_not_input

    require_not_input(out, data=data)
    main = distributed.launched_world_size() == 1 or os.environ.get("RANK", "0").strip() == "0"
    with output_lock(Path(out), "train", beside=True) if main else nullcontext():
        return _train_final(data, out, config, calibration, resume, progress, executor, calibration_run)


def _train_final(data: Path, out: Path, config, calibration: str | None, resume: bool, progress: bool,
                 executor, calibration_run: Path | None = None) -> dict:
    from cellmorph import distributed
    from cellmorph.bundle import save_bundle
    from cellmorph.cv.run import plan_run
    from cellmorph.runinfo import require_output_dir

    # Under torchrun, rank 0 alone probes the folder (below): probes by every rank would race.
    launched = distributed.launched_world_size() > 1
    out = Path(out) if launched else require_output_dir(Path(out), "model folder")
    base = validate_config(config if config is not None else {}, "config")
    members = with_layout_defaults(base, cache_source(data)).members()  # a crop fine-tune: two seeds and a probe
    if calibration is not None and calibration_run is not None:
        raise CellmorphError(f"train: give {option('calibration')} (run a CV) or {option('calibration_run')} (reuse one), not both")
    if calibration_run is not None:
        calibration = _run_scheme(Path(calibration_run))
    scheme = parse_cv(calibration) if calibration is not None else None
    if scheme is not None and scheme.open_set:
        raise CellmorphError(f"train: {option('calibration')} lomo holds out whole MoAs, whose calls cannot calibrate "
                             "sets; give loco or group-kfold:K (cv --cv lomo measures novelty)")
    if scheme is None:
        _check_no_cv_only_options(base)
    dp = distributed.init_from_env(base.device)
    if dp.active:
        if len(members) > 1:
            raise CellmorphError("train: an ensemble's members train one after another; run it without torchrun")
        dp.main_only(lambda: require_output_dir(out, "model folder"))
    # Every member's plan before any training: a member that cannot be built fails here, not hours in.
    plans = [plan_run(data, member, with_folds=False) for member in members]
    plan = plans[0]
    _check_class_names(plan)  # before the calibration CV: its hours would end in a bundle predict refuses
    calibrated = None
    if scheme is not None:
        calibrated = _calibration_cv(data, out, base, scheme, calibration_run, resume, progress, executor)
    finals = _train_members(data, plans, dp, calibrated and calibrated.run, progress)
    training = _training_record(data, out, plans, members, finals, dp, scheme, calibrated, calibration_run)
    trained = finals[0][1]
    cache = plan.cache
    preprocessing = {k: cache.manifest.get(k) for k in ("source", "channels", "tile_shape", "config", "config_hash")}
    # Rank 0 writes; the other ranks wait for the complete bundle (and fail with it if it fails).
    further = [{"state": t.state, "model": p.config.model, "input": getattr(t, "input", p.input),
                "config": p.config.model_dump(mode="json"), "seeds": p.seeds[FINAL_FOLD],
                "n_train_tiles": int(len(t.train_rows)), "probe": getattr(t, "probe", None)} for p, t in finals[1:]]
    scores = calibrated.scores if calibrated else None
    dp.main_only(lambda: save_bundle(out, trained.state, plan.config.model, plan.classes,
                                     getattr(trained, "input", plan.input), preprocessing, training, scores, further,
                                     getattr(trained, "probe", None)))
    return {"model": str(out), "classes": plan.classes, "n_train_tiles": training["n_train_tiles"],
            "members": len(finals), "calibration": training["calibration"]}


@dataclass
class CalibrationCV:
    """The calibration CV behind a bundle: its run directory, metrics and out-of-fold scores per level."""

    run: Path
    metrics: dict
    scores: dict


def _calibration_cv(data: Path, out: Path, base: CVConfig, scheme, calibration_run: Path | None, resume: bool,
                    progress: bool, executor) -> CalibrationCV:
    """The finished run ``calibration_run``, checked against the recipe, or the CV run (or continued) into
    ``out.cv``."""
    from cellmorph.cv.rundir import RunDir
    from cellmorph.cv.run import run_cv

    config = base.model_copy(update={"cv": str(scheme)})
    if calibration_run is not None:
        run = Path(calibration_run)
        metrics = check_finished_run(data, run, validate_config(config))
    else:
        run = calibration_run_dir(out)
        # A calibration CV that a killed train had started is continued; one never started, begun. An
        # ensemble's run has its own config.yaml only once every member finished: its first member's says.
        resuming = (run / "config.yaml").is_file() or (member_dir(run, 1) / "config.yaml").is_file()
        metrics = run_cv(data, run, config, resume=resuming, progress=progress, executor=executor)
    return CalibrationCV(run, metrics, RunDir(run).read_levels())


def _train_members(data: Path, plans: list, dp, calibration: Path | None, progress: bool) -> list[tuple]:
    """(final plan, trained) of every member, on every labelled tile: a network trained as one fold without
    held-out tiles, or a linear probe fitted (on the calibration run's embeddings where they fit)."""
    from cellmorph.cv.rundir import RunDir
    from cellmorph.cv.run import run_fold
    from cellmorph.progress import Progress
    from cellmorph.runtime import derive_seeds, deterministic, torch_threads

    rows = np.flatnonzero(plans[0].targets >= 0)
    if len(rows) < 2:
        raise CellmorphError(f"{data}: fewer than 2 labelled tiles to train the final model on")
    fold = Fold(FINAL_FOLD, "final", rows, np.empty(0, dtype=np.int64))
    finals = []
    for k, member_plan in enumerate(plans, start=1):
        final_plan = replace(member_plan, seeds={FINAL_FOLD: derive_seeds(member_plan.config.seed, FINAL_FOLD)})
        if dp.active:
            final_plan = replace(final_plan, device=dp.device)
        what = "final model" if len(plans) == 1 else f"final model, member {k} of {len(plans)}"
        with torch_threads(final_plan.config.num_threads), deterministic(final_plan.config.deterministic), \
                Progress(progress and dp.is_main) as bar:
            if final_plan.config.mode == "linear-probe":
                # the calibration run's embeddings where they are of these rows (a member's own run in an ensemble)
                embedded = None if calibration is None else RunDir(member_dir(calibration, k) if len(plans) > 1
                                                                   else calibration)
                finals.append((final_plan, _fit_final_probe(final_plan, fold, embedded, bar, what)))
                continue
            tasks = {"epochs": bar.task(f"  epochs ({what})", final_plan.config.epochs),
                     "batches": bar.task("  batches", 1, log=False)}
            finals.append((final_plan, run_fold(final_plan, fold, None, tasks)))
    return finals


def _training_record(data: Path, out: Path, plans: list, members: list, finals: list, dp, scheme,
                     calibrated: CalibrationCV | None, calibration_run: Path | None) -> dict:
    """The bundle's ``training`` entry: config, data, seeds, compounds, history, and what the calibration CV
    says the sets and confidence will do on new compounds."""
    from cellmorph.calibration import held_out_calibration_error, held_out_coverage

    plan, (final_plan, trained) = plans[0], finals[0]
    treatments = calibrated.scores["treatments"] if calibrated else None
    return {
        "config": plan.config.model_dump(mode="json"),
        # an ensemble: the further members' fields (their networks are the bundle's ``members``)
        "ensemble": [m.model_dump(mode="json", exclude_unset=True) for m in members[1:]] or None,
        "data": str(Path(data).resolve()),
        "data_fingerprint": plan.data_fingerprint,
        "seeds": final_plan.seeds[FINAL_FOLD],
        "n_train_tiles": int(len(trained.train_rows)),
        # the compounds the final model saw: predict flags them (Metadata_InTraining) and scores them apart
        "compounds": sorted(map(str, set(plan.cache.index["Metadata_Compound"].iloc[trained.train_rows]))),
        "history": trained.history,
        # what a linear probe chose for itself by an inner split of the compounds (its C or temperature)
        "choices": [getattr(t, "choices", None) or None for _, t in finals],
        "init": plan.init.record(),
        # global batch = config batch_size, split over world_size processes (cellmorph.distributed)
        "data_parallel": dp.record(),
        "calibration": None if calibrated is None else {
            "cv": str(scheme), "run": str(Path(calibration_run or calibration_run_dir(out)).resolve()),
            "reused": calibration_run is not None,
            # False for well or batch folds: their held-out compounds were trained on in other folds
            "compound_disjoint": scheme.compound_disjoint,
            "treatment_accuracy": calibrated.metrics["treatment_accuracy"],
            "n_treatments": calibrated.metrics["n_treatments"],
            # How the sets would have done on these compounds, each treated as new in turn.
            "held_out_coverage": [held_out_coverage(treatments, plan.classes, a) for a in (0.1, 0.2)],
            "held_out_calibration_error": held_out_calibration_error(treatments, plan.classes)},
    }


@dataclass
class FinalProbe:
    """A linear probe's final model: the frozen backbone's weights, the input it embedded with, and its head."""

    train_rows: np.ndarray
    state: dict  # the backbone's weights, without a classifier
    input: object  # InputSpec: the extractor's input at the run's size
    probe: dict  # features, head kind and head_state, as save_bundle takes them
    choices: dict
    history: list = field(default_factory=list)  # no epochs


def _fit_final_probe(plan, fold: Fold, calibration, bar, what: str) -> FinalProbe:
    """The probe fitted on every labelled tile (its C or temperature chosen by an inner split of all the
    compounds), with the embeddings of the calibration run ``calibration`` where they are of the same rows."""
    from cellmorph.cv.features import final_probe_embeddings
    from cellmorph.cv.probe import fit_probe

    bar.line(f"{what}: a linear probe ({plan.config.probe_head} head) on {len(fold.train)} tiles")
    features, extractor, spec = final_probe_embeddings(plan, fold.train, bar, calibration)
    fit = fit_probe(plan, fold, features)
    state = {k: v.detach().cpu() for k, v in extractor.model.state_dict().items()}
    probe = {"features": plan.config.features.describe(), "head": plan.config.probe_head,
             "head_state": fit.head.state()}
    if plan.config.probe_head == "centroid":  # the Novel flag's calibration: known compounds held out one by one
        from cellmorph.cv.features import control_embeddings
        from cellmorph.cv.probe import CentroidHead, held_out_novelty

        x, y, index = features.take(fit.train_rows), plan.targets[fit.train_rows], plan.cache.index.iloc[fit.train_rows]
        controls = control_embeddings(plan, None, bar, (extractor, spec))  # the score's second origin, if any
        probe["novelty"] = held_out_novelty(x, y, index, controls)
        if controls is not None:  # the head's own standardisation: the final head is fitted on the same rows
            probe["novelty_control"] = CentroidHead.fit(x, y, index, controls=controls).control.state()
    return FinalProbe(fit.train_rows, state, spec, probe, fit.choices)


def _run_scheme(run: Path) -> str:
    """The CV scheme of the run directory ``run`` (its config.yaml)."""
    from cellmorph.cv.rundir import CONFIG_FILE
    from cellmorph.runinfo import read_yaml_mapping

    if not (run / CONFIG_FILE).is_file():
        raise CellmorphError(f"{option('calibration_run')} {run}: not a cellmorph run (no {CONFIG_FILE})")
    return str(read_yaml_mapping(run / CONFIG_FILE).get("config", {}).get("cv", "loco"))


def _check_class_names(plan) -> None:
    """Every class must be able to name prediction sets (:func:`~cellmorph.calibration.class_name_problem`);
    the error names the first tile of the offending MoA in the cache index, and its compound."""
    from cellmorph.cache import INDEX_FILE
    from cellmorph.calibration import class_name_problem
    from cellmorph.schema import TRUE_COLUMN

    for name in plan.classes:
        problem = class_name_problem(name)
        if problem is None:
            continue
        index = plan.cache.index
        row = int(np.flatnonzero(index[TRUE_COLUMN].astype(str).to_numpy() == name)[0])
        compound = f" (compound {index['Metadata_Compound'].iloc[row]!r})" if "Metadata_Compound" in index else ""
        raise CellmorphError(f"{plan.cache.root / INDEX_FILE}, row {row}{compound}: {problem}; rename that MoA in "
                             "the MoA table and prepare the cache again")


# Options that only act on a cross-validation's held-out folds: without a calibration CV, train
# would ignore them, so they are refused instead.
_CV_ONLY = {"eval_epochs": "--eval-epochs", "keep_checkpoints": "--keep-checkpoints",
            "skip_untrainable_folds": "skip_untrainable_folds", "strict": "--strict"}


def _check_no_cv_only_options(config: CVConfig) -> None:
    given = [option for name, option in _CV_ONLY.items()
             if getattr(config, name) != CVConfig.model_fields[name].get_default(call_default_factory=True)]
    if given:
        raise CellmorphError(f"train: {', '.join(given)} only act on the calibration CV's folds; "
                             f"give {option('calibration')} loco (or group-kfold:K), or leave them out")
