"""The separation engine: a WAV file in, stems out through a sink, in flat memory.

It follows `demucs.separate` where that matters for the output: the mix is normalised
by the mean and standard deviation of its mono reference, run through the model as
`demucs.apply.apply_model` would (segments overlapping by `overlap`, triangular
cross-fades, the shift trick; see `demix.separation.streaming`), and de-normalised. Around it,
the engine converts the input to the model's 44.1 kHz stereo and every stem back to
the input's rate, channel count and length (`demix.separation.mix_io`), and runs the network in
the job's device and precision (`demix.separation.forward`).

A RoFormer (`demix.separation.roformer`) takes the same path around a different core: no
normalisation, and MSST's windowed demix (`demix.separation.roformer.inference`) in place of
`StreamingSeparator`, so it reads the input once through the model. Its windows are its
config's (`chunk_size`, `num_overlap`, weighted in batches of `batch_size` as MSST's), one
per forward on a CPU and a batch per forward on a GPU: the options' `shifts`, `overlap` and
`batch_segments` are Demucs' and do not apply to it.

Nothing holds the whole track: the input is streamed twice (once for its mean and
standard deviation, once through the model) and, for one stem `X`, a third time in
step with the output to write `no_X`. Stems are written block by block as soon as no
later segment changes them.
"""
from __future__ import annotations

import dataclasses
import tempfile
import typing as tp
from pathlib import Path

import numpy as np
import torch

from demix.audio.io import AudioReader, AudioWriter, dequantize, quantize, read_info
from demix.errors import SeparationFailed
from demix.audio.output_formats import OutputOptions, default_output
from demix.stems import ALL, output_names

from demix.separation.channels import channel_groups, downmix_matrix
from demix.separation.forward import ModelForward, batch_segments
from demix.separation.mix_io import (BLOCK_FRAMES, MODEL_CHANNELS, MixReader, MixStats, ProgressFn, StemOutput,
                                     measure_mix, model_rate_blocks)
from demix.separation.roformer import is_roformer
from demix.separation.roformer.inference import estimate_blocks
from demix.separation.streaming import StreamingSeparator

STATS_SHARE = 0.05
"""Share of a job's progress spent on the first pass (the mix's mean and deviation)."""

MODEL_SHARE = 0.94
"""Share spent running the model; what is left is closing and publishing the stems."""

GROUPS_SHARE = 0.97
"""With more than two channels: share spent separating the channel groups; the rest is
interleaving their stems."""


@dataclasses.dataclass(frozen=True)
class SeparationOptions:
    """How to run the model."""
    shifts: int = 0  # random-shift passes averaged; 0 = one deterministic pass
    overlap: float = 0.25  # overlap between segments, fraction of a segment
    device: str = "cpu"
    seed: int = 0  # seeds the shifts, so a job's output is reproducible
    precision: str = "fp32"  # one of demix.separation.forward.PRECISIONS
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
    layout = stem_layout(model, input_path, stems, output)
    names, sources, output, frames = layout.names, layout.sources, layout.output, layout.frames
    model.to(options.device)  # a no-op for a model already resident there
    if layout.by_pairs:
        _separate_by_pairs(model, input_path, names, sources, sink, options, report, output, frames,
                           layout.channels)
    else:
        _separate_channels(model, input_path, names, sources, sink, options, report, output, frames,
                           layout.channels, layout.matrix)
    for name in names:
        sink.publish(name)
    report(1.0)
    return names


@dataclasses.dataclass(frozen=True, eq=False)
class StemLayout:
    """What a job's stems are and what the model sees of its input."""
    names: list[str]  # stems written, in order (`X`, `no_X` for one stem)
    sources: list[str]  # model sources run
    output: OutputOptions
    frames: int  # each stem's length at the output's rate
    channels: int  # each stem's channel count
    matrix: tp.Optional[np.ndarray]  # input channels -> the model's stereo, when downmixing
    by_pairs: bool  # more than two channels, separated one channel pair at a time


