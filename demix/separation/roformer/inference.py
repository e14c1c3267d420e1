"""RoFormer inference: MSST's generic-mode `demix`, streamed.

MSST (`utils/model_utils.py::demix`, generic mode) pads the mix at both ends by
reflection (by `border = chunk_size - step` frames, when the mix is longer than two
borders), cuts windows of `chunk_size` frames every `step = chunk_size // num_overlap`
frames (a window running past the end is padded by reflection when more than half of it
is signal, with zeros otherwise), runs the network on them `batch_size` at a time
(the config's `inference.batch_size`), weights each window's output by a linear fade of
`chunk_size // 10` frames at both ends, sums, divides by the summed weights (0/0, where
only a fade's zero weight falls, gives 0) and cuts the padding off again.

The fades are decided per batch, by its last window: a batch that is the first window
alone loses its fade-in, else a batch that ends the mix loses its fade-outs, every window
of it alike. With `batch_size` 1 that is "no fade-in at the start, no fade-out at the
end"; with more, the first window keeps its fade-in (unless it is the only one, then it
keeps its fade-out instead) and every window of the last batch loses its fade-out. Where
the padding is not cut off again (a mix of at most two borders), the output shows it: its
first frame is 0 (the fade-in's zero weight alone, 0/0) and, where the last batch's windows
overlap, they weigh alike.

`demix_stream` does the same arithmetic, in the same order, batch for batch, on a stream
of blocks: it holds one batch of windows and the frames no later batch can still change,
so memory stays flat however long the track, and it yields each stretch of output as
soon as it is final. A GPU runs each batch in one forward, as MSST; a CPU runs its windows
one by one (`windows_per_forward`), which changes the estimates by float rounding only.
"""
from __future__ import annotations

import math
import typing as tp
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from demix.audio.io import read_info

from demix.separation.forward import Forward, ModelForward
from demix.separation.mix_io import model_rate_blocks
from demix.separation.roformer.network import RoformerNetwork

FADE_SHARE = 10
"""A window's fade-in and fade-out each last chunk_size // FADE_SHARE frames (MSST's)."""

RunWindows = tp.Callable[[torch.Tensor], torch.Tensor]
"""run(windows `[batch, channels, chunk_size]`) -> the network's `[batch, stems, channels, chunk_size]`."""


def fade_window(chunk_size: int) -> torch.Tensor:
    """The weights of a window's output: linear 0→1 over the first chunk_size // 10
    frames, 1→0 over the last as many, 1 between."""
    fade = chunk_size // FADE_SHARE
    window = torch.ones(chunk_size)
    window[-fade:] = torch.linspace(1, 0, fade)
    window[:fade] = torch.linspace(0, 1, fade)
    return window


def window_count(frames: int, chunk_size: int, num_overlap: int) -> int:
    """How many windows `demix_stream` runs on a mix of `frames` frames."""
    step = chunk_size // num_overlap
    border = chunk_size - step
    padded = frames + 2 * border if frames > 2 * border and border > 0 else frames
    return math.ceil(padded / step)


