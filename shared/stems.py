"""Which stems a job can ask for and which files it gets back."""
from __future__ import annotations

from .errors import BadRequest

SOURCES = ("drums", "bass", "other", "vocals")
"""The four sources of the 4-stem Demucs models, in the models' own order."""

ALL = "all"
STEM_CHOICES = (ALL,) + SOURCES
"""Values of the `stems` form field."""


def check_stems(stems: str) -> str:
    """Return `stems` if it is one of `STEM_CHOICES`.

    Raises:
        BadRequest: (`invalid_stems`) it is not, naming the choices.
    """
    if stems not in STEM_CHOICES:
        raise BadRequest(f"unknown stems value {stems!r}; expected one of {', '.join(STEM_CHOICES)}",
                         code="invalid_stems")
    return stems


def output_names(stems: str) -> list[str]:
    """Names of the files a job produces: the four sources for `all`, `X` and `no_X` for one.

    Raises:
        BadRequest: `stems` is not one of `STEM_CHOICES`.
    """
    return list(SOURCES) if check_stems(stems) == ALL else [stems, f"no_{stems}"]
