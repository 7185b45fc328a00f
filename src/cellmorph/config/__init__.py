"""Settings records (pydantic, loadable from YAML) that the command line reads to build its options.

They import neither torch nor pandas, so ``cellmorph --help`` and option parsing stay fast; each layer that
acts on a setting imports its record from here (e.g. :mod:`cellmorph.augment` applies
:class:`~cellmorph.config.augment.AugmentConfig`).
"""
