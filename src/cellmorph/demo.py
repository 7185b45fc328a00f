"""The demo pipeline behind ``make demo``: synthetic screen → tile cache → compound-held-out CV.

::

    from cellmorph.demo import DemoConfig, run_demo
    metrics = run_demo("runs/demo", DemoConfig(epochs=1))
"""

from __future__ import annotations

from pathlib import Path

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
    tta: str = Field("dihedral", description="none | dihedral test-time augmentation")
    frozen_feature_cache: bool = Field(
        True, description="run the frozen stages once per run, not in every fold and epoch (needs freeze_stages > 0)"
    )
    cv: str = Field(
        "group-kfold:4", description="CV scheme; compounds are always held out. 'loco' (24 folds on tiny) is the "
        "paper's and takes several times longer",
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: see cellmorph.runtime)")


def demo_paths(out: Path) -> tuple[Path, Path]:
    """(synthetic screen, tile cache), beside the run directory ``out``."""
    work = Path(str(out) + "-data")
    return work / "screen", work / "cache"


def run_demo(out: Path, config: DemoConfig | None = None, progress: bool = True, say=print) -> dict:
    """synth tiny → prepare → cv; returns the CV metrics. Rerunning resumes each step."""
    from cellmorph.cv import load_cv_config, run_cv
    from cellmorph.cv.rundir import CONFIG_FILE
    from cellmorph.data.bbbc021 import IMAGE_CSV, load_bbbc021
    from cellmorph.data.synthetic import generate_bbbc021
    from cellmorph.preprocess import PrepareConfig, prepare
    from cellmorph.runinfo import require_output_dir

    config = config or DemoConfig()
    out = require_output_dir(Path(out), "run directory")
    screen, cache = demo_paths(out)
    say(f"1/3 synthetic tiny screen → {screen}")
    if not (screen / IMAGE_CSV).is_file():
        generate_bbbc021(screen, preset="tiny", seed=config.seed, progress=progress)
    say(f"2/3 prepare (per-plate DMSO normalisation, Anscombe, 8-bit, 2×2 tiles) → {cache}")
    summary = prepare(load_bbbc021(screen, screen), cache, PrepareConfig(tile_size=config.image_size),
                      progress=progress, threads=config.threads)
    say(f"    {summary['n_tiles']} tiles from {summary['n_images']} images on {summary['n_plates']} plates")
    say(f"3/3 cv {config.cv}, {DEMO_MODEL} (ImageNet, offline), {config.epochs} epochs, {config.image_size} px, "
        f"{config.freeze_stages} frozen stages, TTA {config.tta} → {out}")
    cfg = load_cv_config(None, model=DEMO_MODEL, init="imagenet", epochs=config.epochs, cv=config.cv,
                         image_size=config.image_size, seed=config.seed, freeze_stages=config.freeze_stages,
                         tta=config.tta, num_threads=config.threads,
                         frozen_feature_cache=config.frozen_feature_cache and config.freeze_stages > 0)
    return run_cv(cache, out, cfg, resume=(out / CONFIG_FILE).is_file(), progress=progress)
