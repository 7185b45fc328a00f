"""Cross-validation: config, splits, the run directory, the fold loop, the probe and replicates.

The names below load on first use (PEP 562), so that ``cellmorph.cv.config``, which the command line reads to
build its options, does not pull in torch and pandas with the fold loop.
"""

from importlib import import_module

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


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cellmorph.cv' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
