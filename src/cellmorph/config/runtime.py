"""Bounds of the runtime settings, shared by the configs and :mod:`cellmorph.runtime` (which applies them)."""

# A bound far above any machine's cores: torch keeps the count in a C int, so a larger one
# overflows instead of failing with a message.
MAX_THREADS = 4096
