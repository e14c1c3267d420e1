"""Ensembling one source across several models' outputs, as MSST's `ensemble.py` does,
streamed block by block.

The eight algorithms are those of Music-Source-Separation-Training's
`average_waveforms`: `avg_wave`, `median_wave`, `min_wave` and `max_wave` combine the
samples themselves; `avg_fft`, `median_fft`, `min_fft` and `max_fft` combine the
spectrograms (librosa's centred STFT: n_fft 2048, hop 1024, periodic Hann, zero
padding) and invert the result (librosa's `istft`: overlap-add normalised by the summed
squared window, cut to the input's length). `avg_*` is the weighted mean (`weights`
default to equal); `median_*` is `np.median` across the models (for complex values:
NumPy's order, real part then imaginary); `min_*`/`max_*` keep, per sample or per
time-frequency bin, the value of smallest/largest magnitude (the first model's on a
tie). As in MSST, the weights count only for the `avg_*` algorithms.

MSST refuses inputs of unequal length (its `np.array` of the tracks fails): so does
this module, with the lengths in the message, and likewise for unequal channel counts
or sample rates.

Nothing holds a whole track: the sample-wise algorithms work on `block_frames`
samples at a time. An STFT frame `k` covers input samples `[HOP*(k-1), HOP*(k+1))`
(the signal is centred by `N_FFT // 2` zeros on each side), so a block of frames needs
only the samples under it plus one hop carried over, and once its frames are
overlap-added, every output sample before the next block's first frame is final; the
next block takes over the one hop of partial sums. Computed in float64, each block's
output equals the whole-array computation to float rounding, wherever the block
boundaries fall.
"""
from __future__ import annotations

import math
import typing as tp
from pathlib import Path

import numpy as np

from demix.atomic_files import atomic_path
from demix.audio.io import AudioReader, AudioWriter
from demix.errors import BadRequest

ProgressFn = tp.Callable[[float], None]

ALGORITHMS = ("avg_wave", "median_wave", "min_wave", "max_wave",
              "avg_fft", "median_fft", "min_fft", "max_fft")
"""MSST's ensemble types, by the names its `--type` takes."""

N_FFT = 2048
"""STFT frame length in samples, as MSST's `stft(wave, nfft=2048, hl=1024)`."""

HOP = 1024
"""STFT hop in samples; N_FFT is exactly two hops, so a sample lies under at most two frames."""

BLOCK_FRAMES = 1 << 16
"""Samples per channel processed at a time: 65536 (1.5 s at 44.1 kHz); the FFT algorithms
round it down to whole hops (at least one)."""

OUTPUT_SUBTYPE = "FLOAT"
"""The output's sample format: float32, as MSST writes its ensemble (`sf.write(..., 'FLOAT')`)."""

_WINDOW = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)
# The periodic Hann window, librosa's `get_window('hann', N_FFT)`; its squares are
# overlap-added like librosa's `window_sumsquare` to normalise the inverse.
_WINDOW_SQUARED = _WINDOW ** 2
_TINY = np.finfo(np.float64).tiny  # librosa's `util.tiny`: below it the squared window counts as 0


def check_algorithm(name: str) -> str:
    """`name` if it is one of `ALGORITHMS`, else `BadRequest` listing them."""
    if name not in ALGORITHMS:
        raise BadRequest(f"unknown ensemble algorithm {name!r}: use one of {', '.join(ALGORITHMS)}")
    return name


def check_weights(weights: tp.Optional[tp.Sequence[float]], count: int) -> np.ndarray:
    """One float64 weight per input (all 1 when `weights` is None).

    Raises `BadRequest` for a count other than `count`, a weight that is negative or not finite, or
    weights that add up to 0 (the weighted mean would divide by it).
    """
    if weights is None:
        return np.ones(count)
    values = np.asarray(list(weights), dtype=np.float64)
    if values.ndim != 1 or len(values) != count:
        raise BadRequest(f"ensemble weights: {len(values)} given for {count} inputs; give one per input")
    if not np.all(np.isfinite(values)) or np.any(values < 0) or values.sum() <= 0:
        raise BadRequest(f"ensemble weights must be finite, non-negative and not all 0; got {values.tolist()}")
    return values


