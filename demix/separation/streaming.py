"""`demucs.apply.apply_model`, streamed: the mix arrives block by block and the
estimate leaves block by block, so memory stays flat however long the track.

`StreamingSeparator` reproduces `apply_model(model, mix, shifts, split=True, overlap)`
operation for operation, so both agree to float rounding:

- Each (sub-model, shift) pass is a stream over the mix delayed by `max_shift - offset`
  samples: apply_model's shift branch pads the mix with `max_shift` zeros on each side
  and starts reading at a random `offset`. A stream is zero outside the mix.
- A stream's windows start at `range(0, length, stride)`. The model sees a window of
  `n` samples padded to `valid_length(n)` and centred on it, as `TensorChunk.padded`
  does (so a short final window takes real samples from before it and zeros after the
  end); its output is `center_trim`med back to `n` samples.
- Window outputs are cross-faded with apply_model's triangular weights and divided by
  the summed weights. A position is final once the next window starts past it; final
  positions are emitted in order and their buffers dropped.
- Shift offsets are drawn from a `random.Random(seed)` exactly as apply_model draws them
  from `random` after `random.seed(seed)`, including the draws its forwards make in
  between (see `draw_delays`). Shifts are averaged in the order drawn, and a bag's
  sub-models weighted per source and divided by the total weight, in bag order.

All passes advance in lockstep by output position (the one furthest behind runs
next), so the mix is held only over about a segment and a stride, and the output
only until every pass has reached it.
"""
from __future__ import annotations

import dataclasses
import random
import typing as tp

import torch
from demucs.apply import BagOfModels
from demucs.transformer import CrossTransformerEncoder
from demucs.utils import center_trim

from demix.separation.forward import Forward, plain_forward


@dataclasses.dataclass(frozen=True)
class Window:
    """One segment of a stream, in the stream's sample positions."""
    offset: int  # first output position
    length: int  # output positions (a segment, or fewer at the end)
    start: int  # first input position given to the model; before `offset` when padded
    padded: int  # input positions given to the model


def segment_length(model: torch.nn.Module) -> int:
    """A sub-model's segment in samples, as apply_model computes it."""
    return int(model.samplerate * model.segment)


def _window_offsets(model: torch.nn.Module, length: int, overlap: float) -> range:
    return range(0, length, int((1 - overlap) * segment_length(model)))


