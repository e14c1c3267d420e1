"""One track in parts: the engine's side of separating a long job on many workers.

apply_model's windows over the whole mix (`demix.separation.streaming.stream_windows`) are cut
into contiguous runs, the *parts*. A part runs its windows exactly as the unsplit run
does and keeps what it would add to the cross-fade buffers: the triangularly weighted
window outputs and the weights, *not yet divided*. Where two parts meet, a window of
each covers the same positions (the cross-fade), so summing the parts' sums and weights
position by position, then dividing, gives the unsplit run's numbers operation for
operation (at most two windows overlap at 25% overlap, so even the rounding agrees).

    prepare: one pass over the input writes the model-rate mix (`MIX_FILE`) and
             measures the mean and deviation everyone normalises by
    parts:   `separate_part` reads only its windows' context from the mix file and
             streams its sums and weights into its own files as they become complete
    merge:   `merge_parts` streams the summed, divided estimate back in order; the
             engine's `write_stems` de-normalises and writes it like an unsplit run

Splitting applies to one model pass: no shifts (each shift pass would need its own
parts) and one sub-model with weight for the wanted sources (`single_pass`). Memory
stays flat: parts hold about a segment of mix and of sums; files are read and written
a block at a time, never mapped or held whole.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import typing as tp
from pathlib import Path

import numpy as np
import torch
from demucs.apply import BagOfModels
from demucs.utils import center_trim

from demix.storage.local import PendingWrite, SplitFiles

from demix.separation.engine import SeparationOptions, StemLayout, StemSink, write_stems
from demix.separation.forward import Forward, ModelForward, batch_segments, plain_forward
from demix.separation.mix_io import BLOCK_FRAMES, MODEL_CHANNELS, MixStats, measure_mix
from demix.separation.streaming import (MixBuffer, Window, segment_length, stream_windows, triangular_weight,
                                        window_count)

FLOAT32_BYTES = 4

MIX_FILE = "mix.f32"
"""The model-rate mix, raw float32 `[frames, 2]`, written once by the first pass."""


@dataclasses.dataclass(frozen=True)
class SinglePass:
    """The one sub-model a split job runs, with its bag weights for the wanted sources."""
    model: torch.nn.Module
    source_indices: list[int]  # the wanted sources' rows in the model's output
    weights: list[float]  # this sub-model's weight per wanted source
    totals: list[float]  # the bag's total weight per wanted source


def single_pass(model: torch.nn.Module, sources: tp.Sequence[str], shifts: int = 0) -> tp.Optional[SinglePass]:
    """The single pass that makes `sources` of `model`, or None when there are several
    (shifts, or more than one sub-model with weight for them): those jobs run unsplit."""
    if shifts:
        return None
    if isinstance(model, BagOfModels):
        sub_models, bag_weights = list(model.models), model.weights
    else:
        sub_models, bag_weights = [model], [[1.0] * len(model.sources)]
    wanted = [model.sources.index(name) for name in sources]
    weights = [[row[k] for k in wanted] for row in bag_weights]
    active = [index for index, row in enumerate(weights) if any(row)]
    if len(active) != 1:
        return None
    return SinglePass(sub_models[active[0]], wanted, weights[active[0]],
                      [sum(row[k] for row in bag_weights) for k in wanted])


@dataclasses.dataclass(frozen=True)
class Part:
    """A contiguous run of windows `[first_window, stop_window)` of the whole mix."""
    index: int
    first_window: int
    stop_window: int
    start: int  # first mix position its windows write (its first window's offset)
    stop: int  # one past the last
    read_start: int  # first mix position its windows read
    read_stop: int  # one past the last (both within the mix)

    @property
    def frames(self) -> int:
        return self.stop - self.start


def plan_parts(model: torch.nn.Module, length: int, overlap: float, part_frames: int) -> list[Part]:
    """Cut the windows over a mix of `length` samples into parts of at most about
    `part_frames` samples each, as even as the window grid allows."""
    windows = list(stream_windows(model, length, overlap))
    count = min(len(windows), max(1, math.ceil(length / max(1, part_frames))))
    bounds = [round(index * len(windows) / count) for index in range(count + 1)]
    parts = []
    for index, (first, stop) in enumerate(zip(bounds, bounds[1:])):
        run = windows[first:stop]
        parts.append(Part(index, first, stop, run[0].offset, max(w.offset + w.length for w in run),
                          max(0, min(w.start for w in run)), min(length, max(w.start + w.padded for w in run))))
    return parts


def part_windows(model: torch.nn.Module, length: int, overlap: float, part: Part) -> list[Window]:
    """The windows a part runs."""
    windows = stream_windows(model, length, overlap)
    return [w for index, w in enumerate(windows) if part.first_window <= index < part.stop_window]


def total_windows(model: torch.nn.Module, length: int, overlap: float) -> int:
    return window_count(model, length, overlap)


class MixFileWriter:
    """Keeps the model-rate mix of the first pass (`measure_mix`'s `on_block`), under a
    temporary name until `close(complete=True)` publishes it."""

    def __init__(self, pending: PendingWrite):
        self._pending = pending
        self._file = open(self._pending.temporary, "wb")

    def __call__(self, block: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())

    def close(self, complete: bool) -> None:
        self._file.close()
        if complete:
            self._pending.commit()
        else:
            self._pending.discard()


def read_mix(files: SplitFiles, start: int, stop: int) -> tp.Iterator[np.ndarray]:
    """Mix positions `[start, stop)` of the mix file as float32 `[frames, 2]` blocks, read
    a block at a time (a memory map would keep every page read resident)."""
    with files.open(MIX_FILE) as file:
        yield from read_frames(file, start, stop, MODEL_CHANNELS)


def read_frames(file: tp.BinaryIO, start: int, stop: int, width: int,
                block_frames: int = BLOCK_FRAMES) -> tp.Iterator[np.ndarray]:
    """Rows `[start, stop)` of a raw float32 file of `width`-wide rows, as `[frames, width]`
    blocks of at most `block_frames` rows."""
    row_bytes = FLOAT32_BYTES * width
    file.seek(start * row_bytes)
    for first in range(start, stop, block_frames):
        frames = min(stop, first + block_frames) - first
        data = file.read(frames * row_bytes)
        if len(data) != frames * row_bytes:
            raise RuntimeError(f"{getattr(file, 'name', 'a split file')} ended at row "
                               f"{first + len(data) // row_bytes}, before row {stop}")
        yield np.frombuffer(data, dtype=np.float32).reshape(frames, width)


def part_names(index: int) -> tuple[str, str]:
    """A finished part's files: weighted sums `[frames, sources * 2]` and weights `[frames]`."""
    return f"part-{index}.sum.f32", f"part-{index}.weight.f32"


class _PartFiles:
    """A part's sums and weights, appended in order under hidden names, published when complete."""

    def __init__(self, files: SplitFiles, index: int):
        self._pending = [files.pending(name) for name in part_names(index)]
        self._files = [open(pending.temporary, "wb") for pending in self._pending]

    def write(self, sums: torch.Tensor, weights: torch.Tensor) -> None:
        frames = sums.shape[-1]
        self._files[0].write(sums.permute(2, 0, 1).reshape(frames, -1).contiguous().numpy().tobytes())
        self._files[1].write(weights.contiguous().numpy().tobytes())

    def close(self, complete: bool) -> None:
        for file in self._files:
            file.close()
        for pending in self._pending:
            if complete:
                pending.commit()
            else:
                pending.discard()


@torch.inference_mode()
def separate_part(chosen: SinglePass, part: Part, length: int, overlap: float, stats: MixStats,
                  files: SplitFiles, *, forward: Forward = plain_forward, batch_segments: int = 1,
                  device: str = "cpu", on_windows: tp.Optional[tp.Callable[[int], None]] = None) -> None:
    """Run a part's windows over the normalised mix and write its weighted sums and
    weights (`part_names(part.index)`), as `demix.separation.streaming._Pass` accumulates
    them before dividing."""
    model = chosen.model
    windows = part_windows(model, length, overlap, part)
    blocks = (stats.normalise(block) for block in read_mix(files, part.read_start, part.read_stop))
    mix = MixBuffer(blocks, length, MODEL_CHANNELS, start=part.read_start)
    weight = triangular_weight(segment_length(model), torch.device(device))
    # The sums and weights are held only from the first position not yet written to the
    # last one a window reached (about a segment), not over the whole part.
    sums = torch.zeros(len(chosen.source_indices), model.audio_channels, 0)
    weights = torch.zeros(0)
    written = 0  # part positions already handed to the files (`sums[..., 0]` is this one)
    part_files = _PartFiles(files, part.index)
    complete = False
    try:
        position = 0
        while position < len(windows):
            batch = [windows[position]]
            position += 1
            while (len(batch) < batch_segments and position < len(windows)
                   and windows[position].padded == batch[0].padded):
                batch.append(windows[position])
                position += 1
            inputs = torch.stack([mix.window(w.start, w.start + w.padded) for w in batch])
            outputs = forward(model, inputs)
            for window, out in zip(batch, outputs):
                out = center_trim(out[chosen.source_indices], window.length)
                lo, n = window.offset - part.start - written, window.length
                if (grow := lo + n - weights.shape[0]) > 0:
                    sums = torch.cat([sums, sums.new_zeros(*sums.shape[:-1], grow)], -1)
                    weights = torch.cat([weights, weights.new_zeros(grow)])
                # apply_model weights on the model's device, then accumulates on the mix's.
                sums[..., lo:lo + n] += (weight[:n] * out).cpu()
                weights[lo:lo + n] += weight[:n].cpu()
            # Positions before the next window are complete for this part.
            done = windows[position].offset - part.start if position < len(windows) else part.frames
            part_files.write(sums[..., :done - written], weights[:done - written])
            sums, weights = sums[..., done - written:].clone(), weights[done - written:].clone()
            written = done
            if position < len(windows):
                mix.release(windows[position].start)
            if on_windows is not None:
                on_windows(len(batch))
        complete = True
    finally:
        part_files.close(complete)


@torch.inference_mode()
def merge_parts(chosen: SinglePass, parts: tp.Sequence[Part], length: int, files: SplitFiles,
                block_frames: int = BLOCK_FRAMES) -> tp.Iterator[torch.Tensor]:
    """The normalised estimate `[sources, 2, frames]`, in blocks covering the mix in
    order, from the parts' files: sums and weights added where parts overlap, divided,
    and weighted as `StreamingSeparator` combines one pass."""
    sources = len(chosen.source_indices)
    width = sources * MODEL_CHANNELS
    with contextlib.ExitStack() as opened:
        # Parts are read in order, a block at a time: each part's two files are streamed
        # once, front to back, never mapped or held whole.
        readers = []
        for part in parts:
            sums_name, weights_name = part_names(part.index)
            readers.append((part, read_frames(opened.enter_context(files.open(sums_name)), 0, part.frames, width),
                            read_frames(opened.enter_context(files.open(weights_name)), 0, part.frames, 1)))
        pending = {part.index: (np.zeros((0, width), np.float32), np.zeros((0, 1), np.float32)) for part in parts}
        for start in range(0, length, block_frames):
            stop = min(length, start + block_frames)
            total = torch.zeros(sources, MODEL_CHANNELS, stop - start)
            weight = torch.zeros(stop - start)
            for part, sums_blocks, weights_blocks in readers:
                lo, hi = max(start, part.start), min(stop, part.stop)
                if lo < hi:
                    sums, weights = _take_rows(pending, part.index, sums_blocks, weights_blocks, hi - lo)
                    piece = torch.from_numpy(sums)
                    total[..., lo - start:hi - start] += piece.reshape(hi - lo, sources, MODEL_CHANNELS).permute(1, 2, 0)
                    weight[lo - start:hi - start] += torch.from_numpy(weights[:, 0])
            out = total / weight
            # StreamingSeparator._combine for a single pass, in the same order.
            for k, source_weight in enumerate(chosen.weights):
                out[k] *= source_weight
            estimates = 0. + out
            for k, source_total in enumerate(chosen.totals):
                estimates[k] /= source_total
            yield estimates


def _take_rows(pending: dict, index: int, sums_blocks: tp.Iterator[np.ndarray],
               weights_blocks: tp.Iterator[np.ndarray], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The next `rows` rows of part `index`'s sums and weights (blocks of the files do not
    line up with the merge's blocks, so what is read beyond stays in `pending`)."""
    sums, weights = pending[index]
    while len(sums) < rows:
        sums = np.concatenate([sums, next(sums_blocks)])
        weights = np.concatenate([weights, next(weights_blocks)])
    pending[index] = sums[rows:], weights[rows:]
    return sums[:rows], weights[:rows]


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """What the first pass learned and how the job is cut; JSON in the job's split folder."""
    stats: MixStats
    overlap: float
    parts: list[Part]

    def to_dict(self) -> dict:
        return {"stats": dataclasses.asdict(self.stats), "overlap": self.overlap,
                "parts": [dataclasses.asdict(part) for part in self.parts]}

    @classmethod
    def from_dict(cls, value: dict) -> "SplitPlan":
        return cls(MixStats(**value["stats"]), value["overlap"], [Part(**part) for part in value["parts"]])


def prepare_split(model: torch.nn.Module, input_path: Path, layout: StemLayout, overlap: float,
                  part_frames: int, files: SplitFiles,
                  progress: tp.Optional[tp.Callable[[float], None]] = None) -> SplitPlan:
    """The first pass over the whole input: keep the model-rate mix in `files`
    (`Storage.begin_split`) and measure its mean and deviation; then cut the windows
    into parts."""
    chosen = single_pass(model, layout.sources)
    assert chosen is not None and not layout.by_pairs, "not a splittable job"
    keeper = MixFileWriter(files.pending(MIX_FILE))
    complete = False
    try:
        stats = measure_mix(input_path, model.samplerate, layout.matrix, progress=progress, on_block=keeper)
        complete = True
    finally:
        keeper.close(complete)
    return SplitPlan(stats, overlap, plan_parts(chosen.model, stats.length, overlap, part_frames))


def run_part(model: torch.nn.Module, layout: StemLayout, plan: SplitPlan, index: int, files: SplitFiles,
             options: SeparationOptions, on_windows: tp.Optional[tp.Callable[[int], None]] = None) -> None:
    """Run part `index` of a prepared split into `files`, in the job's device and precision."""
    chosen = single_pass(model, layout.sources)
    assert chosen is not None
    model.to(options.device)
    separate_part(chosen, plan.parts[index], plan.stats.length, plan.overlap, plan.stats, files,
                  forward=ModelForward(options.device, options.precision),
                  batch_segments=batch_segments(options.batch_segments, options.device),
                  device=options.device, on_windows=on_windows)


def merge_split(model: torch.nn.Module, input_path: Path, layout: StemLayout, plan: SplitPlan,
                files: SplitFiles, sink: StemSink) -> list[str]:
    """Merge the finished parts in `files` and write and publish the job's stems through
    `sink`, as the unsplit run would; returns the names written."""
    chosen = single_pass(model, layout.sources)
    assert chosen is not None
    estimates = merge_parts(chosen, plan.parts, plan.stats.length, files)
    write_stems(estimates, plan.stats, model.samplerate, input_path, layout.names, layout.sources, sink,
                layout.output, layout.frames, layout.channels, layout.matrix)
    for name in layout.names:
        sink.publish(name)
    return layout.names


def part_windows_total(model: torch.nn.Module, layout: StemLayout, plan: SplitPlan) -> int:
    """Windows over all parts (for progress)."""
    chosen = single_pass(model, layout.sources)
    assert chosen is not None
    return total_windows(chosen.model, plan.stats.length, plan.overlap)
