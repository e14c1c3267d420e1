"""The separation engine: a WAV file in, stems out through a sink, in flat memory.

It follows `demucs.separate` where that matters for the output: the mix is normalised
by the mean and standard deviation of its mono reference, run through the model as
`demucs.apply.apply_model` would (segments overlapping by `overlap`, triangular
cross-fades, the shift trick; see `worker.streaming`), and de-normalised. Around it,
the engine converts the input to the model's 44.1 kHz stereo and every stem back to
the input's rate, channel count and length.

Nothing holds the whole track: the input is streamed twice (once for its mean and
standard deviation, once through the model) and, for one stem `X`, a third time in
step with the output to write `no_X`. Stems are written block by block as soon as no
later segment changes them.
"""
from __future__ import annotations

import dataclasses
import math
import tempfile
import typing as tp
import warnings
from pathlib import Path

import numpy as np
import soxr
import torch

from shared.audio import AudioReader, AudioWriter, dequantize, quantize, read_info
from shared.errors import SeparationFailed
from shared.job_request import default_output
from shared.output import OutputOptions
from shared.stems import output_names

from .channels import channel_groups, downmix_matrix
from .streaming import StreamingSeparator

ProgressFn = tp.Callable[[float], None]

RESAMPLE_QUALITY = "VHQ"
"""soxr's very-high-quality setting: resampling error far below 16-bit quantisation."""

MODEL_CHANNELS = 2
"""The models separate stereo; mono input is given to them on both channels."""

BLOCK_FRAMES = 1 << 16
"""Frames read from the input at a time: 65536 (1.5 s at 44.1 kHz)."""

STATS_SHARE = 0.05
"""Share of a job's progress spent on the first pass (the mix's mean and deviation)."""

MODEL_SHARE = 0.94
"""Share spent running the model; what is left is closing and publishing the stems."""

GROUPS_SHARE = 0.97
"""With more than two channels: share spent separating the channel groups; the rest is
interleaving their stems."""

PRECISIONS = ("fp32", "bf16", "fp16")
"""fp32 reproduces apply_model; bf16 (CPU or CUDA) and fp16 (CUDA) run under autocast."""

CUDA_BATCH_SEGMENTS = 4
"""Segments per forward on a GPU when not set (on CPU, batching only costs memory)."""


@dataclasses.dataclass(frozen=True)
class SeparationOptions:
    """How to run the model."""
    shifts: int = 0  # random-shift passes averaged; 0 = one deterministic pass
    overlap: float = 0.25  # overlap between segments, fraction of a segment
    device: str = "cpu"
    seed: int = 0  # seeds the shifts, so a job's output is reproducible
    precision: str = "fp32"  # one of PRECISIONS
    batch_segments: int = 0  # segments stacked into one forward; 0 = 1 on CPU, 4 on CUDA


class StemWriter(tp.Protocol):
    """One stem's file being written: quantized `[frames, channels]` blocks in order."""

    def write(self, samples: np.ndarray) -> None: ...

    def close(self) -> None: ...


class StemSink(tp.Protocol):
    """Where stems go: opened, written block by block, closed, then published."""

    def open_stem(self, name: str, samplerate: int, channels: int, subtype: str,
                  frames: int) -> StemWriter:
        """Start stem `name` (`frames` is its final length, e.g. to pick the container)."""
        ...

    def publish(self, name: str) -> None:
        """Make the closed, complete stem `name` visible."""
        ...


def separate_file(model: torch.nn.Module, input_path: Path, stems: str, sink: StemSink,
                  options: SeparationOptions = SeparationOptions(),
                  progress: tp.Optional[ProgressFn] = None,
                  output: tp.Optional[OutputOptions] = None) -> list[str]:
    """Separate the WAV at `input_path` and write each requested stem through `sink`.

    For `stems="all"` these are the model's sources. For one source `X` they are `X`
    and `no_X = input - X`, computed on the output's sample grid so that `X + no_X`
    reproduces the input (exactly, for PCM inputs without clipping). `output` sets the
    stems' rate, channels (the input's, or its stereo downmix) and sample grid; by
    default they are the input's own. Stems are published only once all of them are
    complete. Returns the names written, in order.

    Raises:
        SeparationFailed: the model has no such source.
    """
    report = progress or (lambda _value: None)
    names = output_names(stems)
    sources = [name for name in names if not name.startswith("no_")]
    missing = [name for name in sources if name not in model.sources]
    if missing:
        raise SeparationFailed(f"model has no source {missing[0]!r}; it separates "
                               f"{', '.join(model.sources)}", code="unknown_source")
    info = read_info(input_path)
    output = output or default_output(info)
    frames = info.frames if output.samplerate == info.samplerate \
        else round(info.frames * output.samplerate / info.samplerate)
    model.to(options.device)  # a no-op for a model already resident there
    if output.channel_mode == "stereo" and info.channels != 2:
        # The model, and `no_X`, see the stereo downmix instead of the input.
        _separate_channels(model, input_path, names, sources, sink, options, report, output, frames,
                           MODEL_CHANNELS, downmix_matrix(info.channels))
    elif info.channels <= MODEL_CHANNELS:
        _separate_channels(model, input_path, names, sources, sink, options, report, output, frames,
                           info.channels)
    else:
        _separate_by_pairs(model, input_path, names, sources, sink, options, report, output, frames,
                           info.channels)
    for name in names:
        sink.publish(name)
    report(1.0)
    return names


