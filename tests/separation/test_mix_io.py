"""Audio around the model (`demix.separation.mix_io`): the first pass's statistics merged across
blocks exactly, mono and multichannel input folded to the model's stereo, and stems and
the mix read back at the input's exact length, rate and channels.

The separation these feed is compared with demucs' own in tests/separation/test_engine.py."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from demix.separation import mix_io
from demix.separation.mix_io import MixReader, MixStats, StemOutput, measure_mix, model_rate_blocks


def written(path, samples: np.ndarray, rate: int) -> object:
    sf.write(str(path), samples, rate, subtype="FLOAT")
    return path


def noise(frames: int, channels: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((frames, channels)) * 0.2 + 0.05).astype(np.float32)


def test_the_statistics_merged_block_by_block_equal_the_whole_files(tmp_path, monkeypatch):
    monkeypatch.setattr(mix_io, "BLOCK_FRAMES", 1000)  # 25 blocks, the last one short
    samples = noise(24_321, 2)
    path = written(tmp_path / "mix.wav", samples, 44100)
    seen, progress = [], []
    stats = measure_mix(path, 44100, progress=progress.append, on_block=seen.append)
    reference = samples.astype(np.float64).mean(axis=1)
    assert stats.length == len(samples) == sum(len(block) for block in seen) and len(seen) == 25
    assert stats.mean == pytest.approx(reference.mean(), rel=1e-9)
    assert stats.std == pytest.approx(reference.std(ddof=1), rel=1e-9)  # unbiased, like torch.std
    assert progress == sorted(progress) and progress[-1] == 1.0


def test_one_frame_has_no_deviation_and_silence_normalises_to_silence(tmp_path):
    stats = measure_mix(written(tmp_path / "one.wav", np.full((1, 2), 0.5, np.float32), 8000), 8000)
    assert (stats.length, stats.std) == (1, 0.0)
    silence = MixStats(length=4, mean=0.0, std=0.0)
    normalised = silence.normalise(np.zeros((4, 2), np.float32))
    assert normalised.shape == (2, 4) and torch.isfinite(normalised).all()


def test_normalising_and_back_gives_the_block_again_channels_first():
    stats = MixStats(length=3, mean=0.1, std=0.5)
    block = np.array([[0.2, -0.3], [0.4, 0.0], [-1.0, 0.7]], np.float32)
    restored = stats.denormalise(stats.normalise(block))
    np.testing.assert_allclose(restored.numpy(), block.T, atol=1e-6)


def test_mono_is_doubled_and_other_layouts_are_folded_by_the_matrix(tmp_path):
    mono = noise(5000, 1)
    block = np.concatenate(list(model_rate_blocks(written(tmp_path / "mono.wav", mono, 8000), 8000)))
    np.testing.assert_array_equal(block, np.repeat(mono, 2, axis=1))

    quad = noise(5000, 4, seed=1)
    matrix = np.array([[1, 0], [0, 1], [0.5, 0], [0, 0.5]], np.float32)
    folded = np.concatenate(list(model_rate_blocks(written(tmp_path / "quad.wav", quad, 8000), 8000, matrix)))
    np.testing.assert_allclose(folded, quad @ matrix, atol=1e-6)


def test_the_mix_at_another_rate_has_the_resampled_length_on_every_pass(tmp_path, monkeypatch):
    monkeypatch.setattr(mix_io, "BLOCK_FRAMES", 4096)
    path = written(tmp_path / "48k.wav", noise(48_000, 2), 48_000)
    first = sum(len(block) for block in model_rate_blocks(path, 44_100))
    second = measure_mix(path, 44_100).length
    assert first == second and abs(first - 44_100) <= 1


def test_the_mix_is_read_in_exact_blocks_and_padded_with_silence_past_its_end(tmp_path, monkeypatch):
    monkeypatch.setattr(mix_io, "BLOCK_FRAMES", 1000)
    samples = noise(2500, 2)
    with MixReader(written(tmp_path / "mix.wav", samples, 8000), 8000) as reader:
        blocks = [reader.read(700) for _ in range(4)]
    assert [len(block) for block in blocks] == [700] * 4
    joined = np.concatenate(blocks)
    np.testing.assert_array_equal(joined[:2500], samples)
    assert not joined[2500:].any()


def test_a_stem_is_brought_to_the_inputs_exact_length_and_mono(tmp_path):
    output = StemOutput(model_samplerate=8000, samplerate=8000, channels=1, frames=1000, subtype="PCM_16")
    stereo = np.stack([np.full(600, 0.5), np.full(600, 0.25)], axis=1).astype(np.float32)
    first = output.convert(stereo, last=False)
    rest = output.convert(stereo[:300], last=True)  # 100 frames short: padded
    assert first.shape == (600, 1) and rest.shape == (400, 1) and output.written == 1000
    assert first.dtype.kind == "i" and np.all(first == round(0.375 * 32768))  # the channels' mean
    assert not rest[300:].any()

    longer = StemOutput(8000, 8000, 2, frames=500, subtype="FLOAT")
    assert len(longer.convert(stereo, last=True)) == 500  # trimmed
    assert len(longer.convert(stereo, last=True)) == 0  # nothing past the input's length
