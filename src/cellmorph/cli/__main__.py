"""``python -m cellmorph.cli``: the ``cellmorph`` command."""

from cellmorph.cli import main

main()
