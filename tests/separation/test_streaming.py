"""The streamed apply_model against demucs' own, on the real HT-Demucs class at tiny size.

Models get a 1 s segment (the override `BagOfModels(segment=...)` exists for) so that
several segments, short tails and shifts all run in seconds.
"""
from __future__ import annotations

import random
import typing as tp

import pytest
import torch
from demucs.apply import BagOfModels, apply_model

from testkit.tiny_models import make_tiny_htdemucs
from demix.separation.streaming import StreamingSeparator, segment_length

# Each runs a separation model over audio (seconds each): outside the fast set.
pytestmark = pytest.mark.slow

SEGMENT_S = 1.0
SEGMENT = 44100  # samples in a 1 s segment
TOLERANCE = 1e-5  # max abs difference to apply_model at fp32


def tiny_bag(weights: tp.Optional[list[list[float]]] = None, count: int = 1) -> BagOfModels:
    return BagOfModels([make_tiny_htdemucs(seed) for seed in range(count)], weights=weights,
                       segment=SEGMENT_S)


def reference(model: torch.nn.Module, mix: torch.Tensor, shifts: int = 0, seed: int = 0) -> torch.Tensor:
    random.seed(seed)
    with torch.no_grad():
        return apply_model(model, mix[None], shifts=shifts, split=True, overlap=0.25)[0]


def streamed(model: torch.nn.Module, mix: torch.Tensor, sources: tp.Optional[list[str]] = None,
             block: int = 10007, **kwargs: tp.Any) -> torch.Tensor:
    """Feed `mix` in blocks of `block` samples (unrelated to the segment on purpose)."""
    separator = StreamingSeparator(model, mix.shape[-1], sources or model.sources, **kwargs)
    blocks = (mix[:, start:start + block] for start in range(0, mix.shape[-1], block))
    return torch.cat(list(separator.run(blocks)), dim=-1)


def test_the_tiny_model_segment_is_one_second():
    assert segment_length(tiny_bag().models[0]) == SEGMENT


@pytest.mark.parametrize("length", [1, 4410, SEGMENT, 3 * SEGMENT + 1234],
                         ids=["1-sample", "shorter-than-a-segment", "one-segment", "segments-and-a-tail"])
def test_streamed_output_equals_apply_model(length):
    model = tiny_bag()
    mix = torch.randn(2, length)
    out = streamed(model, mix)
    assert out.shape == (4, 2, length)
    assert (out - reference(model, mix)).abs().max() < TOLERANCE


@pytest.mark.parametrize("length", [4410, 3 * SEGMENT + 1234])
def test_shifted_passes_equal_a_seeded_apply_model(length):
    model = tiny_bag()
    mix = torch.randn(2, length)
    out = streamed(model, mix, shifts=2, seed=7)
    assert (out - reference(model, mix, shifts=2, seed=7)).abs().max() < TOLERANCE
    assert (out - reference(model, mix, shifts=2, seed=8)).abs().max() > 1e-3


def test_a_single_model_outside_a_bag_streams_like_apply_model():
    model = make_tiny_htdemucs()
    model.segment = SEGMENT_S  # what BagOfModels(segment=...) sets
    mix = torch.randn(2, 2 * SEGMENT + 99)
    out = streamed(model, mix, shifts=1, seed=2)
    assert (out - reference(model, mix, shifts=1, seed=2)).abs().max() < TOLERANCE


@pytest.mark.parametrize("weights", [[[1, 0, 0, 0], [0, 1, 1, 1]], [[0.3, 1, 2, 0.5], [1.5, 0.25, 1, 1]]],
                         ids=["one-hot", "mixed"])
@pytest.mark.parametrize("shifts", [0, 2])
def test_a_bag_combines_its_models_like_apply_model(weights, shifts):
    model = tiny_bag(weights, count=2)
    mix = torch.randn(2, 2 * SEGMENT + 321)
    out = streamed(model, mix, shifts=shifts, seed=3)
    assert (out - reference(model, mix, shifts=shifts, seed=3)).abs().max() < TOLERANCE


class CountingForward:
    """A forward that counts the windows each sub-model sees."""

    def __init__(self, model: BagOfModels):
        self.index = {id(sub_model): i for i, sub_model in enumerate(model.models)}
        self.windows = [0] * len(model.models)
        self.calls = 0

    def __call__(self, model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
        self.windows[self.index[id(model)]] += windows.shape[0]
        self.calls += 1
        return model(windows)


@pytest.mark.parametrize("shifts", [0, 2])
def test_one_source_of_a_bag_of_specialists_runs_only_its_specialist(shifts):
    one_hot = [[1.0 if i == k else 0.0 for k in range(4)] for i in range(4)]  # like htdemucs_ft
    model = tiny_bag(one_hot, count=4)
    mix = torch.randn(2, 2 * SEGMENT + 321)
    only_bass, every_source = CountingForward(model), CountingForward(model)
    bass = streamed(model, mix, sources=["bass"], shifts=shifts, seed=5, forward=only_bass)
    streamed(model, mix, shifts=shifts, seed=5, forward=every_source)
    assert only_bass.windows == [0, every_source.windows[1], 0, 0] and all(every_source.windows)
    full = reference(model, mix, shifts=shifts, seed=5)
    assert (bass[0] - full[model.sources.index("bass")]).abs().max() < TOLERANCE


def test_batched_segments_equal_one_by_one():
    model = tiny_bag()
    mix = torch.randn(2, 5 * SEGMENT + 99)
    one_by_one, batched = CountingForward(model), CountingForward(model)
    single = streamed(model, mix, forward=one_by_one)
    stacked = streamed(model, mix, batch_segments=3, forward=batched)
    assert one_by_one.calls == 7 and batched.calls == 3
    assert (single - stacked).abs().max() < TOLERANCE


@pytest.mark.parametrize("shifts", [0, 2])
def test_the_mix_is_read_a_bounded_distance_ahead_of_the_output(shifts):
    """Memory stays flat: the separator never holds more than about a segment (plus
    the shift range) of mix that it has not yet turned into output."""
    model = tiny_bag()
    length, block = 30 * SEGMENT, 4096
    mix = torch.randn(2, length)
    separator = StreamingSeparator(model, length, model.sources, shifts=shifts)
    read, emitted, leads = 0, 0, []

    def blocks() -> tp.Iterator[torch.Tensor]:
        nonlocal read
        for start in range(0, length, block):
            read += block
            leads.append(read - emitted)
            yield mix[:, start:start + block]

    for out in separator.run(blocks()):
        emitted += out.shape[-1]
    # The laggard pass runs next, so no pass gets more than a stride ahead of the output,
    # and each reads at most a segment ahead of its own output.
    bound = SEGMENT + int(0.75 * SEGMENT) + block
    assert emitted == length and max(leads) <= bound < length / 10
