"""The demo pipeline behind ``make demo``: synthetic screen → tile cache → compound-held-out CV.

Two CVs on the same folds: the linear probe (frozen ImageNet features, a logistic head per
fold), whose calls come out the same on any CPU because its fit is convex, and the paper's
fine-tune, which float rounding moves within its bootstrap interval (benchmarks/RESULTS.md,
"How far rounding alone moves the demo")::

    from cellmorph.demo import DemoConfig, run_demo
    result = run_demo("runs/demo", DemoConfig(epochs=1))
    result.finetune["treatment_accuracy"], result.probe["treatment_accuracy"]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEMO_MODEL = "tf_efficientnet_lite0"


class DemoConfig(BaseModel):
    """The demo's settings; its defaults are what ``make demo`` runs (about 4 minutes on 2 cores)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0, description="seed of the synthetic screen and of the CV run")
    epochs: int = Field(5, ge=1, description="fine-tuning epochs per fold")
    image_size: int = Field(
        224, ge=16, description="tiles are resized to this for the CNN (the model's own size: tiny's binned "
        "cells are too small for ImageNet filters at 96 px)",
    )
    freeze_stages: int = Field(
        4, ge=0, description="keep the ImageNet stem + first stages fixed (faster, and it generalises better "
        "to held-out compounds)",
    )
    tta: str = Field("dihedral", description="none | dihedral test-time augmentation (fine-tune and probe)")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="fine-tune learning rate: cosine (annealed to 0; 7 of 44 calls moved between 1 and "
        "2 threads against 13 for constant, and it scored higher at both) or constant")
    probe: bool = Field(True, description="also run the linear probe first: its calls do not move with float rounding (a convex fit)")
    frozen_feature_cache: bool = Field(
        True, description="run the frozen stages once per run, not in every fold and epoch (needs freeze_stages > 0)"
    )
    cv: str = Field(
        "group-kfold:4", description="CV scheme; compounds are always held out. 'loco' (24 folds on tiny) is the "
        "paper's and takes several times longer",
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: see cellmorph.runtime)")
    image_format: Literal["tiff", "ome-zarr"] = Field(
        "tiff", description="the synthetic screen as BBBC021 TIFFs + CSVs, or as OME-Zarr 0.5 HCS plates + a plate "
        "map (the same pixels, so the same tiles)")


@dataclass
class DemoResult:
    """The fine-tune's CV metrics (run directory ``out``) and the probe's (``out-probe``; None without it)."""

    finetune: dict
    finetune_dir: Path
    probe: dict | None = None
    probe_dir: Path | None = None


def demo_paths(out: Path) -> tuple[Path, Path]:
    """(synthetic screen, tile cache), beside the run directory ``out``."""
    work = Path(str(out) + "-data")
    return work / "screen", work / "cache"


def probe_dir(out: Path) -> Path:
    """The probe's run directory, beside the fine-tune's ``out``."""
    return Path(str(out) + "-probe")


def run_demo(out: Path, config: DemoConfig | None = None, progress: bool = True, say=print) -> DemoResult:
    """synth tiny → prepare → cv (probe, then fine-tune); rerunning resumes each step."""
    from cellmorph.cv import load_cv_config, run_cv
    from cellmorph.cv.rundir import CONFIG_FILE
    from cellmorph.data.bbbc021 import IMAGE_CSV, load_bbbc021
    from cellmorph.data.synthetic import generate_bbbc021
    from cellmorph.config.prepare import PrepareConfig
    from cellmorph.preprocess import prepare
    from cellmorph.runinfo import require_output_dir

    config = config or DemoConfig()
    out = require_output_dir(Path(out), "run directory")
    probe_out = require_output_dir(probe_dir(out), "probe run directory") if config.probe else None
    steps = 4 if config.probe else 3
    screen, cache = demo_paths(out)
    if config.image_format == "ome-zarr":
        from cellmorph.data.omezarr import load_ome_zarr
        from cellmorph.data.synthetic import generate_ome_zarr_screen

        screen = screen.with_name("plates")
        say(f"1/{steps} synthetic tiny screen, OME-Zarr 0.5 plates + platemap.csv → {screen}")
        if not (screen / "platemap.csv").is_file():
            generate_ome_zarr_screen(screen, preset="tiny", seed=config.seed, progress=progress)
        table = load_ome_zarr([screen], screen / "platemap.csv")
    else:
        say(f"1/{steps} synthetic tiny screen → {screen}")
        if not (screen / IMAGE_CSV).is_file():
            generate_bbbc021(screen, preset="tiny", seed=config.seed, progress=progress)
        table = load_bbbc021(screen, screen)
    say(f"2/{steps} prepare (per-plate DMSO normalisation, Anscombe, 8-bit, 2×2 tiles) → {cache}")
    summary = prepare(table, cache, PrepareConfig(tile_size=config.image_size), progress=progress,
                      threads=config.threads)
    say(f"    {summary['n_tiles']} tiles from {summary['n_images']} images on {summary['n_plates']} plates")
    probe = None
    if probe_out is not None:
        say(f"3/{steps} cv {config.cv}, linear probe: frozen {DEMO_MODEL} (ImageNet, offline) features at "
            f"{config.image_size} px, TTA {config.tta}, a logistic head per fold (C chosen inside it) → {probe_out}")
        cfg = load_cv_config(None, model=DEMO_MODEL, init="imagenet", mode="linear-probe", cv=config.cv,
                             image_size=config.image_size, seed=config.seed, tta=config.tta,
                             num_threads=config.threads)
        probe = run_cv(cache, probe_out, cfg, resume=(probe_out / CONFIG_FILE).is_file(), progress=progress)
    say(f"{steps}/{steps} cv {config.cv}, fine-tune {DEMO_MODEL} (ImageNet, offline), {config.epochs} epochs "
        f"({config.lr_schedule} rate), {config.image_size} px, {config.freeze_stages} frozen stages, TTA {config.tta} "
        f"→ {out}")
    cfg = load_cv_config(None, model=DEMO_MODEL, init="imagenet", epochs=config.epochs, cv=config.cv,
                         image_size=config.image_size, seed=config.seed, freeze_stages=config.freeze_stages,
                         tta=config.tta, num_threads=config.threads, lr_schedule=config.lr_schedule,
                         frozen_feature_cache=config.frozen_feature_cache and config.freeze_stages > 0)
    finetune = run_cv(cache, out, cfg, resume=(out / CONFIG_FILE).is_file(), progress=progress)
    return DemoResult(finetune, out, probe, probe_out)
