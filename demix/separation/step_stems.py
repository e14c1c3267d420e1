"""Stems made from other stems, block by block in flat memory: a workflow step's stems from
its models' runs (an ensemble of each source, and the complements `no_X`), stems
re-encoded into a job's output format, and a job's stems from a result cache entry.

All of them write through a `StemSink` as the engine does, so the files are published only when
every one is complete, and a job's `clip=rescale` sees every stem's peak first.
"""
from __future__ import annotations

import contextlib
import typing as tp
from pathlib import Path

from demix.audio.io import AudioReader, dequantize, quantize
from demix.audio.output_formats import OutputOptions

from .engine import StemSink
from .ensemble import ensemble_files
from .mix_io import BLOCK_FRAMES, MixReader

ProgressFn = tp.Callable[[float], None]


def write_step_stems(runs: tp.Sequence[tp.Mapping[str, Path]], input_path: Path, stems: tp.Sequence[str],
                     sink: StemSink, scratch: Path, ensemble: tp.Optional[str] = None,
                     weights: tp.Optional[tp.Sequence[float]] = None,
                     progress: ProgressFn = lambda _value: None) -> list[str]:
    """Write `stems` of a step whose input is `input_path` and whose models wrote `runs`
    (per model, source -> float32 WAV): a source is its models' `ensemble` (one model: its
    own), `no_X` is the input minus source X as the step gives it. Float32 WAV at the
    input's rate; returns the names written.

    Each ensembled source is first written to `scratch` (a folder), then read once beside
    the input to give it and its complement.
    """
    sources = list(dict.fromkeys(name[3:] if name.startswith("no_") else name for name in stems))
    files: dict[str, Path] = {}
    for index, source in enumerate(sources):
        if len(runs) == 1:
            files[source] = runs[0][source]
            continue
        files[source] = scratch / f"{source}.wav"
        ensemble_files([run[source] for run in runs], files[source], ensemble or "avg_wave", weights,
                       progress=lambda value, i=index: progress(0.8 * (i + value) / len(sources)))
    with AudioReader(input_path) as mix:
        samplerate, channels, frames = mix.samplerate, mix.channels, mix.frames
    with _published(sink) as writers:
        for name in stems:
            writers[name] = sink.open_stem(name, samplerate, channels, "FLOAT", frames)
        for index, source in enumerate(sources):
            with AudioReader(files[source]) as stem, AudioReader(input_path) as mix:
                while len(block := stem.read(BLOCK_FRAMES)):
                    if source in writers:
                        writers[source].write(block)
                    if f"no_{source}" in writers:
                        writers[f"no_{source}"].write(mix.read(len(block)) - block)
            progress(0.8 + 0.2 * (index + 1) / len(sources))
    return list(stems)


def encode_stems(files: tp.Mapping[str, Path], sink: StemSink, output: OutputOptions,
                 progress: ProgressFn = lambda _value: None) -> list[str]:
    """Write each float32 WAV of `files` (name -> path, at the output's rate and channels) as
    stem `name` in `output`'s format; returns the names written."""
    with _published(sink) as writers:
        for index, (name, path) in enumerate(files.items()):
            with AudioReader(path) as reader:
                writers[name] = sink.open_stem(name, output.samplerate, output.channels, output.grid_subtype,
                                               reader.frames)
                while len(block := reader.read(BLOCK_FRAMES)):
                    writers[name].write(quantize(block, output.grid_subtype))
            progress((index + 1) / len(files))
    return list(files)


def write_cached_stems(files: tp.Mapping[str, Path], input_path: Path, names: tp.Sequence[str], sink: StemSink,
                       output: OutputOptions, progress: ProgressFn = lambda _value: None) -> list[str]:
    """Write stems `names` of the input at `input_path` from a model's float32 WAVs `files`
    (source -> path, at the input's rate and channels, as the engine computed them before
    putting them on the output's grid) exactly as the engine would have: each source `X`
    on the output's sample grid, `no_X` as the input minus `X` on that grid (see
    `demix.separation.engine`'s `_write_block`). The output keeps the input's rate and
    channels; returns the names written."""
    subtype = output.grid_subtype
    sources = [name for name in names if not name.startswith("no_")]
    with AudioReader(input_path) as mix:
        samplerate, channels, frames = mix.samplerate, mix.channels, mix.frames
    with _published(sink) as writers:
        for name in names:
            writers[name] = sink.open_stem(name, samplerate, channels, subtype, frames)
        for index, source in enumerate(sources):
            rest = writers.get(f"no_{source}")
            with AudioReader(files[source]) as stem, MixReader(input_path, samplerate) as original:
                while len(block := stem.read(BLOCK_FRAMES)):
                    samples = quantize(block, subtype)
                    writers[source].write(samples)
                    if rest is not None:
                        mix_block = quantize(original.read(len(samples)), subtype)
                        rest.write(quantize(dequantize(mix_block, subtype) - dequantize(samples, subtype), subtype))
            progress((index + 1) / len(sources))
    return list(names)


@contextlib.contextmanager
def _published(sink: StemSink) -> tp.Iterator[dict[str, tp.Any]]:
    """The writers the block opens in `sink` (name -> writer), all closed however it ends, and
    published only if it ends well: every stem appears, or none."""
    writers: dict[str, tp.Any] = {}
    try:
        yield writers
    finally:
        for writer in writers.values():
            writer.close()
    for name in writers:
        sink.publish(name)
