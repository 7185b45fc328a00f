"""Do prediction sets cover new compounds? The `train --calibration` → `predict` use case, simulated on the
real 12-MoA development set with compounds held out by an outer split (issue 29, item 6).

    python benchmarks/dev_calibration.py --run RUN [--alphas 0.1,0.2] [--out RUN/dev_calibration.json]

RUN is a finished linear-probe LOCO run of ``benchmarks/real_crops.py`` on crops-moa-dev (its embeddings,
made once with the frozen network, are reused; nothing is embedded again). For each compound that LOCO can
score (the outer split), with everything else as the user's training screen:

1. a calibration CV over the training compounds only (``group-kfold:4``, the issue's contract, or ``loco``)
   gives out-of-fold treatment probabilities, as ``train --calibration`` does;
2. a head fitted on all training compounds (the "final model") scores the held-out compound's treatments,
   as ``predict`` does for a compound the model never saw;
3. the sets (``cellmorph.calibration.conformal_sets``, at treatment level from the treatment scores, or from
   well scores for comparison) and the confidence (temperature scaling where
   ``cellmorph.calibration.temperature_helps`` says it lowers the held-out log-loss, else renormalised) of
   those treatments are scored against their true MoA.

The head is the run's own (its config: the centroid head with logmean by default, a nested temperature in
every fit), so each outer fold is a complete, honest repetition of the use case: no held-out compound is
seen by its calibration scores, its head or its temperature.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.cache import TileCache
from cellmorph.calibration import (TemperatureScaling, conformal_sets, expected_calibration_error, group_bootstrap,
                                   temperature_helps)
from cellmorph.cv.probe import (CentroidHead, choose_centroid_temperature, choose_probe_c, fit_probe_head)
from cellmorph.cv.rundir import EMBEDDINGS
from cellmorph.cv.splits import make_folds
from cellmorph.metrics import aggregate
from cellmorph.runinfo import read_yaml_mapping
from cellmorph.schema import TRUE_COLUMN, prob_column

SCHEMES = ("group-kfold:4", "loco")


def head_probabilities(config: dict, x_train, y_train, index_train, x_test, n_classes: int, seed: int) -> np.ndarray:
    """The run's head fitted on the training rows (its temperature or C chosen inside them), on the test rows."""
    probs = np.zeros((len(x_test), n_classes))
    if config.get("probe_head") == "centroid":
        temperature, _ = choose_centroid_temperature(x_train, y_train, index_train, seed)
        head = CentroidHead.fit(x_train, y_train, index_train, temperature)
        probs[:, head.classes_] = head.predict_proba(x_test)
    else:
        c = config.get("probe_c", "nested")
        if c == "nested":
            c, _ = choose_probe_c(x_train, y_train, index_train, config.get("class_weighting", True), seed)
        head, scaler = fit_probe_head(x_train, y_train, config.get("class_weighting", True), seed, c)
        probs[:, head.classes_] = head.predict_proba(scaler.transform(x_test))
    return probs


def levels(index: pd.DataFrame, probs: np.ndarray, classes: list[str], how: str) -> dict[str, pd.DataFrame]:
    frame = index.reset_index(drop=True).copy()
    for k, name in enumerate(classes):
        frame[prob_column(name)] = probs[:, k]
    _, wells, treatments = aggregate(frame, how=how)
    return {"wells": wells, "treatments": treatments}


