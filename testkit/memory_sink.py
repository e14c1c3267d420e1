"""The engine's stems kept in memory: a stem sink for `demix.separation.engine.separate_file`, a
run into one, and how close two runs' stems are (SNR), for the tests and the benches."""
from __future__ import annotations

import collections
import typing as tp
from pathlib import Path

import numpy as np

from demix.audio.io import dequantize


class MemorySink:
    """Collects each stem's blocks (as written: quantized to the output's subtype) and
    records the order of opens, closes and publishes."""

    def __init__(self) -> None:
        self.blocks: dict[str, list[np.ndarray]] = collections.defaultdict(list)
        self.formats: dict[str, tuple[int, int, str, int]] = {}
        """Each stem's (samplerate, channels, subtype, frames), in the order opened."""
        self.events: list[tuple[str, str]] = []

    def open_stem(self, name: str, samplerate: int, channels: int, subtype: str,
                  frames: int) -> "MemoryWriter":
        self.formats[name] = (samplerate, channels, subtype, frames)
        self.events.append(("open", name))
        return MemoryWriter(self, name)

    def publish(self, name: str) -> None:
        self.events.append(("publish", name))

    @property
    def published(self) -> list[str]:
        return [name for event, name in self.events if event == "publish"]

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


def separate(model: tp.Any, path: Path, stems: str = "all", **options: tp.Any) -> MemorySink:
    """`separate_file` of `path` into memory, with `SeparationOptions(**options)`."""
    from demix.separation.engine import SeparationOptions, separate_file

    sink = MemorySink()
    separate_file(model, path, stems, sink, SeparationOptions(**options))
    return sink


def snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    """How far `other` is from `reference`, in dB (higher: closer; identical: about 300)."""
    return float(10 * np.log10(np.sum(reference ** 2) / max(np.sum((other - reference) ** 2), 1e-30)))


def stems_snr_db(reference: MemorySink, other: MemorySink) -> dict[str, float]:
    """`snr_db` of each of `reference`'s stems against the same stem of `other`."""
    return {name: snr_db(reference.stem(name), other.stem(name)) for name in reference.formats}
