"""One self-contained HTML report per output folder: ``cellmorph report RUN`` → ``RUN/report.html``.

A screening biologist opens a run to see what was called, how sure each call is, and why.
The report is one file: figures are PNGs (matplotlib) inlined as data URIs, the one script
(sorting the treatment table) and the style sheet are inline, so it opens offline on an
air-gapped machine and can be mailed or archived as it is. The page is rendered from a
jinja2 template (``templates/report.html.j2``); this module only gathers what goes in it.

Three kinds of folder are recognised by what they hold:

* a cross-validation run (``cellmorph cv``: ``config.yaml`` + ``metrics.json``);
* a prediction (``cellmorph predict``: ``summary.json`` + ``treatments.parquet``);
* a comparison of initialisations (``cellmorph compare-inits``: ``init_comparison.json``).

Accuracies carry 95% bootstrap intervals over treatments (treatments resampled with
replacement; a well or tile accuracy resamples the wells and tiles of the drawn treatments),
2,000 draws from a fixed seed, so the same run gives the same report.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from cellmorph.errors import CellmorphError, option
from cellmorph.metrics import BOOTSTRAP_DRAWS, bootstrap_interval
from cellmorph.runinfo import write_text
from cellmorph.schema import CORRECT_COLUMN, PREDICTED_COLUMN, TRUE_COLUMN, prob_column

REPORT_FILE = "report.html"
EXAMPLES_PER_KIND = 3  # tiles per MoA: best correct calls, and the worst mistakes
GRADCAM_TILES = 8
SECTION_IDS = ("run", "accuracy", "unknown", "confusion", "classes", "treatments", "curves", "reliability", "map",
               "retrieval", "examples", "network")


@dataclass
class Section:
    """One titled part of the report: paragraphs, figures (data URIs), tables, preformatted text."""

    id: str
    title: str
    notes: list[str] = field(default_factory=list)
    figures: list[dict] = field(default_factory=list)  # {"src": data URI, "caption": str, "alt": str}
    tables: list[dict] = field(default_factory=list)  # {"columns": [...], "rows": [[...]], "sortable": bool}
    details: dict[str, str] = field(default_factory=dict)  # folded away: summary → preformatted text


# --------------------------------------------------------------------------- entry point
def write_report(run: Path, visualise: bool = True) -> Path:
    """Write ``run/report.html`` (atomically) and return its path."""
    run = Path(run)
    if not run.is_dir():
        raise CellmorphError(f"{run}: not a folder (give a cv, predict or compare-inits output)")
    if (run / "summary.json").is_file() and (run / "treatments.parquet").is_file():
        context = _predict_context(run, visualise)
    elif (run / "config.yaml").is_file() and (run / "metrics.json").is_file():
        context = _cv_context(run, visualise)
    elif (run / "init_comparison.json").is_file():
        context = _compare_context(run)
    elif (run / "config.yaml").is_file():
        raise CellmorphError(f"{run}: the run has not finished (no metrics.json): resume it, then report")
    else:
        raise CellmorphError(f"{run}: not a cellmorph output folder (no config.yaml + metrics.json, summary.json "
                             "or init_comparison.json)")
    page = _template().render(**context)
    path = run / REPORT_FILE
    write_text(path, page)  # with the umask's permissions, as every atomic write (runinfo.share_like_new)
    return path


def _template():
    from jinja2 import Environment, PackageLoader

    # Every value is escaped: compound, plate and MoA names and paths come from the user's CSVs and
    # options, and the one template's name (.html.j2) is not one select_autoescape(["html"]) matches.
    env = Environment(loader=PackageLoader("cellmorph.report", "templates"), autoescape=True,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["code"] = _code_spans
    return env.get_template("report.html.j2")


def _code_spans(text: str):
    """Escaped ``text`` with its `backquoted` parts as <code> (commands in the notes)."""
    import re

    from markupsafe import Markup, escape

    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text))))


# --------------------------------------------------------------------------- kinds of folder
def _cv_context(run: Path, visualise: bool) -> dict:
    from cellmorph.cv.open_set import OPEN_SET_FILE
    from cellmorph.cv.rundir import RunDir

    rundir = RunDir(run)
    header = rundir.read_config()
    metrics = json.loads((run / "metrics.json").read_text())
    classes = list(header.get("classes") or metrics.get("classes") or [])
    levels = rundir.read_levels()
    treatments, wells, tiles = levels["treatments"], levels["wells"], levels["tiles"]
    cfg = header.get("config", {})
    title = f"{cfg.get('model', '?')} ({cfg.get('init', '?')}), {cfg.get('cv', '?')} cross-validation"
    if metrics.get("ensemble"):
        title = f"Ensemble of {len(metrics['ensemble'])}: {title}"
    sections = [
        _run_section(header, extra={"folds": metrics.get("n_folds"), "seconds": metrics.get("seconds")}),
        _with_notes(_accuracy_section(treatments, wells, tiles, classes, "held-out"),
                    [f"Not scored: {entry.get('name')}: {entry.get('reason')}" for entry in metrics.get("skipped_folds")
                     or []] + ([f"The linear probe's C per fold: {_counts(metrics['probe_c'])}."]
                               if metrics.get("probe_c") else [])
                    + ([f"The centroid head's temperature per fold: {_counts(metrics['probe_temperature'])}."]
                       if metrics.get("probe_temperature") else [])
                    + _ensemble_notes(metrics.get("ensemble"))
                    + ([f"Compounds, each called from all its treatments together (compounds.csv): "
                        f"{metrics['compound_accuracy']:.3f} of {metrics.get('n_compounds')} right."]
                       if metrics.get("compound_accuracy") is not None else [])),
        _unknown_moa_section(run / OPEN_SET_FILE),
    ]
    sections += [
        _confusion_section(run / "confusion_matrix.png"),
        _classes_section(treatments, classes),
        _treatments_section(treatments, classes),
        _curves_section(run / "learning_curves.png"),
        Section("reliability", "Reliability", notes=[
            "Cross-validation probabilities are the held-out softmax, not calibrated: `cellmorph train "
            "--calibration loco` calibrates them, and a predict report shows their reliability diagram."]),
        _map_section(wells, classes),
        _retrieval_section(run, metrics.get("map")),
    ]
    cache = _cache_or_none(header.get("data"))
    sections.append(_examples_section(tiles, classes, cache))
    sections.append(_network_section(run, visualise, lambda: _cv_network(run, header), tiles, classes, cache))
    return _context(title, "cv", run, sections)


def _predict_context(run: Path, visualise: bool) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    treatments = pd.read_parquet(run / "treatments.parquet")
    wells = pd.read_parquet(run / "wells.parquet")
    tiles = pd.read_parquet(run / "tiles.parquet")
    classes = [c[len(prob_column("")):] for c in treatments.columns if c.startswith(prob_column(""))]
    labelled = TRUE_COLUMN in treatments.columns and treatments[TRUE_COLUMN].astype(str).isin(classes).any()
    header = {"data": summary.get("data"), "model": summary.get("model"), "config": summary.get("config", {}),
              "provenance": summary.get("provenance", {}), "classes": classes}
    novelty = summary.get("novelty") or {}
    flagged = {} if not novelty else {
        f"Novel: no known MoA fits ({novelty.get('score')}; a new compound of a known MoA flagged at most "
        f"{novelty.get('alpha')} of the time)": ", ".join(novelty.get("novel_treatments") or []) or "none"}
    compounds = summary.get("compounds") or {}
    compound_novelty = compounds.get("novelty") or {}
    if compound_novelty:
        flagged["Novel compounds, from their treatments together"] = \
            ", ".join(compound_novelty.get("novel_compounds") or []) or "none"
    called = {} if "accuracy_labelled" not in compounds else {
        "compounds called right from their treatments together (compounds.parquet)":
            f"{compounds['accuracy_labelled']:.3f} of {compounds.get('n_labelled')} labelled"
            + (f"; {compounds['accuracy_new']:.3f} of {compounds['n_new']} new" if "accuracy_new" in compounds else "")}
    sections = [_run_section(header, extra={"alpha": summary.get("alpha"),
                                            "mean prediction-set size": summary.get("mean_set_size"),
                                            "empty sets": summary.get("n_empty_sets")} | flagged | called)]
    if labelled:
        known = lambda frame: frame[frame[TRUE_COLUMN].astype(str).isin(classes)]  # noqa: E731
        sections += [_accuracy_section(known(treatments), known(wells), known(tiles), classes, "labelled"),
                     _novel_section(treatments, novelty),
                     _confusion_section_from(known(treatments), classes),
                     _classes_section(known(treatments), classes)]
    else:
        sections += [Section("accuracy", "Accuracy", notes=[
            "The screen carries no known MoAs, so there is nothing to score: the calls, their calibrated "
            "confidence and prediction sets are below."]), _novel_section(treatments, novelty)]
    sections.append(_treatments_section(treatments, classes))
    sections.append(Section("curves", "Learning curves", notes=[
        "A prediction trains nothing; the model's own training history is in its bundle "
        f"({summary.get('model')})."]))
    sections.append(_reliability_section(treatments, classes) if labelled else
                    Section("reliability", "Reliability", notes=["No known MoAs: no reliability diagram."]))
    sections.append(_map_section(wells, classes))
    sections.append(Section("retrieval", "Retrieval (mAP)", notes=[(
        "Mean average precision is measured where treatments have known MoAs and DMSO wells: by `cellmorph cv` "
        "(its report shows it), `cellmorph embed` and `cellmorph profile-eval`.")]))
    cache = _cache_or_none(summary.get("cache"))
    sections.append(_examples_section(tiles, classes, cache))
    sections.append(_network_section(run, visualise, lambda: _bundle_network(summary.get("model")), tiles, classes,
                                     cache, model=summary.get("model")))
    title = f"Predictions of {Path(str(summary.get('model'))).name} on {Path(str(summary.get('data'))).name}"
    return _context(title, "predict", run, sections)


def _compare_context(run: Path) -> dict:
    result = json.loads((run / "init_comparison.json").read_text())
    table = pd.read_csv(run / "init_comparison.csv") if (run / "init_comparison.csv").is_file() else None
    section = Section("accuracy", f"{result['metric']} by initialisation",
                      figures=[_png_file(run / "init_comparison.png", "The paper's Fig. 4: accuracy after each "
                                         "number of epochs, per initialisation, over replicates")])
    rows = [[init, *[f"{v[str(e)]['mean']:.3f} ± {v[str(e)]['std']:.3f}" for e in result["epochs"]]]
            for init, v in result["by_init"].items()]
    section.tables.append({"columns": ["init", *[f"{e} epochs" for e in result["epochs"]]], "rows": rows,
                           "sortable": False})
    if table is not None:
        section.tables.append(_frame_table(table.round(4), sortable=True))
    runs = sorted(p.parent for p in run.glob("*/replicate-*/config.yaml"))
    header = yaml.safe_load((runs[0] / "config.yaml").read_text()) if runs else {}
    sections = [_run_section(header, extra={"replicates": result["replicates"], "runs": len(runs)}), section]
    return _context(f"Pretrained against random initialisation ({result['replicates']} replicates)", "compare-inits",
                    run, sections)


def _context(title: str, kind: str, run: Path, sections: list[Section]) -> dict:
    from cellmorph.runinfo import run_info

    made = run_info()
    return {"title": title, "kind": kind, "run": str(run.resolve()), "sections": sections,
            "made_with": f"cellmorph {made.get('packages', {}).get('cellmorph', '?')}"}


# --------------------------------------------------------------------------- sections
def _run_section(header: dict, extra: dict) -> Section:
    provenance = header.get("provenance", {})
    packages = provenance.get("packages", {})
    cfg = header.get("config", {})
    rows = [["data", header.get("data")], ["model bundle", header.get("model")],
            ["data fingerprint", header.get("data_fingerprint")], ["run fingerprint", header.get("fingerprint")],
            ["seed", (header.get("seeds") or {}).get("seed", cfg.get("seed"))],
            ["device", header.get("device")], ["threads", header.get("threads")],
            ["executor", _short((header.get("executor") or {}).get("kind"))],
            ["git commit", provenance.get("git_commit")], ["python", provenance.get("python")],
            *[[k, v] for k, v in extra.items()]]
    rows = [[k, _short(v)] for k, v in rows if v is not None]
    section = Section("run", "What was run", tables=[{"columns": ["", ""], "rows": rows, "sortable": False}])
    if cfg:
        section.details["Resolved configuration"] = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)
    if packages:
        section.details["Package versions"] = "\n".join(f"{k} {v}" for k, v in sorted(packages.items()))
    return section


def _with_notes(section: Section, notes: list[str]) -> Section:
    section.notes.extend(notes)
    return section


def _ensemble_notes(members: list[dict] | None) -> list[str]:
    """One line per member of an ensemble run, after the line saying how they were combined."""
    if not members:
        return []
    return [f"Ensemble of {len(members)} members, each level's probabilities averaged over them "
            "(each member's own run and report are in its folder):"] + [
        f"{m.get('run')}: {m.get('model')}, treatment {m.get('treatment_accuracy', float('nan')):.3f}, well "
        f"{m.get('well_accuracy', float('nan')):.3f}, tile {m.get('tile_accuracy', float('nan')):.3f}" for m in members]


def _counts(values: dict) -> str:
    """``{fold: C}`` as "0.01 (12 folds), 0.003 (10 folds)"."""
    from collections import Counter

    text = lambda v: f"{v:g}" if isinstance(v, (int, float)) else str(v)  # noqa: E731
    return ", ".join(f"{text(v)} ({n} fold{'s' if n > 1 else ''})" for v, n in Counter(values.values()).most_common())


def _accuracy_section(treatments, wells, tiles, classes, what: str) -> Section:
    rows = []
    tile_correct = _tile_correct(tiles, classes)
    for level, frame, correct in (("treatment", treatments, _correct(treatments)), ("well", wells, _correct(wells)),
                                  ("tile", tiles, tile_correct)):
        if frame is None or not len(frame):
            continue
        low, high = bootstrap_interval(frame, correct)
        rows.append([level, f"{correct.mean():.3f}", f"{low:.3f} – {high:.3f}", str(len(frame))])
    return Section("accuracy", "Accuracy", notes=[
        f"Accuracy of the {what} calls (median aggregation tile → well → treatment, as in the paper), with 95% "
        f"bootstrap intervals over treatments ({BOOTSTRAP_DRAWS} draws)."],
        tables=[{"columns": ["level", "accuracy", "95% interval", "n"], "rows": rows, "sortable": False}])


def _confusion_section(png: Path) -> Section:
    return Section("confusion", "Confusion matrix",
                   figures=[_png_file(png, "Treatments: rows are the true MoA, columns the call")])


def _confusion_section_from(treatments, classes) -> Section:
    from cellmorph.metrics import confusion
    from cellmorph.figures import confusion_figure

    matrix = confusion(treatments, classes)
    return Section("confusion", "Confusion matrix", figures=[
        _figure(confusion_figure(matrix, classes), "Treatments: rows are the true MoA, columns the call")])


def _classes_section(treatments, classes) -> Section:
    from sklearn.metrics import precision_recall_fscore_support

    truth = treatments[TRUE_COLUMN].astype(str).to_numpy()
    called = treatments[PREDICTED_COLUMN].astype(str).to_numpy()
    precision, recall, f1, support = precision_recall_fscore_support(truth, called, labels=classes, zero_division=0)
    rows = [[c, int(n), f"{r:.3f}", f"{p:.3f}", f"{f:.3f}"]
            for c, n, r, p, f in zip(classes, support, recall, precision, f1) if n or (called == c).any()]
    return Section("classes", "Per MoA", notes=["Treatment level: recall is the share of the MoA's treatments "
                                                "called right; precision the share of its calls that were right."],
                   tables=[{"columns": ["MoA", "treatments", "recall", "precision", "F1"], "rows": rows,
                            "sortable": True}])


def _treatments_section(treatments, classes) -> Section:
    from cellmorph.predict import CONFIDENCE_COLUMN, SET_COLUMN

    probs = treatments[[prob_column(c) for c in classes]].to_numpy(float)
    frame = pd.DataFrame({
        "compound": treatments.get("Metadata_Compound"),
        "concentration": treatments.get("Metadata_Concentration"),
        "MoA": treatments.get(TRUE_COLUMN, pd.Series([""] * len(treatments))),
        "call": treatments[PREDICTED_COLUMN],
    })
    if CORRECT_COLUMN in treatments.columns:
        frame["correct"] = treatments[CORRECT_COLUMN].map({True: "yes", False: "no"}).fillna("")
    frame["probability of the call"] = probs.max(axis=1).round(3)
    if CONFIDENCE_COLUMN in treatments.columns:
        frame["confidence (calibrated)"] = treatments[CONFIDENCE_COLUMN].astype(float).round(3)
    if SET_COLUMN in treatments.columns:
        frame["prediction set"] = treatments[SET_COLUMN].astype(str).str.replace("|", ", ", regex=False)
    return Section("treatments", "Treatments", notes=["Click a column heading to sort."],
                   tables=[_frame_table(frame, sortable=True, table_id="treatment-table")])


def _curves_section(png: Path) -> Section:
    if not png.is_file():
        return Section("curves", "Learning curves", notes=["A linear probe trains no network: no epochs to plot."])
    return Section("curves", "Learning curves", figures=[_png_file(
        png, "Per fold: training loss, and training and held-out tile accuracy, by epoch")])


def _reliability_section(treatments, classes) -> Section:
    from cellmorph.predict import CONFIDENCE_COLUMN

    known = treatments[treatments[TRUE_COLUMN].astype(str).isin(classes)]
    confidence = known[CONFIDENCE_COLUMN].astype(float).to_numpy()
    correct = (known[PREDICTED_COLUMN].astype(str) == known[TRUE_COLUMN].astype(str)).to_numpy()
    fig, ece = reliability_figure(confidence, correct)
    return Section("reliability", "Reliability", notes=[
        f"Calibrated confidence of each treatment's call against how often such calls were right "
        f"(expected calibration error {ece:.3f}, {len(known)} labelled treatments)."],
        figures=[_figure(fig, "Reliability diagram: the diagonal is perfect calibration")])


def _map_section(wells, classes) -> Section:
    probs = wells[[prob_column(c) for c in classes]].to_numpy(float)
    if len(wells) < 3:
        return Section("map", "Map of well profiles", notes=["Fewer than 3 wells: no map."])
    points, method = project_2d(np.log(np.clip(probs, 1e-6, 1.0)))
    labels = wells.get(TRUE_COLUMN, wells[PREDICTED_COLUMN]).astype(str).to_numpy()
    fig = map_figure(points, labels, method)
    return Section("map", "Map of well profiles", notes=[
        f"Each well's log class probabilities, projected to 2-D by {method}, coloured by its MoA."],
        figures=[_figure(fig, f"Wells ({len(wells)}), {method}")])


def _novel_section(treatments: pd.DataFrame, novelty: dict) -> Section:
    """The treatments that predict flagged Novel (no known MoA fits), most novel first."""
    section = Section("unknown", "Unknown MoA")
    if not novelty or "Novel" not in treatments.columns:
        section.notes.append("The model holds no novelty calibration: no treatment is flagged (retrain it with this "
                             "version of cellmorph).")
        return section
    flagged = treatments[treatments["Novel"].astype(bool)]
    section.notes.append(
        f"Novel means no known MoA fits: the treatment's novelty score ({novelty.get('score')}) is above the threshold "
        f"that flags at most {novelty.get('alpha')} of new compounds of known MoAs"
        + (" (each treatment scored by its compound, from all the compound's treatments together, and so were the "
           "calibration treatments)" if novelty.get("pool") == "compound" else "")
        + f". {len(flagged)} of {len(treatments)} treatments flagged.")
    if len(flagged):
        columns = [c for c in ("Metadata_Compound", "Metadata_Concentration", TRUE_COLUMN, PREDICTED_COLUMN,
                               "Novelty_Score") if c in flagged.columns]
        section.tables.append(_frame_table(flagged.sort_values("Novelty_Score", ascending=False)[columns],
                                           sortable=True))
    return section


def _unknown_moa_section(path: Path) -> Section:
    """A lomo run's open-set evaluation (``open_set.json`` at ``path``): the novelty score's ROC with the Novel
    flag's operating point, the figures per held-out MoA, and the unseen-MoA treatments it flagged and missed;
    for another run, how to measure it."""
    from cellmorph.figures import novelty_roc_figure

    if not path.is_file():
        return Section("unknown", "Unknown MoA", notes=[
            "This cross-validation held out compounds, not MoAs. `cellmorph cv --cv lomo --mode linear-probe` "
            "holds out each MoA in turn and measures how often its treatments are flagged Novel (no known MoA "
            "fits) against how often new compounds of known MoAs are (open_set.json, and this section); for one "
            "network, `cellmorph cv --cv lomo --open-set-reference LOCO_RUN` with the recipe of a LOCO run."])
    record = json.loads(path.read_text())
    rows = pd.DataFrame(record.get("treatments") or [])
    section = Section("unknown", "Unknown MoA", notes=[
        f"Leave one MoA out: every compound of one MoA held out, the model trained on the others. Each held-out "
        f"treatment gets a novelty score ({record.get('score')}) from training compounds only; Novel is set above the "
        f"threshold that flags at most α = {record.get('alpha'):g} of new compounds of known MoAs. AUROC "
        f"{record.get('auroc', float('nan')):.3f} ({record.get('n_unseen_treatments')} unseen-MoA against "
        f"{record.get('n_known_treatments')} known-MoA treatments); {record.get('flagged_at_alpha', float('nan')):.1%} "
        f"of the unseen-MoA treatments flagged, at {record.get('false_alarm_rate', float('nan')):.1%} measured false "
        "alarms" + (", each treatment scored by its compound, as predict scores it by default" if record.get("pool")
                    == "compound" else "") + "."])
    alone = record.get("treatments_alone")
    if alone:
        section.notes.append(
            f"Each treatment scored alone, by its own profile (predict --novelty-pool treatment): AUROC "
            f"{alone.get('auroc', float('nan')):.3f}; {alone.get('flagged_at_alpha', float('nan')):.1%} flagged, at "
            f"{alone.get('false_alarm_rate', float('nan')):.1%} measured false alarms.")
    compounds = record.get("compounds")
    if compounds:
        section.notes.append(
            f"Each compound scored once from its treatments together (as predict's compounds.parquet): AUROC "
            f"{compounds.get('auroc', float('nan')):.3f} ({compounds.get('n_unseen_compounds')} unseen-MoA against "
            f"{compounds.get('n_known_compounds')} known-MoA compounds); "
            f"{compounds.get('flagged_at_alpha', float('nan')):.1%} of the unseen-MoA compounds flagged, at "
            f"{compounds.get('false_alarm_rate', float('nan')):.1%} measured false alarms.")
    if record.get("reference"):
        section.notes.append(f"The new compounds of known MoAs are the held-out compounds of the LOCO run "
                             f"{record['reference']} (the same recipe; each called by a network that never saw it), as "
                             "a bundle's calibration treatments are.")
    if not rows.empty:
        unseen, known = (rows.loc[rows["kind"] == kind, "score"].to_numpy(float) for kind in ("unseen", "known"))
        section.figures.append(_figure(novelty_roc_figure(unseen, known, record["auroc"], record["alpha"],
                                                          record["flagged_at_alpha"], record["false_alarm_rate"]),
                                       "ROC of the novelty score; the dot is the Novel flag at its α"))
    per_moa = [[m["moa"], m["n_treatments"], f"{m['auroc']:.3f}" if np.isfinite(m["auroc"]) else "–",
                f"{m['flagged']:.2f}", _short(m.get("flagged_treatments")) or "–"] for m in record.get("per_moa") or []]
    if per_moa:
        section.tables.append({"columns": ["held-out MoA", "treatments", "AUROC", "fraction flagged",
                                           "flagged treatments"], "rows": per_moa, "sortable": True})
    if not rows.empty:
        unseen_rows = rows[rows["kind"] == "unseen"].sort_values("score", ascending=False)
        section.tables.append(_frame_table(unseen_rows[["held_out_moa", "compound", "concentration", "score", "novel"]]
                                           .rename(columns={"held_out_moa": "held-out MoA"}), sortable=True))
    return section


def _retrieval_section(run: Path, summary: dict | None) -> Section:
    """copairs mAP of the run's profiles (:mod:`cellmorph.retrieval`): the summary of both retrievals, then
    the per-MoA and per-treatment tables the run wrote."""
    from cellmorph.retrieval import MOA_FILE, REPLICATES_FILE

    section = Section("retrieval", "Retrieval (mAP)")
    if not summary:
        section.notes.append("The run has no mean average precision (made before cellmorph measured it).")
        return section
    if "skipped" in summary:
        section.notes.append(f"No mean average precision: {summary['skipped']}.")
        return section
    section.notes.append(
        "Mean average precision (copairs), on the held-out probabilities ("
        f"{summary.get('distance')} similarity). Replicate retrieval: each treated well ranks its treatment's "
        "other wells among the DMSO wells. MoA retrieval: each treatment ranks the treatments of other compounds "
        "of its MoA among those of other MoAs. Retrieved: mAP above the permutation null "
        f"({summary.get('null_size')} permutations, seed {summary.get('seed')}) with Benjamini-Hochberg corrected "
        f"p < {summary.get('threshold')} (copairs {summary.get('copairs')}).")
    rows = []
    for part, what in (("replicates", "replicate retrieval"), ("moa", "MoA retrieval")):
        record = summary.get(part) or {}
        if "skipped" in record:
            section.notes.append(f"{what.capitalize()} not scored: {record['skipped']}.")
            continue
        if "mean_map" not in record:
            continue
        missed = record.get("not_scored") or []
        retrieved = (f"{record['fraction_retrieved']:.3f} ({record['n_retrieved']} of {record['n_scored']} "
                     f"{record.get('unit', '')})")
        rows.append([what, _short(record.get("profiles")), f"{record['mean_map']:.3f}", retrieved,
                     _short(missed) if missed else "–"])
    if rows:
        section.tables.append({"columns": ["", "profiles", "mean mAP", "fraction retrieved", "not scored (no pair)"],
                               "rows": rows, "sortable": False})
    for name, rename in ((MOA_FILE, {"Metadata_MoA": "MoA"}),
                         (REPLICATES_FILE, {"Metadata_Compound": "compound", "Metadata_Concentration": "concentration",
                                            "Metadata_MoA": "MoA"})):
        path = run / name
        if not path.is_file():
            continue
        frame = pd.read_csv(path, dtype={k: str for k in rename if k != "Metadata_Concentration"},
                            keep_default_na=False, na_values=[""])
        frame = frame.rename(columns=rename | {"mean_average_precision": "mAP", "corrected_p_value": "corrected p",
                                               "p_value": "p", "below_corrected_p": "retrieved"})
        frame["retrieved"] = frame["retrieved"].map({True: "yes", False: "no"}).fillna("")
        frame = frame.drop(columns=["mean_normalized_average_precision", "below_p"], errors="ignore")
        section.tables.append(_frame_table(frame, sortable=True))
    return section


def _examples_section(tiles, classes, cache) -> Section:
    if cache is None:
        return Section("examples", "Example tiles", notes=["The tile cache is no longer at its recorded path: "
                                                           "no example tiles."])
    picks = example_tiles(tiles, classes)
    if not picks:
        return Section("examples", "Example tiles", notes=["No labelled tiles to show."])
    fig = examples_figure(cache, picks)
    return Section("examples", "Example tiles", notes=[
        f"Per MoA: the {EXAMPLES_PER_KIND} tiles called right with the highest probability, and the "
        f"{EXAMPLES_PER_KIND} worst mistakes (wrong calls made with the highest probability)."],
        figures=[_figure(fig, "Example tiles per MoA (channels as red, green, blue)")])


def _network_section(run: Path, visualise: bool, network, tiles, classes, cache, model: str | None = None) -> Section:
    """Filter images written by ``cellmorph visualize filters`` into RUN/filters, and Grad-CAM."""
    section = Section("network", "What the network looks at")
    filters = sorted((run / "filters").glob("*.png")) if (run / "filters").is_dir() else []
    for png in filters:
        section.figures.append(_png_file(png, f"Filter images ({png.stem}): ImageNet network against the "
                                              "fine-tuned one"))
    if not filters:
        source = f"--model {model}" if model else f"--run {run}"
        section.notes.append(f"`cellmorph visualize filters {source} --out {run / 'filters'}` adds images that "
                             "maximise filters of the ImageNet and the fine-tuned network (the paper's Fig. 5).")
    if not visualise or cache is None:
        return section
    try:
        model, spec, source = network()
    except CellmorphError as error:
        section.notes.append(f"No Grad-CAM: {error}")
        return section
    picks = example_tiles(tiles, classes, fold=source.get("fold"))
    if not picks:
        return section
    try:
        from cellmorph.visualize import gradcam_overlays
    except ImportError:
        section.notes.append("No Grad-CAM: cellmorph.visualize is not available.")
        return section
    fig = gradcam_figure(model, spec, cache, picks, classes, gradcam_overlays)
    section.figures.append(_figure(fig, f"Grad-CAM of the call on the example tiles ({source['what']})"))
    return section


# --------------------------------------------------------------------------- numbers
def _correct(frame: pd.DataFrame) -> np.ndarray:
    if CORRECT_COLUMN in frame.columns:
        return frame[CORRECT_COLUMN].astype(bool).to_numpy()
    return (frame[PREDICTED_COLUMN].astype(str) == frame[TRUE_COLUMN].astype(str)).to_numpy()


def _tile_correct(tiles: pd.DataFrame, classes: list[str]) -> np.ndarray:
    calls = np.array(classes)[tiles[[prob_column(c) for c in classes]].to_numpy(float).argmax(axis=1)]
    return calls == tiles[TRUE_COLUMN].astype(str).to_numpy()


# The well map's projection: "auto" (UMAP where umap-learn is installed, else PCA), "umap" or "pca". UMAP's
# first call in a process compiles its numba kernels (10-12 s on one core), which a batch of reports or a
# test suite may not want to pay for each process.
MAP_PROJECTION_VARIABLE = "CELLMORPH_REPORT_MAP"


def project_2d(x: np.ndarray) -> tuple[np.ndarray, str]:
    """UMAP (umap-learn, seeded) where installed and there are enough points, else PCA (``$CELLMORPH_REPORT_MAP``
    = ``pca`` asks for PCA, ``umap`` for UMAP where it can)."""
    import os

    x = x - x.mean(axis=0)
    if len(x) < 2 or not np.any(np.ptp(x, axis=0) > 1e-9):  # every profile alike (e.g. one call for all)
        return np.zeros((len(x), 2)), "PCA"
    if len(x) >= 15 and os.environ.get(MAP_PROJECTION_VARIABLE, "auto").lower() != "pca":
        try:
            import warnings

            import umap  # optional: pip install 'cellmorph[report]'

            with warnings.catch_warnings():  # the seed makes it single-threaded, as wanted; it says so each call
                warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
                points = umap.UMAP(n_components=2, random_state=0, n_neighbors=min(15, len(x) - 1)).fit_transform(x)
            return np.asarray(points), "UMAP"
        except ImportError:
            pass
    from sklearn.decomposition import PCA

    # A rank-1 spread leaves the second component's share of the variance 0/0 inside sklearn: a
    # warning about a ratio this map never uses.
    with np.errstate(divide="ignore", invalid="ignore"):
        return PCA(n_components=2, random_state=0).fit_transform(x), "PCA"


def example_tiles(tiles: pd.DataFrame, classes: list[str], fold: int | None = None) -> list[dict]:
    """Per true class: the best correct and the worst wrong tiles (cache row, call, probability)."""
    from cellmorph.schema import CACHE_ROW_COLUMN, FOLD_COLUMN

    if TRUE_COLUMN not in tiles.columns or CACHE_ROW_COLUMN not in tiles.columns:
        return []
    frame = tiles[tiles[TRUE_COLUMN].astype(str).isin(classes)]
    if fold is not None and FOLD_COLUMN in frame.columns:
        frame = frame[frame[FOLD_COLUMN] == fold]
    probs = frame[[prob_column(c) for c in classes]].to_numpy(float)
    calls = probs.argmax(axis=1)
    best = probs.max(axis=1)
    truth = frame[TRUE_COLUMN].astype(str).map(classes.index).to_numpy()
    rows = frame[CACHE_ROW_COLUMN].to_numpy()
    picks = []
    for k, name in enumerate(classes):
        mine = np.flatnonzero(truth == k)
        if not len(mine):
            continue
        right = mine[calls[mine] == k]
        wrong = mine[calls[mine] != k]
        for kind, chosen in (("correct", right), ("mistake", wrong)):
            for i in chosen[np.argsort(-best[chosen], kind="stable")][:EXAMPLES_PER_KIND]:
                picks.append({"moa": name, "kind": kind, "row": int(rows[i]), "call": classes[int(calls[i])],
                              "probability": float(best[i]), "target": int(calls[i])})
    return picks


# --------------------------------------------------------------------------- figures
def reliability_figure(confidence: np.ndarray, correct: np.ndarray, bins: int = 10):
    from cellmorph.figures import pyplot

    plt = pyplot()
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ece = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            accuracy, mean_conf = correct[members].mean(), confidence[members].mean()
            ece += members.mean() * abs(accuracy - mean_conf)
            ax.bar(edges[b], accuracy, width=1.0 / bins, align="edge", color="#4c72b0", edgecolor="white")
            ax.text(edges[b] + 0.5 / bins, min(accuracy + 0.02, 0.97), str(int(members.sum())), ha="center",
                    fontsize=7)
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("calibrated confidence of the call")
    ax.set_ylabel("fraction of calls that were right")
    ax.set_title(f"ECE {ece:.3f}", fontsize=10)
    fig.tight_layout()
    return fig, float(ece)


def map_figure(points: np.ndarray, labels: np.ndarray, method: str):
    from cellmorph.figures import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    names = sorted(set(labels))
    colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    for k, name in enumerate(names):
        members = labels == name
        ax.scatter(points[members, 0], points[members, 1], s=14, color=colours(k % colours.N), label=name, alpha=0.85)
    ax.set_xlabel(f"{method} 1")
    ax.set_ylabel(f"{method} 2")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def tile_rgb(tile: np.ndarray) -> np.ndarray:
    """A uint8 (C, h, w) tile as (h, w, 3): the first three channels as red, green and blue."""
    channels = tile.shape[0]
    if channels >= 3:
        rgb = tile[:3]
    elif channels == 2:
        rgb = np.stack([tile[0], tile[1], np.zeros_like(tile[0])])
    else:
        rgb = np.repeat(tile[:1], 3, axis=0)
    return np.transpose(rgb, (1, 2, 0))


def examples_figure(cache, picks: list[dict]):
    """The example tiles as one montage (a row per MoA: right calls, then mistakes), drawn on a single axis: a grid
    of 72 axes took 9 s to lay out and save for 12 MoAs, this about a second."""
    from cellmorph.figures import pyplot

    plt = pyplot()
    classes = list(dict.fromkeys(p["moa"] for p in picks))
    columns = 2 * EXAMPLES_PER_KIND
    thumbs = [_thumbnail(tile_rgb(t)) for t in cache.tiles(np.array([p["row"] for p in picks]))]
    cell = max(max(t.shape[:2]) for t in thumbs) + 4  # a 4-px white gutter between tiles
    band = 24  # above each row of tiles: the call and its probability
    montage = np.full((len(classes) * (band + cell), columns * cell, 3), 255, np.uint8)
    slots = {c: {"correct": 0, "mistake": EXAMPLES_PER_KIND} for c in classes}
    placed = []
    for pick, thumb in zip(picks, thumbs):
        r = classes.index(pick["moa"])
        c = slots[pick["moa"]][pick["kind"]]
        slots[pick["moa"]][pick["kind"]] += 1
        h, w = thumb.shape[:2]
        top, left = r * (band + cell) + band + (cell - h) // 2, c * cell + (cell - w) // 2
        montage[top:top + h, left:left + w] = thumb
        placed.append((pick, r, c))
    fig, ax = plt.subplots(figsize=(1.6 * columns, 1.75 * len(classes)))
    ax.imshow(montage, interpolation="nearest")
    ax.axis("off")
    for pick, r, c in placed:
        colour = "#1a7f37" if pick["kind"] == "correct" else "#b42318"
        ax.text((c + 0.5) * cell, r * (band + cell) + band, f"{pick['call'][:18]}\n{pick['probability']:.2f}", fontsize=6,
                color=colour, ha="center", va="bottom")
    for r, moa in enumerate(classes):
        ax.text(-4, r * (band + cell) + band + cell / 2, moa[:22], ha="right", va="center", fontsize=7)
    fig.suptitle("left: called right (highest probability) · right: worst mistakes", fontsize=8)
    fig.tight_layout()
    return fig


def _thumbnail(image: np.ndarray, size: int = 96) -> np.ndarray:
    """An (h, w, 3) uint8 image no larger than ``size`` px a side: figures stay small and quick to
    encode (a 224-px tile is drawn about 1.5 cm wide anyway)."""
    from PIL import Image

    if max(image.shape[:2]) <= size:
        return image
    thumb = Image.fromarray(np.ascontiguousarray(image))
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    return np.asarray(thumb)


def gradcam_figure(model, spec, cache, picks: list[dict], classes: list[str], gradcam_overlays):
    from cellmorph.figures import pyplot

    plt = pyplot()
    # One right call per MoA, at most GRADCAM_TILES: a backward pass each, at the network's input size.
    chosen = [p for p in picks if p["kind"] == "correct"]
    chosen = (list({p["moa"]: p for p in reversed(chosen)}.values())[::-1] or picks)[:GRADCAM_TILES]
    tiles = cache.tiles(np.array([p["row"] for p in chosen]))
    overlays = gradcam_overlays(model, tiles, spec, [p["target"] for p in chosen])
    columns = min(6, len(chosen))
    rows = -(-len(chosen) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.8 * columns, 2.0 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, (pick, overlay) in enumerate(zip(chosen, overlays)):
        ax = axes[k // columns, k % columns]
        ax.imshow(_thumbnail(overlay, 160))
        ax.set_title(f"{pick['moa'][:20]}\n→ {pick['call'][:20]}", fontsize=6)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- networks for Grad-CAM
def _cv_network(run: Path, header: dict):
    """The last fold's saved weights (``keep_checkpoints``), rebuilt; its input spec; which fold."""
    from cellmorph.cv.rundir import FOLD_STATE, RunDir
    from cellmorph.models import network_from_weights
    from cellmorph.models.spec import InputSpec

    if (header.get("config") or {}).get("mode") == "linear-probe":
        # Its folds keep a logistic-regression head on ImageNet features, not a network to explain.
        raise CellmorphError("a linear-probe run keeps the ImageNet backbone unchanged and trains no network")
    states = sorted((run / "folds").glob(f"*/{FOLD_STATE}"), key=lambda p: int(p.parent.name))
    if not states:
        raise CellmorphError(f"the run kept no fold weights (cv with {option('keep_checkpoints')} last keeps one fold's)")
    fold = int(states[-1].parent.name)
    record = RunDir(run).fold_state(fold)
    spec = InputSpec.from_record(record["input"])
    model = network_from_weights(record["model_name"], len(record["classes"]), len(spec.mean), record["model"])
    return model, spec, {"fold": fold, "what": f"fold {fold}'s model"}


