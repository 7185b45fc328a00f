"""The ``cellmorph`` command line: a thin skin over the public Python API, one module per command group.

Every user-caused failure surfaces as :class:`~cellmorph.errors.CellmorphError` and is printed as one
``error: ...`` line on stderr with exit code 2 (:func:`cellmorph.cli.common.user_errors`). The options are
built from the settings records (:mod:`cellmorph.config`, :mod:`cellmorph.cv.config`), which load neither
torch nor pandas; each command imports the modules that do its work when it runs, so ``--help`` is fast.
"""

# isort: off
# Each module registers its commands; `cellmorph --help` lists them in this order (data flows this way).
from cellmorph.cli import data, cv, predict, profiles, visualize  # noqa: F401
# isort: on
from cellmorph.cli.common import app
from cellmorph.cli.weights import weights_app

app.add_typer(weights_app, name="weights", help="Offline-first ImageNet weights: list, verify, import.")


def main() -> None:
    """Console entry point (standalone click handling of usage errors, --help and exit codes)."""
    app()


__all__ = ["app", "main"]
