"""The streaming engine, file in and stems out, against the whole-track computation it
replaces (`demucs.separate`'s: normalise, apply_model, de-normalise, resample)."""
from __future__ import annotations

import collections
import random

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from demucs.apply import BagOfModels, apply_model

from demix.audio.io import AudioReader, AudioWriter, quantize
from demix.errors import SeparationFailed
from testkit.synthetic_audio import music_like, write_wav
from testkit.tiny_models import make_tiny_htdemucs
from testkit.memory_sink import MemorySink, separate
from tests.support.precision import assert_bf16_close_to_fp32, assert_falls_back_to_fp32, assert_gpu_close_to_cpu
from demix.separation import forward as forward_module
from demix.separation.engine import separate_file
from demix.separation.forward import ModelForward
from demix.separation.mix_io import BLOCK_FRAMES, RESAMPLE_QUALITY

# Each runs a separation model over audio (seconds each): outside the fast set.
pytestmark = pytest.mark.slow

SEGMENT = 44100  # the test model's segment: 1 s at 44.1 kHz


@pytest.fixture(scope="module")
def model() -> BagOfModels:
    """The tiny HT-Demucs with a 1 s segment, so many segments run in seconds."""
    return BagOfModels([make_tiny_htdemucs()], segment=SEGMENT / 44100)


def whole_track_reference(model: torch.nn.Module, path, shifts: int = 0,
                          seed: int = 0) -> dict[str, np.ndarray]:
    """The engine before streaming: the whole track in memory through apply_model."""
    wav, samplerate = sf.read(str(path), dtype="float32", always_2d=True)
    stereo = np.repeat(wav, 2, axis=1) if wav.shape[1] == 1 else wav
    if samplerate != model.samplerate:
        stereo = soxr.resample(stereo, samplerate, model.samplerate, quality=RESAMPLE_QUALITY)
    mix = torch.from_numpy(np.ascontiguousarray(stereo.T))
    ref = mix.mean(0)
    mean, std = ref.mean(), ref.std() + 1e-8
    random.seed(seed)
    with torch.no_grad():
        out = apply_model(model, ((mix - mean) / std)[None], shifts=shifts, split=True)[0] * std + mean
    stems = {}
    for name, estimate in zip(model.sources, out):
        stem = estimate.T.numpy()
        if samplerate != model.samplerate:
            stem = soxr.resample(stem, model.samplerate, samplerate, quality=RESAMPLE_QUALITY)
        stem = np.pad(stem, ((0, max(0, len(wav) - len(stem))), (0, 0)))[:len(wav)]
        stems[name] = stem.mean(axis=1, keepdims=True) if wav.shape[1] == 1 else stem
    return stems


@pytest.mark.parametrize("samplerate,channels", [(44100, 2), (48000, 1), (22050, 2), (8000, 1)])
def test_stems_come_back_at_the_input_rate_length_and_channels(model, tmp_path, samplerate, channels):
    path = write_wav(tmp_path / "in.wav", samplerate, channels, seconds=2.3)
    sink = separate(model, path)
    for name in model.sources:
        assert sink.formats[name] == (samplerate, channels, "PCM_16", sf.info(str(path)).frames)
        stem = np.concatenate(sink.blocks[name])
        assert stem.shape == (sf.info(str(path)).frames, channels) and stem.dtype == np.int32


@pytest.mark.parametrize("samplerate,channels,shifts", [(44100, 2, 0), (44100, 2, 2), (48000, 1, 0),
                                                        (22050, 2, 0)])
def test_streamed_stems_match_the_whole_track_computation(model, tmp_path, samplerate, channels, shifts):
    # Float in, float out: what is compared is the separation, not the quantisation.
    path = write_wav(tmp_path / "in.wav", samplerate, channels, seconds=3.4, subtype="FLOAT")
    sink = separate(model, path, shifts=shifts, seed=3)
    reference = whole_track_reference(model, path, shifts=shifts, seed=3)
    for name in model.sources:
        # Only the mean and deviation differ (float64 blocks here, float32 in torch).
        assert np.abs(sink.stem(name) - reference[name]).max() < 1e-5


