"""RoFormer inference: MSST's generic-mode `demix`, streamed.

MSST (`utils/model_utils.py::demix`, generic mode, batch size 1) pads the mix at both
ends by reflection (by `border = chunk_size - step` frames, when the mix is longer than
two borders), runs the network on windows of `chunk_size` frames every
`step = chunk_size // num_overlap` frames (a window running past the end is padded by
reflection when more than half of it is signal, with zeros otherwise), weights each
window's output by a linear fade of `chunk_size // 10` frames at both ends (none at the
start of the first window nor at the end of the last), sums, divides by the summed
weights and cuts the padding off again.

`demix_stream` does the same arithmetic, in the same order, on a stream of blocks: it
holds one window and the frames no later window can still change, so memory stays flat
however long the track, and it yields each stretch of output as soon as it is final.
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

RunWindow = tp.Callable[[torch.Tensor], torch.Tensor]
"""run(window `[channels, chunk_size]`) -> the network's `[stems, channels, chunk_size]`."""


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


def demix_stream(blocks: tp.Iterable[torch.Tensor], run: RunWindow, chunk_size: int, num_overlap: int,
                 on_window: tp.Optional[tp.Callable[[], None]] = None) -> tp.Iterator[torch.Tensor]:
    """MSST's generic-mode demix of the mix given as float32 `[channels, frames]` blocks:
    yields float32 `[stems, channels, frames]` blocks of the estimate, in order, covering
    the mix exactly. `on_window` is called after each window is run."""
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
            # The last frames before the end are still buffered: the next window starts
            # no later than the last input frame but one (see below).
            tail = buffer[:, buffer.shape[-1] - pad - 1:buffer.shape[-1] - 1].flip(-1)
            buffer = torch.cat([buffer, tail], dim=-1)
            total = buffer_start + buffer.shape[-1]

    result: tp.Optional[torch.Tensor] = None  # weighted sums from padded frame `done` on
    counter = torch.zeros(0)
    done = 0  # padded frames before this are yielded (or cut off as padding)
    start = 0
    while True:
        # One frame past the window tells whether it is the last one.
        read_until(start + chunk_size + 1)
        if total is not None and start >= total:
            break
        part = buffer[:, start - buffer_start:start - buffer_start + chunk_size]
        length = part.shape[-1]
        if length < chunk_size:
            mode = "reflect" if length > chunk_size // 2 else "constant"
            part = F.pad(part[None], (0, chunk_size - length), mode=mode)[0]
        window = base_window.clone()
        if start == 0:
            window[:fade] = 1
        elif total is not None and start + step >= total:
            window[-fade:] = 1
        estimate = run(part)
        if on_window is not None:
            on_window()
        if result is None:
            result = torch.zeros(estimate.shape[0], estimate.shape[1], 0)
        grow = start + length - (done + result.shape[-1])
        if grow > 0:
            result = torch.cat([result, result.new_zeros(*result.shape[:2], grow)], dim=-1)
            counter = torch.cat([counter, counter.new_zeros(grow)])
        span = slice(start - done, start - done + length)
        result[..., span] += estimate[..., :length] * window[:length]
        counter[span] += window[:length]
        start += step
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


def network_runner(model: RoformerNetwork, sources: tp.Sequence[int], forward: Forward) -> RunWindow:
    """Run `model` (through `forward`, e.g. a `ModelForward`) on one stereo window and keep
    the stems at indices `sources`. A mono network sees each channel on its own."""
    chosen = torch.tensor(list(sources))

    def run(part: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if model.audio_channels == 1:
                estimate = forward(model, part[:, None])  # [channels, stems, 1, time]
                estimate = estimate[:, :, 0].transpose(0, 1)
            else:
                estimate = forward(model, part[None])[0]
            return estimate.index_select(0, chosen.to(estimate.device)).float().cpu()

    return run


def estimate_blocks(model: RoformerNetwork, input_path: Path, sources: tp.Sequence[str], device: str,
                    precision: str, matrix: tp.Optional[np.ndarray] = None,
                    progress: tp.Optional[tp.Callable[[float], None]] = None) -> tp.Iterator[torch.Tensor]:
    """The model's estimates of `sources` for the WAV at `input_path`, streamed as
    model-rate `[sources, 2, frames]` blocks: the input in the model's stereo (mono
    duplicated, or folded by `matrix`) at its rate, demixed as MSST's generic mode.
    `progress` goes from 0 to 1 over the windows."""
    info = read_info(input_path)
    expected = window_count(max(1, math.ceil(info.frames * model.samplerate / info.samplerate)),
                            model.chunk_size, model.num_overlap)
    windows = 0

    def count_window() -> None:
        nonlocal windows
        windows += 1
        if progress is not None:
            progress(min(1.0, windows / expected))

    run = network_runner(model, [model.sources.index(name) for name in sources],
                         ModelForward(device, precision))
    blocks = (torch.from_numpy(np.ascontiguousarray(block.T)) for block in
              model_rate_blocks(input_path, model.samplerate, matrix))
    yield from demix_stream(blocks, run, model.chunk_size, model.num_overlap, count_window)

