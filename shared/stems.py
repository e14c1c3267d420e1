"""Which stems a job can ask for and which files it gets back."""
from __future__ import annotations

SOURCES = ("drums", "bass", "other", "vocals")
"""The four sources of the 4-stem Demucs models, in the models' own order."""

ALL = "all"
STEM_CHOICES = (ALL,) + SOURCES
"""Values of the `stems` form field."""


def output_names(stems: str) -> list[str]:
    """Names of the files a job produces: the four sources for `all`, `X` and `no_X` for one.

    Raises:
        ValueError: `stems` is not one of `STEM_CHOICES`.
    """
    if stems == ALL:
        return list(SOURCES)
    if stems in SOURCES:
        return [stems, f"no_{stems}"]
    raise ValueError(f"unknown stems value {stems!r}; expected one of {', '.join(STEM_CHOICES)}")
