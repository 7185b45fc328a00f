"""cellmorph: mechanism-of-action classification of cell morphology with fine-tuned CNNs.

The public Python API, loaded on first use (PEP 562) so that ``import cellmorph`` stays fast and
imports neither torch nor pandas until a name that needs them is used::

    import cellmorph

    table = cellmorph.load_table("crops", index="crops/index.csv")
    cellmorph.prepare(table, "cache", cellmorph.prepare_config("crops", normalize="batch"))
    result = cellmorph.run_cv("cache", "run", cellmorph.CVConfig(model="tf_efficientnet_lite0", mode="linear-probe"))
"""

from cellmorph.errors import CellmorphError
from cellmorph.lazy import lazy_exports

__version__ = "0.1.0"

# name → the module that owns it
_EXPORTS = {
    "MoAClassifier": "cellmorph.api",
    "load_table": "cellmorph.data.layouts",
    "prepare_config": "cellmorph.data.layouts",
    "PrepareConfig": "cellmorph.config.prepare",
    "prepare": "cellmorph.preprocess",
    "TileCache": "cellmorph.cache",
    "CVConfig": "cellmorph.cv.config",
    "load_cv_config": "cellmorph.cv.config",
    "run_cv": "cellmorph.cv.run",
    "RunDir": "cellmorph.cv.rundir",
    "train_final": "cellmorph.final_model",
    "PredictConfig": "cellmorph.config.predict",
    "predict": "cellmorph.predict",
    "load_bundle": "cellmorph.bundle",
    "EmbedConfig": "cellmorph.config.embed",
    "embed": "cellmorph.embed",
    "aggregate": "cellmorph.metrics",
    "write_report": "cellmorph.report",
    "generate_bbbc021": "cellmorph.data.synthetic",
}

__all__ = ["CellmorphError", "__version__", *sorted(_EXPORTS)]

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
