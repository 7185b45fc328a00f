"""``visualize filters``: what the network looks at."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cellmorph.cli.common import (
    THREADS_HELP,
    app,
    user_errors,
)

# The settings records are light (no torch or pandas): options and their help are built from them at
# import time, and the commands import the modules that do the work when they run (start-up time).
from cellmorph.config.visualize import FilterConfig
from cellmorph.errors import validated

# ----------------------------------------------------------------------------- visualize
visualize_app = typer.Typer(help="What the network looks at: filter images of the ImageNet and the fine-tuned "
                            "network (the paper's Fig. 5).", no_args_is_help=True, pretty_exceptions_enable=False,
                            add_completion=False)


def _visualize_help(name: str) -> str:
    return FilterConfig.model_fields[name].description or ""


@visualize_app.command("filters")
@user_errors
def visualize_filters_command(
    out: Path = typer.Option(..., help="folder for the PNGs (one per layer) and filters.json"),
    run: Optional[Path] = typer.Option(None, help="a cv run directory with fold weights (kept by cv's default, --keep-checkpoints last)"),
    model: Optional[Path] = typer.Option(None, help="a model bundle (cellmorph train)"),
    layers: str = typer.Option("stage1,stage2,stage3", help=_visualize_help("layers")),
    filters: int = typer.Option(6, help=_visualize_help("filters")),
    steps: int = typer.Option(128, help=_visualize_help("steps")),
    size: int = typer.Option(128, help=_visualize_help("size")),
    seed: int = typer.Option(0, help=_visualize_help("seed")),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Images that maximise chosen filters of the ImageNet network and of the fine-tuned one, side by side."""
    from cellmorph.visualize import visualize_filters

    config = validated(FilterConfig, dict(layers=layers, filters=filters, steps=steps, size=size, seed=seed,
                                          threads=threads), "visualize options")
    print(json.dumps(visualize_filters(out, config, run=run, model=model)))


app.add_typer(visualize_app, name="visualize")
