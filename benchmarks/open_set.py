"""Novelty scores for a MoA that training never saw, compared on real cells (issue 31, item 2).

    python benchmarks/open_set.py RUN [--alpha 0.1] [--pool compound] [--out TABLE.json]

``RUN`` is a finished linear-probe ``cv`` run of a crop table (the contract's probe on crops-moa-dev: its
``embeddings.npy`` and cache are read; no network runs). Leave one MoA out, for every MoA: its treatments are the
*unseen* ones, scored by a probe fitted on every other MoA's compounds; the *known* comparison is each compound of
another MoA, scored by a probe fitted without that MoA and without that compound too (a new compound of a known
MoA, as a user's screen brings them). Every fit is the default crop probe's head (:class:`CentroidHead`: cells
standardised by the fit's training cells, each MoA the unit mean of its compounds' mean profiles, temperature 3,
the value the nested choice took on this set), so no held-out compound informs its own score.

Scores of a treatment (its cells' standardised embeddings averaged: the profile the head calls), higher = more novel:

* ``1 - max prob``: one minus the call's probability (softmax of the mean logits / T, logmean's call);
* ``energy``: −T·logsumexp(logits / T) of the treatment profile;
* ``centroid distance``: one minus the largest cosine between the profile and a known MoA's centroid;
* ``nearest treatment``: cosine distance to the nearest training treatment profile;
* ``mahalanobis``: the smallest Mahalanobis distance to a known MoA's mean treatment profile, with a shrunk
  (Ledoit-Wolf) covariance of the training treatments' deviations from their MoA means;
* ``cell kNN``: the median over the treatment's cells of each cell's mean cosine distance to its 10 nearest
  training cells;
* ``from the controls``: the centroid distance seen from the negative controls' mean standardised profile (each
  profile and centroid less that profile: :class:`cellmorph.novelty.ControlOrigin`) instead of the average cell;
* ``centroid distance + controls`` (the default since session 22): the larger of ``centroid distance`` and ``from
  the controls`` (:func:`cellmorph.novelty.centroid_distance` with the head's control origin).

The controls (the cache's DMSO tiles, no class) are embedded as the run embedded its tiles
(:func:`cellmorph.cv.features.control_embeddings`); they are in every fit's training data, as in ``cv --cv lomo``.

The conformal score (the largest class p-value) is a monotone function of a class score given one calibration set,
so within a fit it orders treatments as ``1 - max prob`` does; its calibration is item 3's.

Scores calibrated per fold on the fold's known treatments (each scored by its compound's own fit, as above); a
treatment is never calibrated by itself or another treatment of its compound, so a known one is scored as a new
compound would be:

* ``class-conditional centroid`` (Mondrian conformal): d_k = 1 - the cosine of the profile and known MoA k's
  centroid; p_k = (1 + #{calibration d_k >= d_k}) / (n_k + 1), the calibration being the known treatments of MoA
  k (a MoA with one compound has none, and is left out); novelty = 1 - max_k p_k;
* ``centroid / class median``: min over those MoAs of d_k over the median of MoA k's calibration d_k;
* ``combined p (A + B ...)``: each score's conformal p-value against all the fold's known treatments
  ((1 + #{known >= score}) / (n + 1)), averaged over the scores; novelty = 1 - the mean p.

Per score: the AUROC of unseen against known treatments (pooled over all folds, and the mean over MoAs), and the
fraction of unseen treatments flagged at the threshold that flags ``alpha`` of the known ones in the same fold.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.cv.open_set import auroc
from cellmorph.cv.probe import CentroidHead, treatment_ids

TEMPERATURE = 3.0
BASE_SCORES = ("1 - max prob", "energy", "centroid distance", "nearest treatment", "mahalanobis", "cell kNN",
               "from the controls", "centroid distance + controls")
COMBINED = {  # each: 1 - the mean of its scores' conformal p-values against the fold's known treatments
    "combined p (centroid + 1-prob)": ("centroid distance", "1 - max prob"),
    "combined p (centroid + energy)": ("centroid distance", "energy"),
    "combined p (centroid + nearest treatment)": ("centroid distance", "nearest treatment"),
    "combined p (centroid + 1-prob + energy)": ("centroid distance", "1 - max prob", "energy"),
}
SCORES = (*BASE_SCORES, "class-conditional centroid", "centroid / class median", *COMBINED)


def load_run(run: Path, controls: bool = False):
    """(embeddings, their cache rows' metadata, class number per row) of a finished probe run; with ``controls``,
    also the embeddings of its cache's control tiles (computed, not kept)."""
    from cellmorph.cv.features import control_embeddings
    from cellmorph.cv.rundir import RunDir
    from cellmorph.cv.run import plan_run
    from cellmorph.progress import Progress

    header = RunDir(run).read_config()
    plan = plan_run(Path(header["data"]), header["config"])
    rows = np.unique(np.concatenate([np.concatenate([f.train, f.test]) for f in plan.folds]))
    x = np.load(run / "embeddings.npy").astype(np.float64)
    if len(x) != len(rows):
        raise SystemExit(f"{run}: {len(x)} embeddings for {len(rows)} rows; not this run's")
    found = (x, plan.cache.index.iloc[rows].reset_index(drop=True), plan.targets[rows])
    if not controls:
        return found
    with Progress(False) as bar:
        embedded = control_embeddings(plan, None, bar)
    if embedded is None:
        raise SystemExit(f"{run}: its cache has no control tiles outside the classes")
    return found + (embedded.astype(np.float64),)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def score_treatments(x: np.ndarray, index: pd.DataFrame, y: np.ndarray, train: np.ndarray,
                     test: np.ndarray, controls: np.ndarray, pool: str = "treatment") -> pd.DataFrame:
    """Every score of each test treatment, from a probe fitted on the ``train`` rows (and the controls) only.
    ``pool="compound"``: each treatment scored by its compound's profile, the mean of the compound's treatment
    profiles (cell kNN: the median over the compound's cells), as ``compounds.csv`` calls a compound."""
    from scipy.special import logsumexp, softmax
    from sklearn.covariance import LedoitWolf

    from cellmorph.novelty import centroid_distance

    head = CentroidHead.fit(x[train], y[train], index.iloc[train], TEMPERATURE, controls)
    z_train = (x[train] - head.mean_) / head.scale_
    z_test = (x[test] - head.mean_) / head.scale_
    t_train, t_test = treatment_ids(index.iloc[train]), treatment_ids(index.iloc[test])
    profiles_train = pd.DataFrame(z_train).groupby(t_train, sort=True).mean()
    moa_of = pd.Series(y[train], index=t_train).groupby(level=0).first().loc[profiles_train.index].to_numpy()
    profiles = pd.DataFrame(z_test).groupby(t_test, sort=True).mean()
    owner = pd.DataFrame({"compound": index["Metadata_Compound"].astype(str).to_numpy()[test], "y": y[test]},
                         index=t_test).groupby(level=0, sort=True).first().loc[profiles.index]
    p = profiles.to_numpy()
    cell_group, row_key = t_test, profiles.index  # cell kNN: the median over the cells of what is scored
    if pool == "compound":
        p = profiles.groupby(owner["compound"].to_numpy()).transform("mean").to_numpy()
        cell_group, row_key = index["Metadata_Compound"].astype(str).to_numpy()[test], owner["compound"].to_numpy()
    logits = p @ head.centroids.T / TEMPERATURE
    means = np.stack([profiles_train.to_numpy()[moa_of == k].mean(axis=0) for k in head.classes_])
    deviations = profiles_train.to_numpy() - means[np.searchsorted(head.classes_, moa_of)]
    precision = LedoitWolf().fit(deviations).precision_
    diff = p[:, None, :] - means[None, :, :]
    mahalanobis = np.sqrt(np.einsum("tkd,de,tke->tk", diff, precision, diff)).min(axis=1)
    cells_train, cells_test = _unit(z_train), _unit(z_test)
    knn = 1.0 - np.sort(cells_test @ cells_train.T, axis=1)[:, -10:].mean(axis=1)
    out = pd.DataFrame({
        "treatment": profiles.index,
        "1 - max prob": 1.0 - softmax(logits, axis=1).max(axis=1),
        "energy": -TEMPERATURE * logsumexp(logits, axis=1),
        "centroid distance": centroid_distance(p, head.centroids),
        "nearest treatment": 1.0 - (_unit(p) @ _unit(profiles_train.to_numpy()).T).max(axis=1),
        "mahalanobis": mahalanobis,
        "cell kNN": pd.Series(knn).groupby(cell_group).median().loc[row_key].to_numpy(),
        "from the controls": centroid_distance(p - head.control.profile, head.control.centroids),
        "centroid distance + controls": centroid_distance(p, head.centroids, head.control),
        "compound": owner["compound"].to_numpy(),
        "y": owner["y"].to_numpy(),
    })
    cosines = _unit(p) @ head.centroids.T  # the class-conditional scores' input, one column per known MoA
    return out.assign(**{f"cos_{k}": cosines[:, i] for i, k in enumerate(head.classes_)})


def leave_one_moa_out(x, index, y, controls, pool: str = "treatment") -> pd.DataFrame:
    """Scores of every unseen-MoA treatment and every known-MoA new-compound treatment, fold by fold."""
    compounds = index["Metadata_Compound"].astype(str).to_numpy()
    parts = []
    for moa in np.unique(y):
        held = y == moa
        unseen = score_treatments(x, index, y, np.flatnonzero(~held), np.flatnonzero(held), controls, pool)
        parts.append(unseen.assign(fold=int(moa), novel=True))
        for compound in sorted(set(compounds[~held])):
            out = compounds == compound
            if len(set(y[~held & ~out])) < len(set(y[~held])):  # the compound is its MoA's only one: not new
                continue
            known = score_treatments(x, index, y, np.flatnonzero(~held & ~out), np.flatnonzero(out), controls, pool)
            parts.append(known.assign(fold=int(moa), novel=False))
    return pd.concat(parts, ignore_index=True)


def conformal_p(values: np.ndarray, compounds: np.ndarray, reference: np.ndarray,
                reference_compounds: np.ndarray) -> np.ndarray:
    """Each value's conformal p-value, (1 + #{reference >= value}) / (n + 1), against the ``reference`` values
    of the other compounds only (n counts those): a known treatment never calibrates itself or its compound."""
    other = compounds[:, None] != reference_compounds[None, :]
    at_least = (reference[None, :] >= values[:, None]) & other
    return (1.0 + at_least.sum(axis=1)) / (1.0 + other.sum(axis=1))


def class_conditional(part: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """One fold's treatments: 1 - the largest Mondrian p-value of the cosine distance to each known MoA's
    centroid (calibrated by that MoA's known treatments), and the smallest such distance over the MoA's median
    calibration distance. Both leave the treatment's own compound out of every calibration set."""
    known = part[~part["novel"]]
    compounds = part["compound"].to_numpy()
    p_values, ratios = [], []
    for k in sorted(set(known["y"])):  # a known MoA without known treatments (one compound) has no calibration
        distance = 1.0 - part[f"cos_{k}"].to_numpy()
        calibration = known[known["y"] == k]
        reference, reference_compounds = 1.0 - calibration[f"cos_{k}"].to_numpy(), calibration["compound"].to_numpy()
        p_values.append(conformal_p(distance, compounds, reference, reference_compounds))
        others = np.where(compounds[:, None] != reference_compounds[None, :], reference[None, :], np.nan)
        ratios.append(distance / np.nanmedian(others, axis=1))
    return 1.0 - np.max(p_values, axis=0), np.min(ratios, axis=0)


def combined_p(part: pd.DataFrame, names: tuple[str, ...]) -> np.ndarray:
    """One fold's treatments: 1 - the mean over ``names`` of each score's conformal p-value against the fold's
    known treatments (those of the treatment's own compound left out)."""
    known = part[~part["novel"]]
    compounds, reference_compounds = part["compound"].to_numpy(), known["compound"].to_numpy()
    p_values = [conformal_p(part[name].to_numpy(), compounds, known[name].to_numpy(), reference_compounds)
                for name in names]
    return 1.0 - np.mean(p_values, axis=0)


def add_calibrated_scores(scored: pd.DataFrame) -> pd.DataFrame:
    """``scored`` with the scores calibrated fold by fold on the fold's known treatments."""
    parts = []
    for _, part in scored.groupby("fold", sort=True):
        conditional, ratio = class_conditional(part)
        parts.append(part.assign(**{"class-conditional centroid": conditional, "centroid / class median": ratio},
                                 **{name: combined_p(part, names) for name, names in COMBINED.items()}))
    return pd.concat(parts).loc[scored.index]


def summarise(scored: pd.DataFrame, classes: list[str], alpha: float) -> dict:
    """Per score: AUROCs, and the unseen treatments flagged at the known ones' (1 − alpha) quantile and at the
    conformal threshold ``cv --cv lomo`` and ``predict`` set (a little higher: :func:`novelty_threshold`)."""
    from cellmorph.novelty import novelty_threshold

    table = {}
    for name in SCORES:
        per_moa, flagged, conformal, pooled_pos, pooled_neg = {}, [], [], [], []
        for fold, part in scored.groupby("fold"):
            pos, neg = part.loc[part["novel"], name].to_numpy(), part.loc[~part["novel"], name].to_numpy()
            per_moa[classes[fold]] = auroc(pos, neg)
            threshold = np.quantile(neg, 1.0 - alpha)
            flagged.append(pos > threshold)
            conformal.append(pos > novelty_threshold(neg, alpha))
            pooled_pos.append(pos)
            pooled_neg.append(neg)
        table[name] = {"auroc_pooled": auroc(np.concatenate(pooled_pos), np.concatenate(pooled_neg)),
                       "auroc_mean_over_moas": float(np.mean(list(per_moa.values()))),
                       "flagged_at_alpha": float(np.concatenate(flagged).mean()),
                       "flagged_conformal": float(np.concatenate(conformal).mean()), "auroc_per_moa": per_moa}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--pool", choices=("treatment", "compound"), default="treatment",
                        help="score each treatment by its own profile, or by its compound's (all its treatments)")
    args = parser.parse_args()
    from cellmorph.cv.rundir import RunDir

    x, index, y, controls = load_run(args.run, controls=True)
    classes = list(RunDir(args.run).read_config()["classes"])
    scored = add_calibrated_scores(leave_one_moa_out(x, index, y, controls, args.pool))
    table = summarise(scored, classes, args.alpha)
    n_novel, n_known = int(scored["novel"].sum()), int((~scored["novel"]).sum())
    print(f"{n_novel} unseen-MoA treatments and {n_known} known-MoA new-compound treatments over {len(classes)} "
          f"folds; flagged at the threshold that flags {args.alpha:.0%} of the known ones")
    print("| score | AUROC pooled | AUROC, mean over MoAs | flagged | flagged, conformal threshold |\n|---|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['auroc_pooled']:.3f} | {row['auroc_mean_over_moas']:.3f} | "
              f"{row['flagged_at_alpha']:.3f} | {row['flagged_conformal']:.3f} |")
    print("\nAUROC per held-out MoA:\n| MoA | " + " | ".join(SCORES) + " |\n|---|" + "---|" * len(SCORES))
    for moa in classes:
        print(f"| {moa} | " + " | ".join(f"{table[s]['auroc_per_moa'].get(moa, float('nan')):.2f}" for s in SCORES)
              + " |")
    if args.out is not None:
        args.out.write_text(json.dumps({"alpha": args.alpha, "pool": args.pool, "n_novel": n_novel, "n_known": n_known,
                                        "scores": table}, indent=1))


if __name__ == "__main__":
    main()
