"""Audio around the model: the mix in at the model's rate and channels, stems out at
the output's, block by block.

The input is read in `BLOCK_FRAMES` blocks, folded to the model's stereo (mono
duplicated, more channels through a matrix) and resampled to the model's rate with
soxr's streaming resampler; `measure_mix` makes the first pass (the mix's length,
mean and deviation, which `demucs.separate` normalises by). On the way out,
`StemOutput` resamples each stem to the output's rate, folds it back to mono where the
input was mono, trims or pads it to the input's exact length and quantizes it;
`MixReader` reads the input again in step with the stems, for `no_X`.
"""
from __future__ import annotations

import dataclasses
import math
import typing as tp
from pathlib import Path

import numpy as np
import soxr
import torch

from demix.audio.io import AudioReader, quantize, read_info

ProgressFn = tp.Callable[[float], None]

RESAMPLE_QUALITY = "VHQ"
"""soxr's very-high-quality setting: resampling error far below 16-bit quantisation."""

MODEL_CHANNELS = 2
"""The models separate stereo; mono input is given to them on both channels."""

BLOCK_FRAMES = 1 << 16
"""Frames read from the input at a time: 65536 (1.5 s at 44.1 kHz)."""


@dataclasses.dataclass(frozen=True)
class MixStats:
    """What the first pass learns about the mix at the model's rate and channel count."""
    length: int  # frames
    mean: float  # of the mono reference (the channels' mean), as `demucs.separate` uses
    std: float  # unbiased, like `torch.std`; 0 for fewer than two frames

    def normalise(self, block: np.ndarray) -> torch.Tensor:
        """A `[frames, channels]` float32 block as the model's normalised `[channels, frames]`."""
        mix = torch.from_numpy(np.ascontiguousarray(block.T))
        return (mix - self._mean) / self._std

    def denormalise(self, estimate: torch.Tensor) -> torch.Tensor:
        return estimate * self._std + self._mean

    @property
    def _mean(self) -> torch.Tensor:
        return torch.tensor(self.mean, dtype=torch.float32)

    @property
    def _std(self) -> torch.Tensor:
        # As demucs: digital silence gives silent stems, not NaN.
        return torch.tensor(self.std, dtype=torch.float32) + 1e-8


def measure_mix(path: Path, model_samplerate: int, matrix: tp.Optional[np.ndarray] = None,
                progress: tp.Optional[ProgressFn] = None,
                on_block: tp.Optional[tp.Callable[[np.ndarray], None]] = None) -> MixStats:
    """Stream the input once at the model's rate for its length, mean and deviation
    (`on_block` sees every model-rate block, e.g. to keep the converted mix).

    Blocks are merged with Chan's parallel variance formula in float64, which stays
    accurate over hours of audio where a running sum of squares would not.
    """
    info = read_info(path)
    expected = max(1, math.ceil(info.frames * model_samplerate / info.samplerate))
    count, mean, squares = 0, 0.0, 0.0  # squares: sum of squared deviations from `mean`
    for block in model_rate_blocks(path, model_samplerate, matrix):
        if on_block is not None:
            on_block(block)
        reference = block.astype(np.float64).mean(axis=1)
        block_mean = float(reference.mean())
        block_squares = float(((reference - block_mean) ** 2).sum())
        total = count + len(reference)
        delta = block_mean - mean
        mean += delta * len(reference) / total
        squares += block_squares + delta ** 2 * count * len(reference) / total
        count = total
        if progress is not None:
            progress(min(1.0, count / expected))
    std = math.sqrt(squares / (count - 1)) if count > 1 else 0.0
    return MixStats(length=count, mean=mean, std=std)


def model_rate_blocks(path: Path, model_samplerate: int,
                       matrix: tp.Optional[np.ndarray] = None) -> tp.Iterator[np.ndarray]:
    """The input as float32 `[frames, 2]` blocks at the model's rate (mono duplicated,
    or folded by `matrix` `[channels, 2]`), the same blocks on every call (so both
    passes agree on the length)."""
    with AudioReader(path) as reader:
        resampler = make_resampler(reader.samplerate, model_samplerate, MODEL_CHANNELS)
        while True:
            block = reader.read(BLOCK_FRAMES)
            last = len(block) < BLOCK_FRAMES
            if matrix is not None:
                block = block @ matrix
            if block.shape[1] == 1:
                block = np.repeat(block, MODEL_CHANNELS, axis=1)
            if resampler is not None:
                block = resampler.resample_chunk(block, last=last)
            if len(block):
                yield block
            if last:
                return


def make_resampler(source_rate: int, target_rate: int, channels: int) -> tp.Optional[soxr.ResampleStream]:
    """A streaming float32 resampler between two rates, or None when they are equal."""
    if source_rate == target_rate:
        return None
    return soxr.ResampleStream(source_rate, target_rate, channels, dtype="float32",
                               quality=RESAMPLE_QUALITY)


class MixReader:
    """The input read in step with the output, for `no_X`: exact-size float32 blocks at
    the output's rate and channels (folded by `matrix` when downmixing)."""

    def __init__(self, path: Path, samplerate: int, matrix: tp.Optional[np.ndarray] = None):
        self._reader = AudioReader(path)
        self._matrix = matrix
        channels = matrix.shape[1] if matrix is not None else self._reader.channels
        self._resampler = make_resampler(self._reader.samplerate, samplerate, channels)
        self._pending = np.zeros((0, channels), dtype=np.float32)
        self._done = False

    def read(self, frames: int) -> np.ndarray:
        """The next `frames` frames; zeros past the end (the stems are padded likewise)."""
        while len(self._pending) < frames and not self._done:
            block = self._reader.read(BLOCK_FRAMES)
            self._done = len(block) < BLOCK_FRAMES
            if self._matrix is not None:
                block = block @ self._matrix
            if self._resampler is not None:
                block = self._resampler.resample_chunk(block, last=self._done)
            self._pending = np.concatenate([self._pending, block.astype(np.float32, copy=False)])
        taken, self._pending = self._pending[:frames], self._pending[frames:]
        if len(taken) < frames:
            taken = np.pad(taken, ((0, frames - len(taken)), (0, 0)))
        return taken

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "MixReader":
        return self

    def __exit__(self, *exc_info: tp.Any) -> None:
        self.close()


class StemOutput:
    """One stem from model-rate float `[frames, 2]` blocks to quantized blocks at the
    input's rate, channel count and exact length."""

    def __init__(self, model_samplerate: int, samplerate: int, channels: int, frames: int,
                 subtype: str):
        self.channels, self.frames, self.subtype = channels, frames, subtype
        self.written = 0
        self._resampler = make_resampler(model_samplerate, samplerate, MODEL_CHANNELS)

    def convert(self, block: np.ndarray, last: bool) -> np.ndarray:
        """The next output samples; with `last`, also the resampler's tail and any
        padding up to the input's length (resampling may be a sample short or long)."""
        block = np.ascontiguousarray(block, dtype=np.float32)
        if self._resampler is not None:
            block = self._resampler.resample_chunk(block, last=last)
        if self.channels == 1:
            # The model saw the mono signal on both channels; fold its stereo estimate back.
            block = block.mean(axis=1, keepdims=True)
        block = block[:self.frames - self.written]
        if last and self.written + len(block) < self.frames:
            block = np.pad(block, ((0, self.frames - self.written - len(block)), (0, 0)))
        self.written += len(block)
        return quantize(block, self.subtype)