def ensemble_arrays(waves: tp.Sequence[np.ndarray], algorithm: str,
                    weights: tp.Optional[tp.Sequence[float]] = None, *,
                    block_frames: int = BLOCK_FRAMES) -> np.ndarray:
    """The ensemble of `waves` (each `[channels, frames]`, all the same shape) as float64
    `[channels, frames]`, computed block by block exactly as `ensemble_files` does.

    Raises `BadRequest` for an unknown algorithm, bad weights or unequal shapes.
    """
    algorithm = check_algorithm(algorithm)
    if not waves:
        raise BadRequest("an ensemble needs at least one input")
    shapes = [np.shape(wave) for wave in waves]
    if any(len(shape) != 2 for shape in shapes):
        raise BadRequest(f"ensemble inputs must be [channels, frames] arrays; got shapes {shapes}")
    _check_same("lengths (frames)", [shape[1] for shape in shapes])
    _check_same("channel counts", [shape[0] for shape in shapes])
    weights = check_weights(weights, len(waves))
    channels, length = shapes[0]
    position = 0

    def read(frames: int) -> list[np.ndarray]:
        nonlocal position
        start, position = position, position + frames
        return [np.asarray(wave[:, start:position]).T for wave in waves]

    blocks = list(_ensemble_blocks(read, length, channels, algorithm, weights, block_frames))
    return np.concatenate(blocks, axis=0).T if blocks else np.zeros((channels, 0))


def ensemble_files(inputs: tp.Sequence[Path], output: Path, algorithm: str,
                   weights: tp.Optional[tp.Sequence[float]] = None, *,
                   block_frames: int = BLOCK_FRAMES, progress: tp.Optional[ProgressFn] = None) -> None:
    """Write the ensemble of the sound files `inputs` to `output` as a float32 WAV (RF64
    past 4 GiB), reading and writing `block_frames` at a time. The file appears whole
    or not at all (`demix.atomic_files`).

    `progress` gets the fraction of the output written (0..1) after each block.
    Raises `BadRequest` for an unknown algorithm, bad weights, or inputs that differ in
    length, channel count or sample rate.
    """
    algorithm = check_algorithm(algorithm)
    if not inputs:
        raise BadRequest("an ensemble needs at least one input")
    weights = check_weights(weights, len(inputs))
    readers: list[AudioReader] = []
    try:
        for path in inputs:
            readers.append(AudioReader(Path(path)))
        _check_same("lengths (frames)", [reader.frames for reader in readers])
        _check_same("channel counts", [reader.channels for reader in readers])
        _check_same("sample rates", [reader.samplerate for reader in readers])
        first = readers[0]

        def read(frames: int) -> list[np.ndarray]:
            return [reader.read(frames) for reader in readers]

        written = 0
        with atomic_path(Path(output)) as temporary, \
                AudioWriter(temporary, first.samplerate, first.channels, OUTPUT_SUBTYPE,
                            frames=first.frames) as writer:
            for block in _ensemble_blocks(read, first.frames, first.channels, algorithm, weights,
                                          block_frames):
                writer.write(block.astype(np.float32))
                written += len(block)
                if progress is not None:
                    progress(written / first.frames)
        if progress is not None and not first.frames:
            progress(1.0)
    finally:
        for reader in readers:
            reader.close()


def _check_same(what: str, values: list[int]) -> None:
    if len(set(values)) > 1:
        raise BadRequest(f"ensemble inputs must all have the same {what}; got {values}")


ReadFn = tp.Callable[[int], list[np.ndarray]]
"""The next `frames` samples of every input, each `[frames, channels]` (fewer at the end)."""