def simulate(run: Path, alphas: list[float], outer_scheme: str = "loco", schemes=SCHEMES) -> dict:
    header = read_yaml_mapping(run / "config.yaml")
    config = header["config"]
    cache = TileCache(Path(header["data"]))
    classes = list(header["classes"])
    index = cache.index
    rows = np.flatnonzero(~index["Metadata_IsControl"].to_numpy())  # the probe embeds the classes' tiles
    x = np.load(run / EMBEDDINGS).astype(np.float64)
    if len(x) != len(rows):
        raise SystemExit(f"{run}: {len(x)} embeddings for {len(rows)} treated tiles; not a probe run of this cache")
    meta = index.iloc[rows].reset_index(drop=True)
    y = meta[TRUE_COLUMN].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy()
    how = config.get("aggregate", "median")
    outer, unscored = make_folds(meta, outer_scheme, seed=config.get("seed", 0))
    records = []
    for fold in outer:
        train, test = fold.train, fold.test
        final = levels(meta.iloc[test], head_probabilities(config, x[train], y[train], meta.iloc[train], x[test],
                                                           len(classes), fold.index), classes, how)
        truth = final["treatments"][TRUE_COLUMN].astype(str).map(classes.index).to_numpy()
        probs = final["treatments"][[prob_column(c) for c in classes]].to_numpy(float)
        for scheme in schemes:
            inner, _ = make_folds(meta.iloc[train], scheme, seed=config.get("seed", 0))
            oof_probs = np.zeros((len(train), len(classes)))
            scored = np.zeros(len(train), dtype=bool)
            for k, f in enumerate(inner):
                oof_probs[f.test] = head_probabilities(config, x[train][f.train], y[train][f.train],
                                                       meta.iloc[train].iloc[f.train], x[train][f.test],
                                                       len(classes), k)
                scored[f.test] = True
            calibration = levels(meta.iloc[train].iloc[np.flatnonzero(scored)], oof_probs[scored], classes, how)
            uses_t = temperature_helps(calibration["treatments"], classes)
            scaling = TemperatureScaling.from_scores(calibration["treatments"], classes) if uses_t else \
                TemperatureScaling(1.0)
            confidence = scaling.transform(probs)
            for level in ("treatments", "wells"):
                for alpha in alphas:
                    members = conformal_sets(calibration[level], probs, classes, alpha)
                    for t in range(len(truth)):
                        records.append({
                            "compound": str(final["treatments"]["Metadata_Compound"].iloc[t]),
                            "outer_fold": fold.index, "treatment": t, "scheme": scheme, "level": level, "alpha": alpha,
                            "covered": bool(members[t, truth[t]]), "size": int(members[t].sum()),
                            "n_calibration": int(len(calibration[level])),
                            "correct": bool(probs[t].argmax() == truth[t]),
                            "confidence": float(confidence[t].max()),
                            "log_loss": float(-np.log(max(confidence[t, truth[t]], 1e-12))),
                            "temperature": scaling.temperature})
    return {"outer_folds": {f.index: sorted(meta.iloc[f.test]["Metadata_Compound"].astype(str).unique())
                            for f in outer}, "records": records, "unscored": [u["name"] for u in unscored], "run": str(run),
            "head": config.get("probe_head", "logistic"), "aggregate": how}


def summarise(records: pd.DataFrame) -> list[dict]:
    rows = []
    for (scheme, level, alpha), part in records.groupby(["scheme", "level", "alpha"], sort=False):
        part = part.reset_index(drop=True)
        covered = part["covered"].to_numpy(float)
        low, high = group_bootstrap(part["compound"].to_numpy(), lambda r: covered[r].mean())
        rows.append({"calibration": scheme, "level": level, "alpha": alpha, "coverage": covered.mean(),
                     "coverage_ci95": [low, high], "mean_set_size": part["size"].mean(),
                     "empty": float((part["size"] == 0).mean()), "n_treatments": len(part),
                     "n_calibration_median": float(part["n_calibration"].median()),
                     "accuracy": part["correct"].mean(),
                     "ece": expected_calibration_error(part["confidence"], part["correct"]),
                     "log_loss": part["log_loss"].mean(),
                     "temperature_used": float((part["temperature"] != 1.0).mean())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--alphas", default="0.1,0.2")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--outer", default="loco", help="the outer split of the compounds (e.g. group-kfold:4, as "
                        "benchmarks/dev_usecase.py splits them)")
    parser.add_argument("--calibration", default=",".join(SCHEMES), help="calibration CVs to compare")
    args = parser.parse_args()
    result = simulate(args.run, [float(a) for a in args.alphas.split(",")], args.outer,
                      tuple(args.calibration.split(",")))
    table = summarise(pd.DataFrame(result["records"]))
    out = args.out or args.run / "dev_calibration.json"
    out.write_text(json.dumps({k: v for k, v in result.items() if k != "records"} | {"table": table}, indent=1))
    print(f"head {result['head']}, aggregate {result['aggregate']}; not scored: {', '.join(result['unscored'])}")
    for k, compounds in result["outer_folds"].items():
        print(f"outer fold {k}: {', '.join(compounds)}")
    print("\n| calibration CV | set level from | α | coverage (95% interval) | mean set size | empty | "
          "calibration rows | accuracy | ECE | log-loss | T used |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        low, high = r["coverage_ci95"]
        print(f"| {r['calibration']} | {r['level']} | {r['alpha']} | {r['coverage']:.3f} ({low:.2f}–{high:.2f}) "
              f"| {r['mean_set_size']:.2f} | {r['empty']:.2f} | {r['n_calibration_median']:.0f} | {r['accuracy']:.3f} "
              f"| {r['ece']:.3f} | {r['log_loss']:.2f} | {r['temperature_used']:.2f} |")


if __name__ == "__main__":
    main()
