"""Cross-validation: config, splits, the run directory, the fold loop, the probe and replicates."""

from cellmorph.cv.config import CVConfig, load_cv_config, validate_config
from cellmorph.cv.replicates import compare_inits, run_replicates
from cellmorph.cv.run import plan_run, run_cv
from cellmorph.cv.rundir import RunDir
from cellmorph.cv.splits import Fold, make_folds, parse_cv

__all__ = [
    "CVConfig",
    "Fold",
    "RunDir",
    "compare_inits",
    "load_cv_config",
    "make_folds",
    "parse_cv",
    "plan_run",
    "run_cv",
    "run_replicates",
    "validate_config",
]