def _ensemble_blocks(read: ReadFn, length: int, channels: int, algorithm: str, weights: np.ndarray,
                     block_frames: int) -> tp.Iterator[np.ndarray]:
    """The ensemble as consecutive float64 `[frames, channels]` blocks, `length` frames in all."""
    block_frames = max(1, block_frames)
    if algorithm.endswith("_wave"):
        for start in range(0, length, block_frames):
            inputs = read(min(block_frames, length - start))
            yield _combine(np.stack(inputs).astype(np.float64), algorithm, weights)
        return
    yield from _spectral_blocks(read, length, channels, algorithm, weights, max(1, block_frames // HOP))


def _spectral_blocks(read: ReadFn, length: int, channels: int, algorithm: str, weights: np.ndarray,
                     frames_per_block: int) -> tp.Iterator[np.ndarray]:
    """The `*_fft` ensemble, `frames_per_block` STFT frames at a time.

    Positions below are in the centred (padded) signal, where input sample `t` sits at
    `t + HOP` and frame `k` spans `[HOP*k, HOP*k + N_FFT)`. A block of frames `[k0, k1)`
    reads input up to `HOP*k1` (zeros past the end) and finishes every position before
    `HOP*k1`; the hop after that is carried over as partial sums.
    """
    frame_count = 1 + length // HOP  # librosa's frames for a centred signal
    inputs_tail: tp.Optional[list[np.ndarray]] = None  # the last hop read: the next block's first
    sums = np.zeros((HOP, channels))  # overlap-add of windowed frames over the carried hop
    norms = np.zeros(HOP)  # overlap-add of the squared window there
    for first in range(0, frame_count, frames_per_block):
        count = min(frames_per_block, frame_count - first)
        fresh = [_padded(block, count * HOP) for block in read(count * HOP)]
        if inputs_tail is None:  # the centring zeros before the signal
            inputs_tail = [np.zeros((HOP, channels)) for _ in fresh]
        spans = [np.concatenate([tail, block]) for tail, block in zip(inputs_tail, fresh)]
        inputs_tail = [span[-HOP:].copy() for span in spans]
        # [models, frames, channels, N_FFT] frames of the span, each starting a hop after the last
        frames = np.stack([np.lib.stride_tricks.sliding_window_view(span, N_FFT, axis=0)[::HOP]
                           for span in spans])
        spectra = np.fft.rfft(frames * _WINDOW, axis=-1)
        combined = _combine(spectra, algorithm, weights)
        windowed = np.fft.irfft(combined, n=N_FFT, axis=-1) * _WINDOW  # [frames, channels, N_FFT]

        # Hop rows of this block's positions: frame i adds its first half to row i and its
        # second half to row i + 1.
        rows = np.zeros((count + 1, HOP, channels))
        rows[0] += sums
        rows[:count] += windowed[..., :HOP].transpose(0, 2, 1)
        rows[1:] += windowed[..., HOP:].transpose(0, 2, 1)
        row_norms = np.zeros((count + 1, HOP))
        row_norms[0] += norms
        row_norms[:count] += _WINDOW_SQUARED[:HOP]
        row_norms[1:] += _WINDOW_SQUARED[HOP:]
        sums, norms = rows[count].copy(), row_norms[count].copy()

        last = first + count == frame_count
        done_rows = count + 1 if last else count
        signal = rows[:done_rows].reshape(-1, channels)
        norm = row_norms[:done_rows].reshape(-1, 1)
        signal = signal / np.where(norm > _TINY, norm, 1.0)  # as librosa: only where the window is
        # Row 0 of this block is at position HOP*first, i.e. input sample HOP*(first - 1).
        start = HOP * (first - 1)
        keep_from = max(0, -start)
        keep_to = min(len(signal), length - start)
        if keep_to > keep_from:
            yield signal[keep_from:keep_to]


def _padded(block: np.ndarray, frames: int) -> np.ndarray:
    """`[frames, channels]` `block` as float64, zero-padded to `frames` (reads past the end
    come back short)."""
    return np.pad(block.astype(np.float64), ((0, frames - len(block)), (0, 0)))


def _combine(values: np.ndarray, algorithm: str, weights: np.ndarray) -> np.ndarray:
    """Combine `values` `[models, ...]` (samples or spectra) across the first axis."""
    kind = algorithm.split("_")[0]
    if kind == "avg":
        # MSST sums the weighted tracks, then divides by the weights' sum.
        weighted = values * weights.reshape((-1,) + (1,) * (values.ndim - 1))
        return weighted.sum(axis=0) / weights.sum()
    if kind == "median":
        return np.median(values, axis=0)
    magnitudes = np.abs(values)
    chosen = magnitudes.argmin(axis=0) if kind == "min" else magnitudes.argmax(axis=0)
    return np.take_along_axis(values, chosen[None], axis=0)[0]
