"""Writing a job's stems (`demix.separation.stem_files`): nothing visible under a stem's name until
it is published, `clip=rescale` scaling every stem of a job by one gain (so they still
sum to the scaled mix) without leaving its float scratch files, and the MP3 bitrate
mapped onto libsndfile's compression level.

Every output format through a whole job is in tests/audio/test_output_formats.py."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from demix.audio.output_formats import OutputOptions
from demix.storage.local import JobStorage
from demix.separation.stem_files import JobStemSink, mp3_compression_level

RATE, FRAMES = 8000, 20000


@pytest.fixture
def storage(tmp_path) -> JobStorage:
    built = JobStorage(tmp_path / "data")
    built.job_dir("j").mkdir(parents=True)
    return built


def tone(amplitude: float, frames: int = FRAMES) -> np.ndarray:
    t = np.arange(frames) / RATE
    mono = amplitude * np.sin(2 * np.pi * 220 * t)
    return np.stack([mono, -mono], axis=1).astype(np.float32)


def written(sink: JobStemSink, stems: dict[str, np.ndarray], output: OutputOptions) -> None:
    """As the engine does: every stem written and closed, then each published."""
    for name, samples in stems.items():
        writer = sink.open_stem(name, RATE, 2, output.grid_subtype, len(samples))
        for start in range(0, len(samples), 4096):
            writer.write(samples[start:start + 4096])
        writer.close()
    for name in stems:
        sink.publish(name)


def test_the_mp3_bitrate_is_its_exact_point_on_the_compression_scale():
    assert mp3_compression_level(320) == 0.0
    assert mp3_compression_level(128) == pytest.approx(192 / 288)
    assert mp3_compression_level(32) == 0.999  # libsndfile's end of the scale, kept inside it


def test_rescaled_stems_share_one_gain_that_brings_the_loudest_to_full_scale(storage, monkeypatch):
    import demix.separation.stem_files as stem_files

    monkeypatch.setattr(stem_files, "RESCALE_BLOCK_FRAMES", 4096)  # several blocks per stem
    output = OutputOptions(format="wav", sample_format="pcm16", samplerate=RATE, clip="rescale")
    sink = JobStemSink(storage, "j", output, attempt=1)
    loud, quiet = tone(2.0), tone(0.5)
    written(sink, {"drums": loud, "bass": quiet}, output)

    full_scale = 32767 / 32768
    assert sink.gain == pytest.approx(full_scale / float(np.abs(loud).max()))
    drums, _ = sf.read(storage.stem_path("j", "drums", attempt=1), dtype="float32")
    bass, _ = sf.read(storage.stem_path("j", "bass", attempt=1), dtype="float32")
    assert len(drums) == len(bass) == FRAMES
    assert np.abs(drums).max() == pytest.approx(full_scale, abs=1 / 32768)
    np.testing.assert_allclose(drums, loud * sink.gain, atol=1 / 32768)
    np.testing.assert_allclose(bass, quiet * sink.gain, atol=1 / 32768)  # the same gain
    # Only the published stems are left: no float scratch file, no temporary.
    assert sorted(p.name for p in storage.stems_dir("j", 1).iterdir()) == ["bass.wav", "drums.wav"]


def test_stems_that_do_not_clip_are_not_rescaled(storage):
    output = OutputOptions(format="flac", sample_format="pcm24", samplerate=RATE, clip="rescale")
    sink = JobStemSink(storage, "j", output)
    quiet = tone(0.25)
    written(sink, {"vocals": quiet}, output)
    assert sink.gain == 1.0
    vocals, _ = sf.read(storage.stem_path("j", "vocals", "flac"), dtype="float32")
    np.testing.assert_allclose(vocals, quiet, atol=1 / (1 << 23))


def test_a_stem_is_under_its_name_only_once_published(storage):
    output = OutputOptions(format="flac", samplerate=RATE)
    sink = JobStemSink(storage, "j", output, attempt=2)
    writer = sink.open_stem("vocals", RATE, 2, output.grid_subtype, FRAMES)
    writer.write((tone(0.5) * 32767).astype(np.int32))
    writer.close()
    final = storage.stem_path("j", "vocals", "flac", attempt=2)
    assert not final.exists() and len(list(storage.stems_dir("j", 2).iterdir())) == 1  # a hidden temporary
    sink.publish("vocals")
    assert final.exists() and sf.info(str(final)).frames == FRAMES


def test_an_mp3_stem_is_clipped_not_wrapped(storage):
    output = OutputOptions(format="mp3", samplerate=RATE * 2, bitrate=128)
    sink = JobStemSink(storage, "j", output)
    written(sink, {"other": tone(3.0, RATE * 2)}, output)
    decoded, _ = sf.read(storage.stem_path("j", "other", "mp3"), dtype="float32")
    assert 0.9 < np.abs(decoded).max() < 1.2  # unclipped, it would decode to ~3