def _separate_channels(model: torch.nn.Module, input_path: Path, names: list[str], sources: list[str],
                       sink: StemSink, options: SeparationOptions, report: ProgressFn,
                       output: OutputOptions, frames: int, channels: int,
                       matrix: tp.Optional[np.ndarray] = None) -> None:
    """Separate the input's `channels` (or `input @ matrix`, with `channels` columns; at
    most two) into closed, unpublished stems in `sink`."""
    subtype = output.grid_subtype
    stats = measure_mix(input_path, model.samplerate, matrix,
                        progress=lambda value: report(STATS_SHARE * value))
    windows_done = 0

    def count_windows(count: int) -> None:
        nonlocal windows_done
        windows_done += count
        report(STATS_SHARE + MODEL_SHARE * windows_done / max(1, separator.window_count))

    separator = StreamingSeparator(
        model, stats.length, sources, shifts=options.shifts, overlap=options.overlap,
        seed=options.seed, batch_segments=batch_segments(options), device=options.device,
        forward=ModelForward(options.device, options.precision), on_windows=count_windows)
    outputs = {name: _StemOutput(model.samplerate, output.samplerate, channels, frames, subtype)
               for name in sources}
    writers: dict[str, StemWriter] = {}
    try:
        for name in names:
            writers[name] = sink.open_stem(name, output.samplerate, channels, subtype, frames)
        blocks = _model_rate_blocks(input_path, model.samplerate, matrix)
        estimates = separator.run(stats.normalise(block) for block in blocks)
        with _MixReader(input_path, output.samplerate, matrix) as original:
            for estimate in estimates:
                _write_block(stats.denormalise(estimate), outputs, writers, original)
            _write_block(torch.zeros(len(sources), MODEL_CHANNELS, 0), outputs, writers, original,
                         last=True)
    finally:
        for writer in writers.values():
            writer.close()


def _separate_by_pairs(model: torch.nn.Module, input_path: Path, names: list[str], sources: list[str],
                       sink: StemSink, options: SeparationOptions, report: ProgressFn,
                       output: OutputOptions, frames: int, channels: int) -> None:
    """More than two channels: separate each channel pair (and a last odd channel) as its
    own track, then interleave the groups' stems back into the input's channel order."""
    groups = channel_groups(channels)
    subtype = output.grid_subtype
    # Group stems wait beside the input (the job's folder: room for long tracks), not in /tmp.
    with tempfile.TemporaryDirectory(dir=input_path.parent, prefix=".groups-") as scratch:
        folders = []
        for index, group in enumerate(groups):
            selection = np.zeros((channels, len(group)), dtype=np.float32)
            selection[group, range(len(group))] = 1.0
            folder = Path(scratch) / str(index)
            folder.mkdir()
            folders.append(folder)
            _separate_channels(model, input_path, names, sources, _FolderSink(folder), options,
                               lambda value, i=index: report(GROUPS_SHARE * (i + value) / len(groups)),
                               output, frames, len(group), selection)
        writers: dict[str, StemWriter] = {}
        try:
            for name in names:
                writers[name] = sink.open_stem(name, output.samplerate, channels, subtype, frames)
                readers = [AudioReader(folder / f"{name}.wav") for folder in folders]
                try:
                    while True:
                        blocks = [reader.read(BLOCK_FRAMES) for reader in readers]
                        if not len(blocks[0]):
                            break
                        writers[name].write(quantize(np.concatenate(blocks, axis=1), subtype))
                finally:
                    for reader in readers:
                        reader.close()
        finally:
            for writer in writers.values():
                writer.close()


class _FolderSink:
    """Stems of one channel group, kept on their sample grid until interleaved."""

    def __init__(self, folder: Path):
        self.folder = folder

    def open_stem(self, name: str, samplerate: int, channels: int, subtype: str, frames: int) -> AudioWriter:
        return AudioWriter(self.folder / f"{name}.wav", samplerate, channels, subtype, frames)

    def publish(self, name: str) -> None:  # pragma: no cover - groups are never published
        raise AssertionError("group stems are interleaved, not published")


