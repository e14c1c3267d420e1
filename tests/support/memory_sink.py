"""The engine run into memory (`testkit.memory_sink.MemorySink`) for the split and storage
tests: a whole file in one run, and the largest difference between two runs."""
from __future__ import annotations

import typing as tp
from pathlib import Path

import numpy as np
from demucs.apply import BagOfModels

from demix.audio.io import read_info
from demix.audio.output_formats import resolve_output
from testkit.memory_sink import MemorySink
from demix.separation.engine import SeparationOptions, separate_file


def unsplit_run(model: BagOfModels, path: Path, stems: str, form: tp.Optional[dict] = None) -> MemorySink:
    """The stems of the whole file separated in one run (no parts)."""
    sink = MemorySink()
    output = resolve_output(form or {"sample_format": "float32"}, read_info(path))
    separate_file(model, path, stems, sink, SeparationOptions(), output=output)
    return sink


def max_difference(a: MemorySink, b: MemorySink) -> float:
    """The largest sample difference between the same stems of two runs."""
    assert a.formats == b.formats
    return max(float(np.abs(a.stem(name) - b.stem(name)).max()) for name in a.formats)
