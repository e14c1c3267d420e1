"""A stem sink that keeps the stems in memory, and the engine run into one, for the engine's tests."""
from __future__ import annotations

import collections
import typing as tp
from pathlib import Path

import numpy as np
from demucs.apply import BagOfModels

from shared.audio import dequantize, read_info
from shared.output import resolve_output
from worker.engine import SeparationOptions, separate_file

class MemorySink:
    """Collects each stem's blocks and records the order of opens, closes and publishes."""

    def __init__(self) -> None:
        self.blocks: dict[str, list[np.ndarray]] = collections.defaultdict(list)
        self.formats: dict[str, tuple[int, int, str, int]] = {}
        self.events: list[tuple[str, str]] = []

    def open_stem(self, name: str, samplerate: int, channels: int, subtype: str,
                  frames: int) -> "MemoryWriter":
        self.formats[name] = (samplerate, channels, subtype, frames)
        self.events.append(("open", name))
        return MemoryWriter(self, name)

    def publish(self, name: str) -> None:
        self.events.append(("publish", name))

    def written(self, name: str) -> int:
        return sum(len(block) for block in self.blocks[name])

    def stem(self, name: str) -> np.ndarray:
        """The stem as a reader of its file would see it (float32)."""
        return dequantize(np.concatenate(self.blocks[name]), self.formats[name][2])


class MemoryWriter:
    def __init__(self, sink: MemorySink, name: str):
        self.sink, self.name = sink, name

    def write(self, samples: np.ndarray) -> None:
        self.sink.blocks[self.name].append(samples)

    def close(self) -> None:
        self.sink.events.append(("close", self.name))


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
