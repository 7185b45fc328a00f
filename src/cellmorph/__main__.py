"""``python -m cellmorph``: the ``cellmorph`` command, for environments whose scripts folder is not on PATH."""

from cellmorph.cli import main

main()