def _bundle_network(path):
    from cellmorph.bundle import load_bundle

    if not path or not Path(path).exists():
        raise CellmorphError(f"the model bundle {path} is no longer there")
    bundle = load_bundle(Path(path))
    return bundle.network().eval(), bundle.input, {"fold": None, "what": "the bundle's model"}


# --------------------------------------------------------------------------- helpers
def _cache_or_none(path):
    from cellmorph.cache import TileCache

    try:
        return TileCache(Path(path)) if path else None
    except (CellmorphError, OSError, ValueError):
        return None


def _figure(fig, caption: str) -> dict:
    from cellmorph.figures import pyplot

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, dpi=110, format="png", bbox_inches="tight")
    finally:
        pyplot().close(fig)
    return {"src": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(), "caption": caption,
            "alt": caption}


def _png_file(path: Path, caption: str) -> dict:
    if not Path(path).is_file():
        return {"src": "", "caption": f"{caption} (not written: {Path(path).name} is missing)", "alt": caption}
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return {"src": "data:image/png;base64," + data, "caption": caption, "alt": caption}


def _frame_table(frame: pd.DataFrame, sortable: bool, table_id: str | None = None) -> dict:
    rows = [[_short(v) for v in row] for row in frame.itertuples(index=False)]
    return {"columns": [str(c) for c in frame.columns], "rows": rows, "sortable": sortable, "id": table_id}


def _short(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(map(str, value))
    return str(value)  # as written in the data: the template escapes it
