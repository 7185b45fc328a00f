"""cellmorph: mechanism-of-action classification of cell morphology with fine-tuned CNNs."""

from cellmorph.errors import CellmorphError

__version__ = "0.1.0"

__all__ = ["CellmorphError", "__version__"]