def demix_stream(blocks: tp.Iterable[torch.Tensor], run: RunWindows, chunk_size: int, num_overlap: int,
                 batch_size: int = 1, on_window: tp.Optional[tp.Callable[[], None]] = None
                 ) -> tp.Iterator[torch.Tensor]:
    """MSST's generic-mode demix of the mix given as float32 `[channels, frames]` blocks,
    running `batch_size` windows per call of `run`: yields float32 `[stems, channels, frames]`
    blocks of the estimate, in order, covering the mix exactly. `on_window` is called once
    per window run."""
    step = chunk_size // num_overlap
    border = chunk_size - step
    fade = chunk_size // FADE_SHARE
    base_window = fade_window(chunk_size)
    source = iter(blocks)

    # Whether the ends get padded depends on the length: read far enough to know.
    head: list[torch.Tensor] = []
    seen, ended = 0, False
    while seen <= 2 * border:
        block = next(source, None)
        if block is None:
            ended = True
            break
        head.append(block)
        seen += block.shape[-1]
    if not head:
        return
    mix = torch.cat(head, dim=-1)
    pad = border if seen > 2 * border and border > 0 else 0
    # `buffer` holds the padded mix from padded frame `buffer_start` on.
    buffer = torch.cat([mix[:, 1:pad + 1].flip(-1), mix], dim=-1)
    buffer_start = 0
    total: tp.Optional[int] = None  # the padded length, once the end is read

    def read_until(frames: int) -> None:
        """Extend `buffer` to `frames` padded frames or to the end of the mix."""
        nonlocal buffer, ended, total
        pieces = [buffer]
        end = buffer_start + buffer.shape[-1]
        while not ended and end < frames:
            block = next(source, None)
            if block is None:
                ended = True
                break
            pieces.append(block)
            end += block.shape[-1]
        buffer = torch.cat(pieces, dim=-1) if len(pieces) > 1 else buffer
        if ended and total is None:
            # The last frames before the end are still buffered: the current window starts
            # no later than the last input frame but one (see below).
            tail = buffer[:, buffer.shape[-1] - pad - 1:buffer.shape[-1] - 1].flip(-1)
            buffer = torch.cat([buffer, tail], dim=-1)
            total = buffer_start + buffer.shape[-1]

    result: tp.Optional[torch.Tensor] = None  # weighted sums from padded frame `done` on
    counter = torch.zeros(0)
    done = 0  # padded frames before this are yielded (or cut off as padding)
    start = 0  # the next window's first padded frame
    while True:
        parts: list[torch.Tensor] = []
        spans: list[tuple[int, int]] = []  # each window's (start, frames of the mix in it)
        while len(parts) < batch_size:
            # One frame past the window tells whether it is the last one.
            read_until(start + chunk_size + 1)
            if total is not None and start >= total:
                break
            part = buffer[:, start - buffer_start:start - buffer_start + chunk_size]
            length = part.shape[-1]
            if length < chunk_size:
                mode = "reflect" if length > chunk_size // 2 else "constant"
                part = F.pad(part[None], (0, chunk_size - length), mode=mode)[0]
            parts.append(part)
            spans.append((start, length))
            start += step
            if total is not None and start >= total:
                break
        if not parts:
            break
        estimates = run(torch.stack(parts))
        if on_window is not None:
            for _ in parts:
                on_window()
        # MSST weighs a batch's windows alike, by its last window (see the module's docstring).
        window = base_window.clone()
        if spans[-1][0] == 0:
            window[:fade] = 1
        elif total is not None and start >= total:
            window[-fade:] = 1
        if result is None:
            result = torch.zeros(estimates.shape[1], estimates.shape[2], 0)
        for estimate, (window_start, length) in zip(estimates, spans):
            grow = window_start + length - (done + result.shape[-1])
            if grow > 0:
                result = torch.cat([result, result.new_zeros(*result.shape[:2], grow)], dim=-1)
                counter = torch.cat([counter, counter.new_zeros(grow)])
            span = slice(window_start - done, window_start - done + length)
            result[..., span] += estimate[..., :length] * window[:length]
            counter[span] += window[:length]
        # No later window reaches before `start`; at the end, nothing is left to come.
        final = total if total is not None and start >= total else start
        first, last = max(done, pad), final if total is None else min(final, total - pad)
        if last > first:
            yield torch.nan_to_num(result[..., first - done:last - done] / counter[first - done:last - done],
                                   nan=0.0)
        result, counter, done = result[..., final - done:], counter[final - done:], final
        # The next window starts at `start` <= the last frame read but one: keeping the
        # buffer from there keeps the frames the end's reflection needs.
        buffer, buffer_start = buffer[:, start - buffer_start:], start


def windows_per_forward(batch_size: int, device: str) -> int:
    """Windows stacked into one forward: a whole batch on a GPU, as MSST runs it; one on a
    CPU, where stacking gains no time and multiplies the forward's memory (on the CPU the
    estimates then differ from MSST's by float rounding only, the fades being the batch's)."""
    return batch_size if torch.device(device).type == "cuda" else 1


def network_runner(model: RoformerNetwork, sources: tp.Sequence[int], forward: Forward,
                   per_forward: tp.Optional[int] = None) -> RunWindows:
    """Run `model` (through `forward`, e.g. a `ModelForward`) on a batch of stereo windows,
    `per_forward` of them per forward (default: all at once), and keep the stems at indices
    `sources`. A mono network sees each channel on its own."""
    chosen = torch.tensor(list(sources))

    def run_stack(windows: torch.Tensor) -> torch.Tensor:
        if model.audio_channels == 1:
            count, channels, length = windows.shape
            estimate = forward(model, windows.reshape(count * channels, 1, length))  # [b×c, stems, 1, t]
            estimate = estimate[:, :, 0].unflatten(0, (count, channels)).transpose(1, 2)
        else:
            estimate = forward(model, windows)
        return estimate.index_select(1, chosen.to(estimate.device)).float().cpu()

    def run(windows: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([run_stack(stack) for stack in windows.split(per_forward or len(windows))])

    return run


def estimate_blocks(model: RoformerNetwork, input_path: Path, sources: tp.Sequence[str], device: str,
                    precision: str, matrix: tp.Optional[np.ndarray] = None,
                    progress: tp.Optional[tp.Callable[[float], None]] = None) -> tp.Iterator[torch.Tensor]:
    """The model's estimates of `sources` for the WAV at `input_path`, streamed as
    model-rate `[sources, 2, frames]` blocks: the input in the model's stereo (mono
    duplicated, or folded by `matrix`) at its rate, demixed as MSST's generic mode.
    `progress` goes from 0 to 1 over the windows. The windows are weighted in batches of
    the config's `batch_size`, as MSST's; `windows_per_forward` says how many run at once."""
    info = read_info(input_path)
    expected = window_count(max(1, math.ceil(info.frames * model.samplerate / info.samplerate)),
                            model.chunk_size, model.num_overlap)
    windows = 0

    def count_window() -> None:
        nonlocal windows
        windows += 1
        if progress is not None:
            progress(min(1.0, windows / expected))

    run = network_runner(model, [model.sources.index(name) for name in sources], ModelForward(device, precision),
                         windows_per_forward(model.batch_size, device))
    blocks = (torch.from_numpy(np.ascontiguousarray(block.T)) for block in
              model_rate_blocks(input_path, model.samplerate, matrix))
    yield from demix_stream(blocks, run, model.chunk_size, model.num_overlap, model.batch_size, count_window)

