"""Cross-validation: config, splits, the run directory, the fold loop, the probe and replicates.

The names below load on first use (PEP 562), so that ``cellmorph.cv.config``, which the command line reads to
build its options, does not pull in torch and pandas with the fold loop.
"""

from cellmorph.lazy import lazy_exports

_EXPORTS = {
    "CVConfig": "cellmorph.cv.config",
    "load_cv_config": "cellmorph.cv.config",
    "validate_config": "cellmorph.cv.config",
    "compare_inits": "cellmorph.cv.replicates",
    "run_replicates": "cellmorph.cv.replicates",
    "plan_run": "cellmorph.cv.run",
    "run_cv": "cellmorph.cv.run",
    "RunDir": "cellmorph.cv.rundir",
    "Fold": "cellmorph.cv.splits",
    "make_folds": "cellmorph.cv.splits",
    "parse_cv": "cellmorph.config.scheme",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