@pytest.mark.parametrize("seconds", [1 / 44100, 0.1], ids=["1-sample", "100ms"])
def test_inputs_shorter_than_a_segment_work(model, tmp_path, seconds):
    path = write_wav(tmp_path / "in.wav", 44100, 2, seconds=seconds, subtype="FLOAT")
    sink = separate(model, path)
    for name in model.sources:
        stem = sink.stem(name)
        assert stem.shape == (round(seconds * 44100), 2) and np.isfinite(stem).all()
    if seconds > 1 / 44100:  # one sample has no deviation: torch's std is NaN there
        reference = whole_track_reference(model, path)
        for name in model.sources:
            assert np.abs(sink.stem(name) - reference[name]).max() < 1e-5


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24"])
@pytest.mark.parametrize("channels", [1, 2])
def test_a_stem_and_the_rest_add_up_to_the_input_exactly(model, tmp_path, subtype, channels):
    path = write_wav(tmp_path / "in.wav", 44100, channels, seconds=2.5, subtype=subtype)
    sink = separate(model, path, stems="vocals")
    assert list(sink.blocks) == ["vocals", "no_vocals"]
    mix, _ = sf.read(str(path), dtype="float32", always_2d=True)
    vocals, rest = (np.concatenate(sink.blocks[name]) for name in ("vocals", "no_vocals"))
    assert np.array_equal(vocals + rest, quantize(mix, subtype))
    assert np.abs(vocals).max() > 0


def test_stems_are_published_only_after_every_stem_is_complete(model, tmp_path):
    path = write_wav(tmp_path / "in.wav", 44100, 2, seconds=1.5)
    sink = separate(model, path, stems="drums")
    assert sink.events == [("open", "drums"), ("open", "no_drums"), ("close", "drums"),
                           ("close", "no_drums"), ("publish", "drums"), ("publish", "no_drums")]


def test_a_failed_run_closes_its_stems_and_publishes_none(model, tmp_path):
    path = write_wav(tmp_path / "in.wav", 44100, 2, seconds=1.5)
    sink = MemorySink()

    def failing_forward(_self: ModelForward, _model: torch.nn.Module,
                        _windows: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError), pytest.MonkeyPatch.context() as patch:
        patch.setattr(ModelForward, "__call__", failing_forward)
        separate_file(model, path, "all", sink)
    closed = [name for event, name in sink.events if event == "close"]
    assert closed == model.sources and not [event for event, _ in sink.events if event == "publish"]


