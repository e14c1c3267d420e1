"""The separation engine as plain functions over arrays."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.audio_factory import music_like
from tests.conftest import make_tiny_htdemucs
from worker.engine import SeparationOptions, apply_normalised, separate_waveform


@pytest.fixture(scope="module")
def model():
    return make_tiny_htdemucs()


@pytest.mark.parametrize("samplerate,channels", [(44100, 2), (48000, 1), (22050, 2), (8000, 1)])
def test_stems_come_back_at_the_input_rate_length_and_channels(model, samplerate, channels):
    wav = music_like(samplerate, channels, seconds=0.7)
    sources = separate_waveform(model, wav, samplerate)
    assert list(sources) == model.sources
    for stem in sources.values():
        assert stem.shape == wav.shape and stem.dtype == np.float32 and np.isfinite(stem).all()


def test_mono_is_separated_as_the_same_signal_on_both_model_channels(model):
    mono = music_like(44100, 1, seconds=0.7)
    from_mono = separate_waveform(model, mono, 44100)
    from_dual = separate_waveform(model, np.repeat(mono, 2, axis=1), 44100)
    for name in model.sources:
        folded = from_dual[name].mean(axis=1, keepdims=True)
        assert np.abs(from_mono[name] - folded).max() < 1e-6


def test_digital_silence_gives_silent_stems_not_nan(model):
    sources = separate_waveform(model, np.zeros((44100, 2), dtype=np.float32), 44100)
    for stem in sources.values():
        assert np.isfinite(stem).all() and np.abs(stem).max() < 1e-6


def test_shifts_are_seeded_so_a_job_is_reproducible(model):
    mix = torch.from_numpy(music_like(44100, 2, seconds=0.5).T.copy())
    options = SeparationOptions(shifts=2, seed=7)
    first = apply_normalised(model, mix, options)
    again = apply_normalised(model, mix, options)
    other_seed = apply_normalised(model, mix, SeparationOptions(shifts=2, seed=8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed)


def test_progress_rises_to_one_over_the_segments(model):
    seen = []
    mix = torch.from_numpy(music_like(44100, 2, seconds=25.0).T.copy())
    apply_normalised(model, mix, SeparationOptions(), progress=seen.append)
    assert len(seen) >= 3 and seen == sorted(seen) and seen[-1] == pytest.approx(1.0)