def _write_block(estimate: torch.Tensor, outputs: dict[str, "_StemOutput"],
                 writers: dict[str, StemWriter], original: "_MixReader", last: bool = False) -> None:
    """Write one model-rate `[sources, channels, frames]` block of every source; for a
    source `X` with a `no_X` stem, also `no_X` from the input at the same positions."""
    for (name, output), stem in zip(outputs.items(), estimate):
        samples = output.convert(stem.T.numpy(), last)
        if not len(samples):
            continue
        writers[name].write(samples)
        rest = f"no_{name}"
        if rest in writers:
            mix = quantize(original.read(len(samples)), output.subtype)
            difference = dequantize(mix, output.subtype) - dequantize(samples, output.subtype)
            writers[rest].write(quantize(difference, output.subtype))


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
                progress: tp.Optional[ProgressFn] = None) -> MixStats:
    """Stream the input once at the model's rate for its length, mean and deviation.

    Blocks are merged with Chan's parallel variance formula in float64, which stays
    accurate over hours of audio where a running sum of squares would not.
    """
    info = read_info(path)
    expected = max(1, math.ceil(info.frames * model_samplerate / info.samplerate))
    count, mean, squares = 0, 0.0, 0.0  # squares: sum of squared deviations from `mean`
    for block in _model_rate_blocks(path, model_samplerate, matrix):
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


def _model_rate_blocks(path: Path, model_samplerate: int,
                       matrix: tp.Optional[np.ndarray] = None) -> tp.Iterator[np.ndarray]:
    """The input as float32 `[frames, 2]` blocks at the model's rate (mono duplicated,
    or folded by `matrix` `[channels, 2]`), the same blocks on every call (so both
    passes agree on the length)."""
    with AudioReader(path) as reader:
        resampler = _resampler(reader.samplerate, model_samplerate, MODEL_CHANNELS)
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


def _resampler(source_rate: int, target_rate: int, channels: int) -> tp.Optional[soxr.ResampleStream]:
    """A streaming float32 resampler between two rates, or None when they are equal."""
    if source_rate == target_rate:
        return None
    return soxr.ResampleStream(source_rate, target_rate, channels, dtype="float32",
                               quality=RESAMPLE_QUALITY)


class _MixReader:
    """The input read in step with the output, for `no_X`: exact-size float32 blocks at
    the output's rate and channels (folded by `matrix` when downmixing)."""

    def __init__(self, path: Path, samplerate: int, matrix: tp.Optional[np.ndarray] = None):
        self._reader = AudioReader(path)
        self._matrix = matrix
        channels = matrix.shape[1] if matrix is not None else self._reader.channels
        self._resampler = _resampler(self._reader.samplerate, samplerate, channels)
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

    def __enter__(self) -> "_MixReader":
        return self

    def __exit__(self, *exc_info: tp.Any) -> None:
        self.close()


class _StemOutput:
    """One stem from model-rate float `[frames, 2]` blocks to quantized blocks at the
    input's rate, channel count and exact length."""

    def __init__(self, model_samplerate: int, samplerate: int, channels: int, frames: int,
                 subtype: str):
        self.channels, self.frames, self.subtype = channels, frames, subtype
        self.written = 0
        self._resampler = _resampler(model_samplerate, samplerate, MODEL_CHANNELS)

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


def batch_segments(options: SeparationOptions) -> int:
    """Segments per forward: as set, else 1 on CPU and `CUDA_BATCH_SEGMENTS` on CUDA."""
    if options.batch_segments > 0:
        return options.batch_segments
    return CUDA_BATCH_SEGMENTS if torch.device(options.device).type == "cuda" else 1


def autocast_dtype(precision: str, device: str) -> tp.Optional[torch.dtype]:
    """The autocast dtype for `precision` on `device`; None means plain fp32.

    Warns and falls back to fp32 where the precision is not supported.

    Raises:
        ValueError: `precision` is not one of `PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    device_type = torch.device(device).type
    if precision == "fp16" and device_type != "cuda":
        warnings.warn(f"fp16 is only supported on CUDA, not {device_type}; using fp32")
        return None
    if precision == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        warnings.warn("this GPU does not support bf16; using fp32")
        return None
    if precision == "bf16" and device_type == "cpu" and not cpu_supports_bf16():
        warnings.warn("this CPU has no bf16 kernels (oneDNN needs AVX-512 or AMX); torch would "
                      "fall back to reference convolutions about 20x slower than fp32; using fp32")
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def cpu_supports_bf16() -> bool:
    """Whether oneDNN runs bf16 on this CPU (natively or through AVX-512)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class ModelForward:
    """Runs a model on a batch of windows on `device` in `precision`; the model must be
    resident on `device`, the windows come from the CPU."""

    def __init__(self, device: str, precision: str = "fp32"):
        self.device = torch.device(device)
        self.precision = precision
        self.dtype = autocast_dtype(precision, device)

    def __call__(self, model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            # Pinned memory makes the copy asynchronous, overlapping the previous batch's work.
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        if self.dtype is None:
            return model(windows)
        try:
            with torch.autocast(self.device.type, dtype=self.dtype):
                return model(windows).float()
        except RuntimeError as exc:
            warnings.warn(f"{self.precision} failed on {self.device} ({exc}); using fp32")
            self.dtype = None
            return model(windows)