def test_digital_silence_gives_silent_stems_not_nan(model, tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(str(path), np.zeros((44100, 2), dtype=np.float32), 44100, subtype="FLOAT")
    sink = separate(model, path)
    for name in model.sources:
        stem = sink.stem(name)
        assert np.isfinite(stem).all() and np.abs(stem).max() < 1e-6


def test_shifts_are_seeded_so_a_job_is_reproducible(model, tmp_path):
    path = write_wav(tmp_path / "in.wav", 44100, 2, seconds=1.5, subtype="FLOAT")
    first, again = (separate(model, path, shifts=2, seed=7).stem("bass") for _ in range(2))
    other_seed = separate(model, path, shifts=2, seed=8).stem("bass")
    assert np.array_equal(first, again) and not np.array_equal(first, other_seed)


def test_an_unknown_source_fails_with_a_message(tmp_path):
    two_sources = BagOfModels([make_tiny_htdemucs()])
    two_sources.sources = ["drums", "bass"]
    path = write_wav(tmp_path / "in.wav", 44100, 2, seconds=0.2)
    with pytest.raises(SeparationFailed) as caught:
        separate(two_sources, path, stems="vocals")
    assert caught.value.code == "unknown_source" and "drums, bass" in caught.value.message


def test_progress_rises_to_one_over_the_segments(model, tmp_path):
    path = write_wav(tmp_path / "in.wav", 44100, 2, seconds=6.0)
    seen: list[float] = []
    separate_file(model, path, "all", MemorySink(), progress=seen.append)
    assert len(seen) >= 8 and seen == sorted(seen) and seen[-1] == 1.0


def test_the_input_is_read_a_bounded_distance_ahead_of_the_written_stems(model, tmp_path, monkeypatch):
    """Memory stays flat: after the first pass (which keeps only running sums), no read
    of the input gets more than about a segment ahead of what every stem has written."""
    path = write_wav(tmp_path / "in.wav", 44100, 2, seconds=30.0)
    sink = MemorySink()
    positions: dict[int, int] = collections.defaultdict(int)
    leads: dict[int, list[int]] = collections.defaultdict(list)
    requests: dict[int, set[int]] = collections.defaultdict(set)
    read = AudioReader.read

    def recording_read(reader: AudioReader, frames: int) -> np.ndarray:
        block = read(reader, frames)
        requests[id(reader)].add(frames)
        positions[id(reader)] += len(block)
        written = min(sink.written(name) for name in ("vocals", "no_vocals"))
        leads[id(reader)].append(positions[id(reader)] - written)
        return block

    monkeypatch.setattr(AudioReader, "read", recording_read)
    separate_file(model, path, "vocals", sink)
    stats_reader, model_reader, rest_reader = leads  # in the order opened
    assert requests[stats_reader] == requests[model_reader] == {BLOCK_FRAMES}
    bound = SEGMENT + int(0.75 * SEGMENT) + 2 * BLOCK_FRAMES
    assert max(leads[model_reader]) <= bound and max(leads[rest_reader]) <= bound
    assert bound < 44100 * 30 / 5


def test_streamed_resampling_equals_one_shot(tmp_path):
    """The engine resamples in blocks; soxr's stream gives what one call on the whole gives."""
    wav = music_like(48000, 2, seconds=3.0)
    for rates in [(48000, 44100), (44100, 22050), (8000, 44100)]:
        stream = soxr.ResampleStream(*rates, 2, dtype="float32", quality=RESAMPLE_QUALITY)
        edges = [0, 1, 777, 50000, 50001, 120000, len(wav)]
        blocks = [stream.resample_chunk(wav[a:b], last=b == len(wav)) for a, b in zip(edges, edges[1:])]
        one_shot = soxr.resample(wav, *rates, quality=RESAMPLE_QUALITY)
        assert np.abs(np.concatenate(blocks) - one_shot).max() <= 1e-6


def test_bf16_runs_close_to_fp32(model, tmp_path, monkeypatch):
    # This runs bf16 even on a CPU without bf16 kernels (slowly: the model is tiny).
    monkeypatch.setattr(forward_module, "cpu_supports_bf16", lambda: True)
    path = write_wav(tmp_path / "in.wav", 44100, 2, seconds=2.5, subtype="FLOAT")
    assert_bf16_close_to_fp32(model, path)


def test_bf16_on_a_cpu_without_bf16_kernels_warns_and_runs_in_fp32(model, tmp_path, monkeypatch):
    monkeypatch.setattr(forward_module, "cpu_supports_bf16", lambda: False)
    path = write_wav(tmp_path / "in.wav", 44100, 2, seconds=0.5, subtype="FLOAT")
    assert_falls_back_to_fp32(model, path, "bf16", "no bf16 kernels", "drums")


@pytest.mark.requires_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_gpu_separates_in_batched_segments_close_to_the_cpu(model, tmp_path, precision):
    path = write_wav(tmp_path / "in.wav", 44100, 2, seconds=4.5, subtype="FLOAT")
    assert_gpu_close_to_cpu(model, path, precision)  # 4 segments a batch


def test_fp16_on_cpu_warns_and_runs_in_fp32(model, tmp_path):
    path = write_wav(tmp_path / "in.wav", 44100, 2, seconds=0.5, subtype="FLOAT")
    assert_falls_back_to_fp32(model, path, "fp16", "fp16 is only supported on CUDA", "drums")


def test_a_stem_past_4_gib_is_written_as_rf64(tmp_path):
    path = tmp_path / "long.wav"
    with AudioWriter(path, 44100, 2, "PCM_16", frames=2 ** 30) as writer:  # 4 GiB of samples
        writer.write(quantize(music_like(44100, 2, seconds=0.1), "PCM_16"))
    assert sf.info(str(path)).format == "RF64" and sf.info(str(path)).frames == 4410
