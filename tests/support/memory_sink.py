"""A stem sink that keeps the stems in memory, for the engine's tests."""
from __future__ import annotations

import collections

import numpy as np

from shared.audio import dequantize

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
