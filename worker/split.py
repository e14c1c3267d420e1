"""One track in parts: the engine's side of separating a long job on many workers.

apply_model's windows over the whole mix (`worker.streaming.stream_windows`) are cut
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
stays flat: parts hold about a segment of mix and of sums; files are read by memmap.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing as tp
from pathlib import Path

import numpy as np
import torch
from demucs.apply import BagOfModels
from demucs.utils import center_trim

from shared.atomic import PendingFile

from .engine import SeparationOptions, StemLayout, StemSink, write_stems
from .forward import Forward, ModelForward, batch_segments, plain_forward
from .mix_io import BLOCK_FRAMES, MODEL_CHANNELS, MixStats, measure_mix
from .streaming import MixBuffer, Window, segment_length, stream_windows, triangular_weight, window_count

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

    def __init__(self, path: Path):
        self.path = path
        self._pending = PendingFile(path)
        self._file = open(self._pending.temporary, "wb")

    def __call__(self, block: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())

    def close(self, complete: bool) -> None:
        self._file.close()
        if complete:
            self._pending.commit()
        else:
            self._pending.discard()


def read_mix(path: Path, start: int, stop: int) -> tp.Iterator[np.ndarray]:
    """Mix positions `[start, stop)` of a mix file as float32 `[frames, 2]` blocks."""
    frames = os.path.getsize(path) // (4 * MODEL_CHANNELS)
    mix = np.memmap(path, dtype=np.float32, mode="r", shape=(frames, MODEL_CHANNELS))
    for first in range(start, stop, BLOCK_FRAMES):
        yield np.array(mix[first:min(stop, first + BLOCK_FRAMES)])


def part_paths(folder: Path, index: int) -> tuple[Path, Path]:
    """A finished part's files: weighted sums `[frames, sources * 2]` and weights `[frames]`."""
    return folder / f"part-{index}.sum.f32", folder / f"part-{index}.weight.f32"


class _PartFiles:
    """A part's sums and weights, appended in order under hidden names, renamed when complete."""

    def __init__(self, folder: Path, index: int):
        self._pending = [PendingFile(path) for path in part_paths(folder, index)]
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
                  mix_path: Path, folder: Path, *, forward: Forward = plain_forward, batch_segments: int = 1,
                  device: str = "cpu", on_windows: tp.Optional[tp.Callable[[int], None]] = None) -> None:
    """Run a part's windows over the normalised mix and write its weighted sums and
    weights (`part_paths(folder, part.index)`), as `worker.streaming._Pass` accumulates
    them before dividing."""
    model = chosen.model
    windows = part_windows(model, length, overlap, part)
    blocks = (stats.normalise(block) for block in read_mix(mix_path, part.read_start, part.read_stop))
    mix = MixBuffer(blocks, length, MODEL_CHANNELS, start=part.read_start)
    weight = triangular_weight(segment_length(model), torch.device(device))
    sums = torch.zeros(len(chosen.source_indices), model.audio_channels, part.frames)
    weights = torch.zeros(part.frames)
    written = 0  # part positions already handed to the files
    files = _PartFiles(folder, part.index)
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
                lo, n = window.offset - part.start, window.length
                # apply_model weights on the model's device, then accumulates on the mix's.
                sums[..., lo:lo + n] += (weight[:n] * out).cpu()
                weights[lo:lo + n] += weight[:n].cpu()
            # Positions before the next window are complete for this part.
            done = windows[position].offset - part.start if position < len(windows) else part.frames
            files.write(sums[..., written:done], weights[written:done])
            written = done
            if position < len(windows):
                mix.release(windows[position].start)
            if on_windows is not None:
                on_windows(len(batch))
        complete = True
    finally:
        files.close(complete)


@torch.inference_mode()
def merge_parts(chosen: SinglePass, parts: tp.Sequence[Part], length: int, folder: Path,
                block_frames: int = BLOCK_FRAMES) -> tp.Iterator[torch.Tensor]:
    """The normalised estimate `[sources, 2, frames]`, in blocks covering the mix in
    order, from the parts' files: sums and weights added where parts overlap, divided,
    and weighted as `StreamingSeparator` combines one pass."""
    sources = len(chosen.source_indices)
    files = []
    for part in parts:
        sums_path, weights_path = part_paths(folder, part.index)
        files.append((part, np.memmap(sums_path, dtype=np.float32, mode="r",
                                      shape=(part.frames, sources * MODEL_CHANNELS)),
                      np.memmap(weights_path, dtype=np.float32, mode="r", shape=(part.frames,))))
    for start in range(0, length, block_frames):
        stop = min(length, start + block_frames)
        total = torch.zeros(sources, MODEL_CHANNELS, stop - start)
        weight = torch.zeros(stop - start)
        for part, sums, weights in files:
            lo, hi = max(start, part.start), min(stop, part.stop)
            if lo < hi:
                piece = torch.from_numpy(np.array(sums[lo - part.start:hi - part.start]))
                total[..., lo - start:hi - start] += piece.reshape(hi - lo, sources, MODEL_CHANNELS).permute(1, 2, 0)
                weight[lo - start:hi - start] += torch.from_numpy(np.array(weights[lo - part.start:hi - part.start]))
        out = total / weight
        # StreamingSeparator._combine for a single pass, in the same order.
        for k, source_weight in enumerate(chosen.weights):
            out[k] *= source_weight
        estimates = 0. + out
        for k, source_total in enumerate(chosen.totals):
            estimates[k] /= source_total
        yield estimates


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
                  part_frames: int, folder: Path,
                  progress: tp.Optional[tp.Callable[[float], None]] = None) -> SplitPlan:
    """The first pass over the whole input: keep the model-rate mix in `folder` (which
    must exist: `JobStorage.make_split_dir`) and
    measure its mean and deviation; then cut the windows into parts."""
    chosen = single_pass(model, layout.sources)
    assert chosen is not None and not layout.by_pairs, "not a splittable job"
    keeper = MixFileWriter(folder / MIX_FILE)
    complete = False
    try:
        stats = measure_mix(input_path, model.samplerate, layout.matrix, progress=progress, on_block=keeper)
        complete = True
    finally:
        keeper.close(complete)
    return SplitPlan(stats, overlap, plan_parts(chosen.model, stats.length, overlap, part_frames))


def run_part(model: torch.nn.Module, layout: StemLayout, plan: SplitPlan, index: int, folder: Path,
             options: SeparationOptions, on_windows: tp.Optional[tp.Callable[[int], None]] = None) -> None:
    """Run part `index` of a prepared split into `folder`, in the job's device and precision."""
    chosen = single_pass(model, layout.sources)
    assert chosen is not None
    model.to(options.device)
    separate_part(chosen, plan.parts[index], plan.stats.length, plan.overlap, plan.stats, folder / MIX_FILE,
                  folder, forward=ModelForward(options.device, options.precision),
                  batch_segments=batch_segments(options.batch_segments, options.device),
                  device=options.device, on_windows=on_windows)


def merge_split(model: torch.nn.Module, input_path: Path, layout: StemLayout, plan: SplitPlan,
                folder: Path, sink: StemSink) -> list[str]:
    """Merge the finished parts in `folder` and write and publish the job's stems through
    `sink`, as the unsplit run would; returns the names written."""
    chosen = single_pass(model, layout.sources)
    assert chosen is not None
    estimates = merge_parts(chosen, plan.parts, plan.stats.length, folder)
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
