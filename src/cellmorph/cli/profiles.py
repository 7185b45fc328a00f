"""``embed``, ``profile-eval`` and ``score-treatments``: profiles and their evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cellmorph.cli.common import (
    Metric,
    ProfileAggregate,
    Standardize,
    Whiten,
    ImageInput,
    log_line,
    command,
    input_options,
    shared_options,
)
from cellmorph.cli.options import config_options

# The settings records are light (no torch or pandas): options and their help are built from them at
# import time, and the commands import the modules that do the work when they run (start-up time).
from cellmorph.config.embed import EmbedConfig
from cellmorph.config.features import FeatureSpec
from cellmorph.errors import CellmorphError, validated


# Every embed setting as an option, from EmbedConfig's fields (cellmorph.cli.options).
EMBED_SETTINGS = config_options(EmbedConfig, types_={"weights": Path, "features": str},
                                parsers={"weights": str, "features": FeatureSpec.parse})


# ----------------------------------------------------------------------------- embed / profiles


@command()
@input_options("input layout of raw images, prepared with the layout's defaults into OUT/cache first (instead of "
               "--data); labels are optional")
@shared_options(EMBED_SETTINGS.options, "options")
def embed(
    data: Optional[Path] = typer.Option(None, help="tile cache from `cellmorph prepare` (or give the images: "
                                        "--layout with --root, --index or --layout-config)"),
    out: Optional[Path] = typer.Option(None, help="output folder (default: DATA/embeddings/MODEL)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    options: dict | None = None,
    images: ImageInput | None = None,
) -> None:
    """Frozen-backbone embeddings per tile, aggregated to wells (pycytominer-style parquet)."""
    from cellmorph.embed import embed as run_embed
    from cellmorph.runtime import keep_freed_memory

    config = validated(EmbedConfig, EMBED_SETTINGS.settings(options), "embed options")
    if (data is None) == (images.layout is None):
        raise CellmorphError("embed needs the screen as one of: --data CACHE, or --layout with --root/--index/"
                             "--layout-config (then --out)")
    if data is None and out is None:
        raise CellmorphError("embed --layout needs --out: the images are prepared into OUT/cache")
    keep_freed_memory()  # a short-lived scoring process: about 2x faster on glibc (see runtime)
    if data is None:
        from cellmorph.data.layouts import prepare_config
        from cellmorph.preprocess import prepare

        data = Path(out) / "cache"
        prepare(images.load(require_labels=False), data, prepare_config(images.layout), progress=progress,
                log=log_line, threads=config.threads)
    target = out or Path(data) / "embeddings" / config.model
    summary = run_embed(data, target, config, progress, log=log_line)
    print(json.dumps(summary | {"out": str(target)}))


@command("profile-eval")
def profile_eval(
    profiles: Path = typer.Argument(..., help="per-well profiles: CellProfiler CSV or a cellmorph wells.parquet"),
    out: Path = typer.Option(..., help="output folder"),
    metadata: Optional[Path] = typer.Option(None, help="BBBC021 metadata folder (labels for CellProfiler CSVs)"),
    standardize: Standardize = typer.Option("plate", help="z-score features to the DMSO wells of each "
                                            "plate, batch or of all plates (a plate without DMSO: its batch's)"),
    whiten: Whiten = typer.Option("none", help="then whiten on DMSO: spherize (ZCA), tvn (PCA whitening) or "
                                  "coral (per-batch DMSO covariance aligned)"),
    strength: Optional[float] = typer.Option(None, help="whitening regulariser: ridge for spherize/coral (default "
                                             "10), components for tvn (default 100)"),
    aggregate: ProfileAggregate = typer.Option("mean", help="treatment profile = mean or median of its wells"),
    metric: Metric = typer.Option("correlation", help="1-NN similarity (and the mAP's)"),
    mean_ap: Optional[bool] = typer.Option(None, "--map/--no-map", help="copairs mean average precision too: "
                                           "replicate retrieval against DMSO wells, MoA retrieval across compounds "
                                           "(default: where copairs is installed)"),
) -> None:
    """NSC / NSCB nearest-neighbour MoA matching of treatment profiles (NSCB leaves out MoAs of one batch),
    and copairs mAP of replicate and MoA retrieval."""
    from cellmorph.profiles import profile_eval as run_profile_eval
    from cellmorph.retrieval import headline

    metrics = run_profile_eval(profiles, out, metadata, standardize, aggregate, metric,
                               whiten, strength, log=log_line, mean_ap=mean_ap)
    print(json.dumps({k: metrics[k] for k in ("nsc_accuracy", "nscb_accuracy", "n_treatments")}
                     | headline(metrics.get("map"))))


@command("score-treatments")
def score_treatments_cmd(
    predictions: Path = typer.Argument(..., help="stored per-treatment probabilities (.xlsx sheet per model, or CSV)"),
    moa: Path = typer.Option(..., help="compound,concentration,moa table (BBBC021_v1_moa.csv)"),
) -> None:
    """Treatment accuracy of stored predictions, scored by the same code as `cellmorph cv`."""
    from cellmorph.stored import score_stored_predictions

    print(json.dumps(score_stored_predictions(predictions, moa)))
