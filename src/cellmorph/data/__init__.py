"""Ingestion: every input kind loads into one :class:`~cellmorph.data.table.ImageTable`."""

from cellmorph.data.table import ImageTable

__all__ = ["ImageTable"]