def stem_layout(model: torch.nn.Module, input_path: Path, stems: str,
                output: tp.Optional[OutputOptions] = None) -> StemLayout:
    """The stems of `stems` for the WAV at `input_path` written with `output` (default:
    the input's own format).

    Raises:
        SeparationFailed: the model has no such source.
    """
    if stems != ALL and stems not in model.sources:
        raise SeparationFailed(f"model has no source {stems!r}; it separates "
                               f"{', '.join(model.sources)}", code="unknown_source")
    names = output_names(stems, model.sources)
    sources = [name for name in names if not name.startswith("no_")]
    info = read_info(input_path)
    output = output or default_output(info)
    frames = info.frames if output.samplerate == info.samplerate \
        else round(info.frames * output.samplerate / info.samplerate)
    if output.channel_mode == "stereo" and info.channels != 2:
        # The model, and `no_X`, see the stereo downmix instead of the input.
        return StemLayout(names, sources, output, frames, MODEL_CHANNELS, downmix_matrix(info.channels),
                          by_pairs=False)
    return StemLayout(names, sources, output, frames, info.channels, None,
                      by_pairs=info.channels > MODEL_CHANNELS)


def _separate_channels(model: torch.nn.Module, input_path: Path, names: list[str], sources: list[str],
                       sink: StemSink, options: SeparationOptions, report: ProgressFn,
                       output: OutputOptions, frames: int, channels: int,
                       matrix: tp.Optional[np.ndarray] = None) -> None:
    """Separate the input's `channels` (or `input @ matrix`, with `channels` columns; at
    most two) into closed, unpublished stems in `sink`."""
    if is_roformer(model):
        estimates = estimate_blocks(model, input_path, sources, options.device, options.precision, matrix,
                                    progress=lambda value: report((STATS_SHARE + MODEL_SHARE) * value))
        write_stems(estimates, None, model.samplerate, input_path, names, sources, sink, output, frames,
                    channels, matrix)
        return
    stats = measure_mix(input_path, model.samplerate, matrix,
                        progress=lambda value: report(STATS_SHARE * value))
    windows_done = 0

    def count_windows(count: int) -> None:
        nonlocal windows_done
        windows_done += count
        report(STATS_SHARE + MODEL_SHARE * windows_done / max(1, separator.window_count))

    separator = StreamingSeparator(
        model, stats.length, sources, shifts=options.shifts, overlap=options.overlap,
        seed=options.seed, batch_segments=batch_segments(options.batch_segments, options.device), device=options.device,
        forward=ModelForward(options.device, options.precision), on_windows=count_windows)
    blocks = model_rate_blocks(input_path, model.samplerate, matrix)
    estimates = separator.run(stats.normalise(block) for block in blocks)
    write_stems(estimates, stats, model.samplerate, input_path, names, sources, sink, output, frames,
                channels, matrix)


def write_stems(estimates: tp.Iterable[torch.Tensor], stats: tp.Optional[MixStats], model_samplerate: int,
                input_path: Path, names: list[str], sources: list[str], sink: StemSink,
                output: OutputOptions, frames: int, channels: int,
                matrix: tp.Optional[np.ndarray] = None) -> None:
    """De-normalise the model's normalised `[sources, channels, frames]` estimate blocks
    (in order, covering the mix; with `stats` None they are not normalised) and write
    them as closed, unpublished stems in `sink` at the output's rate, channels and
    length; `no_X` from the input alongside."""
    subtype = output.grid_subtype
    outputs = {name: StemOutput(model_samplerate, output.samplerate, channels, frames, subtype)
               for name in sources}
    writers: dict[str, StemWriter] = {}
    try:
        for name in names:
            writers[name] = sink.open_stem(name, output.samplerate, channels, subtype, frames)
        with MixReader(input_path, output.samplerate, matrix) as original:
            for estimate in estimates:
                _write_block(estimate if stats is None else stats.denormalise(estimate), outputs, writers,
                             original)
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


def _write_block(estimate: torch.Tensor, outputs: dict[str, "StemOutput"],
                 writers: dict[str, StemWriter], original: "MixReader", last: bool = False) -> None:
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
