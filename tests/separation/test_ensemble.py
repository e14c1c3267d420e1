"""Ensembling across models (`demix.separation.ensemble`): every algorithm equals a whole-array
reference written from MSST's `average_waveforms` (librosa's STFT spelled out in NumPy) at
any length and wherever the block boundaries fall, the file version equals the array
version, bad requests are refused, and memory does not grow with the track."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from demix.errors import BadRequest
from demix.separation import ensemble
from demix.separation.ensemble import ALGORITHMS, check_algorithm, ensemble_arrays, ensemble_files

TOLERANCE = 1e-5  # max abs difference on audio in [-1, 1]


# -- the reference: MSST's semantics on whole arrays ---------------------------------------

N_FFT, HOP = 2048, 1024
WINDOW = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # scipy's periodic 'hann'


def reference_stft(signal: np.ndarray) -> np.ndarray:
    """librosa.stft(signal, n_fft=2048, hop_length=1024): centred with zeros, `[bins, frames]`."""
    padded = np.pad(signal, N_FFT // 2)
    frames = 1 + (len(padded) - N_FFT) // HOP
    return np.stack([np.fft.rfft(WINDOW * padded[k * HOP:k * HOP + N_FFT]) for k in range(frames)], axis=1)


def reference_istft(spectrum: np.ndarray, length: int) -> np.ndarray:
    """librosa.istft(spectrum, hop_length=1024, length=length): overlap-add divided by the
    squared window's overlap-add where that is above `tiny`, the centring cut off."""
    frames = spectrum.shape[1]
    signal = np.zeros(N_FFT + HOP * (frames - 1))
    norm = np.zeros_like(signal)
    for k in range(frames):
        signal[k * HOP:k * HOP + N_FFT] += WINDOW * np.fft.irfft(spectrum[:, k], n=N_FFT)
        norm[k * HOP:k * HOP + N_FFT] += WINDOW ** 2
    nonzero = norm > np.finfo(norm.dtype).tiny
    signal[nonzero] /= norm[nonzero]
    signal = signal[N_FFT // 2:]
    return np.pad(signal, (0, max(0, length - len(signal))))[:length]


def pick_by_magnitude(values: np.ndarray, smallest: bool) -> np.ndarray:
    """MSST's lambda_min/lambda_max(key=np.abs) and absmax along axis 0."""
    index = np.abs(values).argmin(axis=0) if smallest else np.abs(values).argmax(axis=0)
    return np.take_along_axis(values, index[None], axis=0)[0]


def reference_ensemble(waves: list[np.ndarray], algorithm: str, weights=None) -> np.ndarray:
    """MSST's average_waveforms on `[channels, frames]` tracks of equal shape."""
    tracks = np.array(waves, dtype=np.float64)
    weights = np.ones(len(waves)) if weights is None else np.asarray(weights, dtype=np.float64)
    kind, domain = algorithm.split("_")
    if domain == "fft":
        tracks = np.array([[reference_stft(channel) for channel in track] for track in tracks])
    if kind == "avg":
        combined = sum(weight * track for weight, track in zip(weights, tracks)) / weights.sum()
    elif kind == "median":
        combined = np.median(tracks, axis=0)
    else:
        combined = pick_by_magnitude(tracks, smallest=kind == "min")
    if domain == "fft":
        combined = np.array([reference_istft(channel, waves[0].shape[-1]) for channel in combined])
    return combined


def tracks(count: int, frames: int, channels: int = 2, seed: int = 0) -> list[np.ndarray]:
    """`count` different music-like float32 tracks: shared tones, own noise and level."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames) / 44100
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 3000 * t)
    return [np.clip(tone * (0.5 + 0.3 * i) + 0.2 * rng.standard_normal((channels, frames)), -1, 1)
            .astype(np.float32) for i in range(count)]


# -- the reference itself -------------------------------------------------------------------

def test_the_reference_stft_round_trips_and_has_librosas_frame_count():
    signal = tracks(1, 5000, channels=1)[0][0].astype(np.float64)
    spectrum = reference_stft(signal)
    assert spectrum.shape == (N_FFT // 2 + 1, 1 + 5000 // HOP)
    np.testing.assert_allclose(reference_istft(spectrum, 5000), signal, atol=1e-12)


# -- every algorithm against the reference ------------------------------------------------

@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("count, weights", [(2, None), (3, None), (3, [1, 2, 0.5]), (2, [0.25, 3])])
def test_every_algorithm_equals_msst_with_and_without_weights(algorithm, count, weights):
    waves = tracks(count, 44_101)
    result = ensemble_arrays(waves, algorithm, weights, block_frames=4097)
    expected = reference_ensemble(waves, algorithm, weights)
    assert result.shape == expected.shape == (2, 44_101)
    assert np.abs(result - expected).max() <= TOLERANCE


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("frames", [0, 1, 1000, 1023, 1024, 1025, 2047, 2048, 2049, 3071, 5000])
def test_short_and_odd_lengths_equal_msst(algorithm, frames):
    waves = tracks(3, frames, seed=frames)
    result = ensemble_arrays(waves, algorithm, [1, 2, 0.5], block_frames=1024)
    expected = reference_ensemble(waves, algorithm, [1, 2, 0.5])
    assert result.shape == (2, frames)
    assert frames == 0 or np.abs(result - expected).max() <= TOLERANCE


@pytest.mark.parametrize("algorithm", ["avg_fft", "median_fft", "min_fft", "max_fft", "max_wave"])
@pytest.mark.parametrize("block_frames", [1, 1023, 1024, 2048, 4097, 10_000, 1 << 20])
def test_block_boundaries_anywhere_give_the_whole_array_result(algorithm, block_frames):
    waves = tracks(3, 12_345, channels=1, seed=3)
    result = ensemble_arrays(waves, algorithm, block_frames=block_frames)
    assert np.abs(result - reference_ensemble(waves, algorithm)).max() <= TOLERANCE


def test_min_and_max_keep_the_sign_and_the_first_model_on_a_tie():
    waves = [np.array([[0.5, -0.2, 0.3]]), np.array([[-0.7, 0.1, -0.3]])]
    np.testing.assert_array_equal(ensemble_arrays(waves, "max_wave"), [[-0.7, -0.2, 0.3]])
    np.testing.assert_array_equal(ensemble_arrays(waves, "min_wave"), [[0.5, 0.1, 0.3]])


def test_weights_count_only_for_the_averages():
    waves = tracks(3, 3000)
    for algorithm in ("median_wave", "max_fft"):
        np.testing.assert_array_equal(ensemble_arrays(waves, algorithm, [1, 5, 9]),
                                      ensemble_arrays(waves, algorithm))
    assert np.abs(ensemble_arrays(waves, "avg_wave", [0, 1, 0]) - waves[1]).max() < 1e-7


# -- files ------------------------------------------------------------------------------

def written(path, wave: np.ndarray, rate: int = 44100):
    sf.write(str(path), wave.T, rate, subtype="FLOAT")
    return path


@pytest.mark.parametrize("algorithm", ["avg_wave", "median_wave", "avg_fft", "min_fft"])
def test_the_file_version_writes_the_array_version_as_float32(tmp_path, algorithm):
    waves = tracks(3, 20_001, seed=7)
    paths = [written(tmp_path / f"in{i}.wav", wave) for i, wave in enumerate(waves)]
    progress = []
    ensemble_files(paths, tmp_path / "out.wav", algorithm, [1, 2, 0.5], block_frames=4097,
                   progress=progress.append)
    out, rate = sf.read(str(tmp_path / "out.wav"), dtype="float32", always_2d=True)
    assert rate == 44100 and sf.info(str(tmp_path / "out.wav")).subtype == "FLOAT"
    expected = ensemble_arrays(waves, algorithm, [1, 2, 0.5])
    assert out.shape == expected.T.shape
    assert np.abs(out - expected.T).max() <= TOLERANCE
    assert progress == sorted(progress) and progress[-1] == 1.0 and len(progress) > 1


def test_an_ensemble_that_fails_midway_leaves_no_output(tmp_path):
    paths = [written(tmp_path / f"in{i}.wav", wave) for i, wave in enumerate(tracks(2, 20_000))]

    def interrupt(fraction: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensemble_files(paths, tmp_path / "out.wav", "avg_fft", block_frames=4096, progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in0.wav", "in1.wav"]


def test_mono_files_ensemble_to_mono(tmp_path):
    waves = tracks(2, 3000, channels=1)
    paths = [written(tmp_path / f"in{i}.wav", wave) for i, wave in enumerate(waves)]
    ensemble_files(paths, tmp_path / "out.wav", "median_fft")
    out, _ = sf.read(str(tmp_path / "out.wav"), always_2d=True)
    assert np.abs(out.T - reference_ensemble(waves, "median_fft")).max() <= TOLERANCE


# -- refusals -----------------------------------------------------------------------------

def test_an_unknown_algorithm_is_a_bad_request_naming_the_choices():
    assert check_algorithm("max_fft") == "max_fft"
    with pytest.raises(BadRequest, match="unknown ensemble algorithm 'mean_fft'.*avg_wave"):
        ensemble_arrays(tracks(2, 10), "mean_fft")


@pytest.mark.parametrize("weights, message", [([1, 2], "2 given for 3 inputs"), ([1, 2, 3, 4], "4 given"),
                                              ([1, -1, 1], "non-negative"), ([0, 0, 0], "not all 0"),
                                              ([1, float("nan"), 1], "finite")])
def test_bad_weights_are_a_bad_request(weights, message):
    with pytest.raises(BadRequest, match=message):
        ensemble_arrays(tracks(3, 10), "avg_fft", weights)


def test_inputs_of_unequal_length_channels_or_rate_are_refused_as_msst_does(tmp_path):
    with pytest.raises(BadRequest, match=r"same lengths \(frames\); got \[100, 99\]"):
        ensemble_arrays([np.zeros((2, 100)), np.zeros((2, 99))], "avg_wave")
    with pytest.raises(BadRequest, match="at least one input"):
        ensemble_arrays([], "avg_wave")
    a = written(tmp_path / "a.wav", np.zeros((2, 100)))
    with pytest.raises(BadRequest, match=r"same channel counts; got \[2, 1\]"):
        ensemble_files([a, written(tmp_path / "b.wav", np.zeros((1, 100)))], tmp_path / "o.wav", "avg_wave")
    with pytest.raises(BadRequest, match=r"same sample rates; got \[44100, 48000\]"):
        ensemble_files([a, written(tmp_path / "c.wav", np.zeros((2, 100)), 48000)], tmp_path / "o.wav", "avg_fft")
    assert not (tmp_path / "o.wav").exists()


# -- memory -------------------------------------------------------------------------------

def write_noise(path, minutes: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    frames = int(minutes * 60 * 44100)
    with sf.SoundFile(str(path), "w", 44100, 2, "FLOAT", format="WAV") as out:
        for start in range(0, frames, 1 << 20):
            out.write((0.2 * rng.standard_normal((min(1 << 20, frames - start), 2))).astype(np.float32))


def peak_traced_bytes(tmp_path, minutes: float, algorithm: str, block_frames: int = ensemble.BLOCK_FRAMES) -> int:
    paths = [tmp_path / f"{minutes}-{i}.wav" for i in range(3)]
    for seed, path in enumerate(paths):
        write_noise(path, minutes, seed)
    tracemalloc.start()
    try:
        ensemble_files(paths, tmp_path / f"{minutes}-out.wav", algorithm, block_frames=block_frames)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_the_streamed_fft_ensemble_takes_no_more_memory_for_an_eight_times_longer_track(tmp_path):
    short = peak_traced_bytes(tmp_path, 1, "median_fft")
    long = peak_traced_bytes(tmp_path, 8, "median_fft")
    assert long / short <= 1.1, (short, long)
    assert short < 64 * 2 ** 20  # a 1-minute stereo float64 track alone is 42 MiB


def test_the_streamed_ensemble_holds_blocks_not_the_track(tmp_path):
    """A fast stand-in for the check above: 6 s against 24 s in small blocks."""
    short = peak_traced_bytes(tmp_path, 0.1, "avg_fft", block_frames=1 << 13)
    long = peak_traced_bytes(tmp_path, 0.4, "avg_fft", block_frames=1 << 13)
    assert long / short <= 1.1, (short, long)