def stream_windows(model: torch.nn.Module, length: int, overlap: float) -> tp.Iterator[Window]:
    """apply_model's windows over a stream of `length` samples."""
    segment = segment_length(model)
    for offset in _window_offsets(model, length, overlap):
        chunk = min(length - offset, segment)
        padded = model.valid_length(chunk) if hasattr(model, "valid_length") else chunk
        yield Window(offset, chunk, offset - (padded - chunk) // 2, padded)


def window_count(model: torch.nn.Module, length: int, overlap: float) -> int:
    """How many windows `stream_windows` yields."""
    return len(_window_offsets(model, length, overlap))


def triangular_weight(segment: int, device: torch.device) -> torch.Tensor:
    """apply_model's cross-fade weight (transition power 1), peaking mid-segment."""
    weight = torch.cat([torch.arange(1, segment // 2 + 1, device=device),
                        torch.arange(segment - segment // 2, 0, -1, device=device)])
    return weight / weight.max()


class MixBuffer:
    """The mix (`[channels, frames]` blocks from an iterator), held only from the
    earliest position a pass still needs to the latest one asked for."""

    def __init__(self, blocks: tp.Iterator[torch.Tensor], length: int, channels: int, start: int = 0):
        """`blocks` begin at mix position `start` (a part of a split job reads from there)."""
        self._blocks = blocks
        self.length = length
        self.channels = channels
        self._held: list[torch.Tensor] = []
        self._held_start = start  # mix position of the first held sample
        self._held_end = start  # one past the last held (and last read) sample

    def window(self, start: int, stop: int) -> torch.Tensor:
        """Mix positions `[start, stop)` as `[channels, stop - start]`, zero outside the mix."""
        self._read_until(min(stop, self.length))
        out = torch.zeros(self.channels, stop - start)
        first, last = max(start, 0), min(stop, self.length)
        if last > first:
            if first < self._held_start:
                raise RuntimeError(f"mix position {first} was already released")
            held = torch.cat(self._held, dim=-1) if len(self._held) > 1 else self._held[0]
            out[:, first - start:last - start] = held[:, first - self._held_start:last - self._held_start]
        return out

    def release(self, before: int) -> None:
        """Drop held blocks that end at or before position `before`."""
        while self._held and self._held_start + self._held[0].shape[-1] <= before:
            self._held_start += self._held.pop(0).shape[-1]

    def _read_until(self, stop: int) -> None:
        while self._held_end < stop:
            block = next(self._blocks, None)
            if block is None:
                raise RuntimeError(f"the mix ended at {self._held_end} samples, before the "
                                   f"{self.length} announced")
            self._held.append(block)
            self._held_end += block.shape[-1]


class _Pass:
    """apply_model's split branch for one (sub-model, shift) pass, run a batch of
    windows at a time. Positions are the stream's, i.e. the mix's plus `delay`."""

    def __init__(self, model: torch.nn.Module, model_index: int, sources: list[int], delay: int,
                 mix_length: int, overlap: float, batch_segments: int, device: torch.device):
        self.model = model
        self.model_index = model_index
        self.delay = delay
        self.length = mix_length + delay
        self._sources = sources
        self._batch_segments = batch_segments
        self._windows = stream_windows(model, self.length, overlap)
        self._next: tp.Optional[Window] = next(self._windows, None)
        self._weight = triangular_weight(segment_length(model), device)
        self._sum = torch.zeros(len(sources), model.audio_channels, 0)  # weighted window outputs
        self._sum_weight = torch.zeros(0)
        self._sum_start = 0  # stream position of `_sum[..., 0]`
        self._final = torch.zeros(len(sources), model.audio_channels, 0)  # divided, not yet taken
        self._final_start = 0
        self.final_end = 0  # positions before this will not change any more

    @property
    def done(self) -> bool:
        return self._next is None

    @property
    def needs_from(self) -> int:
        """First mix position the next window reads (the mix length when done)."""
        return self.length - self.delay if self._next is None else self._next.start - self.delay

    @property
    def ready_until(self) -> int:
        """Mix positions before this are final."""
        return self.final_end - self.delay

    @torch.inference_mode()
    def step(self, mix: MixBuffer, forward: Forward) -> int:
        """Run the next batch of windows (equal padded lengths, so they stack); returns how many."""
        batch = [self._take_window()]
        while (len(batch) < self._batch_segments and self._next is not None
               and self._next.padded == batch[0].padded):
            batch.append(self._take_window())
        inputs = torch.stack([mix.window(w.start - self.delay, w.start - self.delay + w.padded)
                              for w in batch])
        outputs = forward(self.model, inputs)
        for window, out in zip(batch, outputs):
            self._add(window, center_trim(out[self._sources], window.length))
        self._finalise(self.length if self._next is None else self._next.offset)
        return len(batch)

    @torch.inference_mode()
    def take(self, start: int, stop: int) -> torch.Tensor:
        """Final output for mix positions `[start, stop)`; earlier positions are dropped."""
        first = start + self.delay - self._final_start
        last = stop + self.delay - self._final_start
        out = self._final[..., first:last]
        self._final = self._final[..., last:]
        self._final_start = stop + self.delay
        return out

    def _take_window(self) -> Window:
        window = self._next
        assert window is not None
        self._next = next(self._windows, None)
        return window

    def _add(self, window: Window, out: torch.Tensor) -> None:
        grow = window.offset + window.length - (self._sum_start + self._sum_weight.shape[0])
        if grow > 0:
            self._sum = torch.cat([self._sum, self._sum.new_zeros(*self._sum.shape[:-1], grow)], -1)
            self._sum_weight = torch.cat([self._sum_weight, self._sum_weight.new_zeros(grow)])
        lo, n = window.offset - self._sum_start, window.length
        # apply_model weights on the model's device, then accumulates on the mix's.
        self._sum[..., lo:lo + n] += (self._weight[:n] * out).cpu()
        self._sum_weight[lo:lo + n] += self._weight[:n].cpu()

    def _finalise(self, until: int) -> None:
        count = until - self._sum_start
        final = self._sum[..., :count] / self._sum_weight[:count]
        self._final = torch.cat([self._final, final], -1)
        self._sum, self._sum_weight = self._sum[..., count:], self._sum_weight[count:]
        self._sum_start = self.final_end = until


def draw_delays(sub_models: tp.Sequence[torch.nn.Module], length: int, shifts: int,
                overlap: float, seed: int) -> list[list[int]]:
    """Each sub-model's pass delays (`max_shift - offset`, one per shift; `[0]` without
    shifts), as `random.seed(seed); apply_model(...)` would draw the offsets.

    apply_model draws a shift's offset, runs that shift's windows, then draws the next.
    Its windows draw from the same `random` state: HT-Demucs' cross-transformer picks a
    random shift of its sin position embedding on every forward, even in eval mode
    (`randrange(sin_random_shift + 1)`, 0 for released models, but it consumes state).
    So those draws are replayed here, one forward per window, as apply_model runs them.
    """
    if not shifts:
        return [[0] for _ in sub_models]
    rng = random.Random(seed)
    delays = []
    for sub_model in sub_models:
        max_shift = int(0.5 * sub_model.samplerate)
        forward_draws = [module.sin_random_shift + 1 for module in sub_model.modules()
                         if isinstance(module, CrossTransformerEncoder) and module.emb == "sin"]
        model_delays = []
        for _ in range(shifts):
            delay = max_shift - rng.randint(0, max_shift)
            for _ in range(window_count(sub_model, length + delay, overlap)):
                for bound in forward_draws:
                    rng.randrange(bound)
            model_delays.append(delay)
        delays.append(model_delays)
    return delays


class StreamingSeparator:
    """`apply_model(model, mix[None], shifts, split=True, overlap)` over a mix of `length`
    samples that arrives in blocks, for the sources named in `sources`.

    `seed` seeds the shifts as `random.seed(seed)` before apply_model would. Sub-models
    of a bag whose weights for every wanted source are 0 are skipped (their shifts are
    still drawn, so the others' match): they add nothing to those sources.
    """

    def __init__(self, model: torch.nn.Module, length: int, sources: tp.Sequence[str], *,
                 shifts: int = 0, overlap: float = 0.25, seed: int = 0, batch_segments: int = 1,
                 device: str = "cpu", forward: Forward = plain_forward,
                 on_windows: tp.Optional[tp.Callable[[int], None]] = None):
        if isinstance(model, BagOfModels):
            sub_models, weights = list(model.models), model.weights
        else:
            sub_models, weights = [model], [[1.0] * len(model.sources)]
        wanted = [model.sources.index(name) for name in sources]
        self.length = length
        self.channels: int = model.audio_channels
        self.shifts = shifts
        self._overlap = overlap
        self._forward = forward
        self._on_windows = on_windows
        self._weights = [[row[k] for k in wanted] for row in weights]
        self._totals = [sum(row[k] for row in weights) for k in wanted]
        if 0 in self._totals:
            raise ValueError("a wanted source has weight 0 in every sub-model")
        delays = draw_delays(sub_models, length, shifts, overlap, seed)
        self._passes: list[_Pass] = []
        for index, sub_model in enumerate(sub_models):
            if length > 0 and any(self._weights[index]):
                self._passes += [_Pass(sub_model, index, wanted, delay, length, overlap,
                                       batch_segments, torch.device(device))
                                 for delay in delays[index]]

    @property
    def window_count(self) -> int:
        """Model windows the whole run takes (for progress)."""
        return sum(window_count(p.model, p.length, self._overlap) for p in self._passes)

    def run(self, mix_blocks: tp.Iterable[torch.Tensor]) -> tp.Iterator[torch.Tensor]:
        """The estimate, `[sources, channels, frames]` blocks covering the mix in order,
        from the mix's `[channels, frames]` blocks (which must add up to `length`)."""
        mix = MixBuffer(iter(mix_blocks), self.length, self.channels)
        emitted = 0
        while emitted < self.length:
            pending = [p for p in self._passes if not p.done]
            if pending:
                laggard = min(pending, key=lambda p: p.ready_until)
                windows = laggard.step(mix, self._forward)
                mix.release(min(p.needs_from for p in self._passes))
                if self._on_windows is not None:
                    self._on_windows(windows)
            ready = min(p.ready_until for p in self._passes)
            if ready > emitted:
                yield self._combine(emitted, ready)
                emitted = ready

    @torch.inference_mode()
    def _combine(self, start: int, stop: int) -> torch.Tensor:
        # The same operations in the same order as apply_model, so rounding matches too.
        estimates: tp.Union[float, torch.Tensor] = 0.
        for index in sorted({p.model_index for p in self._passes}):
            passes = [p for p in self._passes if p.model_index == index]
            if self.shifts:
                out: tp.Union[float, torch.Tensor] = 0.
                for shift_pass in passes:
                    out += shift_pass.take(start, stop)
                out /= self.shifts
            else:
                out = passes[0].take(start, stop)
            assert isinstance(out, torch.Tensor)
            for k, weight in enumerate(self._weights[index]):
                out[k] *= weight
            estimates += out
        assert isinstance(estimates, torch.Tensor)
        for k, total in enumerate(self._totals):
            estimates[k] /= total
        return estimates
