"""Which stems a job can ask for and which files it gets back, for any model's sources."""
from __future__ import annotations

import typing as tp

from demix.errors import BadRequest, shown

SOURCES = ("drums", "bass", "other", "vocals")
"""The four sources of the 4-stem Demucs models, in the models' own order."""

ALL = "all"
STEM_CHOICES = (ALL,) + SOURCES
"""Values of the `stems` form field for a 4-stem model (the default `htdemucs`)."""


def stem_choices(sources: tp.Sequence[str] = SOURCES) -> tuple[str, ...]:
    """The `stems` values a model with these `sources` offers: `all` and each source."""
    return (ALL,) + tuple(sources)


def check_stems(stems: str, sources: tp.Sequence[str] = SOURCES, model: str = "") -> str:
    """Return `stems` if a model with `sources` (named `model`, for the message) offers it.

    Raises:
        BadRequest: (`invalid_stems`) it does not, naming what the model offers.
    """
    choices = stem_choices(sources)
    if stems not in choices:
        whose = f"model {model!r} offers" if model else "expected one of"
        raise BadRequest(f"unknown stems value {shown(stems)}; {whose} {', '.join(choices)}",
                         code="invalid_stems")
    return stems


def output_names(stems: str, sources: tp.Sequence[str] = SOURCES) -> list[str]:
    """Names of the files a job produces: every source for `all` (a one-source model: it
    and its complement), `X` and `no_X` (the input minus `X`) for one source `X`.

    Raises:
        BadRequest: `stems` is not one of `stem_choices(sources)`.
    """
    if check_stems(stems, sources) != ALL:
        return [stems, f"no_{stems}"]
    return list(sources) if len(sources) > 1 else [sources[0], f"no_{sources[0]}"]
