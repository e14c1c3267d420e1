"""A workflow step's stems from its runs' files, and stems re-encoded into a job's format,
through an in-memory sink: which stems, their samples, published only once all are written."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from demix.audio.io import quantize
from demix.audio.output_formats import OutputOptions
from demix.separation.ensemble import ensemble_arrays
from demix.separation.step_stems import encode_stems, write_step_stems
from testkit.memory_sink import MemorySink

RATE = 44100


def float_wav(path: Path, seed: int, frames: int = 70001, channels: int = 2) -> Path:
    samples = np.random.default_rng(seed).uniform(-0.5, 0.5, (frames, channels)).astype(np.float32)
    sf.write(path, samples, RATE, subtype="FLOAT")
    return path


def read(path: Path) -> np.ndarray:
    return sf.read(path, dtype="float32", always_2d=True)[0]


def test_an_ensembled_step_gives_each_source_and_its_complement_from_the_input(tmp_path):
    mix = float_wav(tmp_path / "mix.wav", 0)
    runs = [{"vocals": float_wav(tmp_path / f"vocals{seed}.wav", seed)} for seed in (1, 2, 3)]
    sink = MemorySink()
    names = write_step_stems(runs, mix, ["vocals", "no_vocals"], sink, tmp_path, "median_fft", [1, 2, 1])
    assert names == ["vocals", "no_vocals"] and sink.published == names
    assert sink.events.index(("publish", "vocals")) > sink.events.index(("close", "no_vocals"))
    expected = ensemble_arrays([read(run["vocals"]).T for run in runs], "median_fft", [1, 2, 1]).T
    assert np.abs(sink.stem("vocals") - expected).max() <= 1e-6
    assert np.array_equal(sink.stem("no_vocals"), read(mix) - sink.stem("vocals"))
    assert sink.formats["vocals"] == (RATE, 2, "FLOAT", 70001)


def test_a_complement_alone_is_given_without_its_source_and_one_models_source_passes_through(tmp_path):
    mix = float_wav(tmp_path / "mix.wav", 0)
    run = {"drums": float_wav(tmp_path / "drums.wav", 1), "bass": float_wav(tmp_path / "bass.wav", 2)}
    sink = MemorySink()
    assert write_step_stems([run], mix, ["no_drums", "bass"], sink, tmp_path) == ["no_drums", "bass"]
    assert np.array_equal(sink.stem("no_drums"), read(mix) - read(run["drums"]))
    assert np.array_equal(sink.stem("bass"), read(run["bass"]))


def test_stems_are_re_encoded_on_the_jobs_sample_grid(tmp_path):
    files = {"vocals": float_wav(tmp_path / "vocals.wav", 1), "rest": float_wav(tmp_path / "rest.wav", 2)}
    output = OutputOptions(format="wav", sample_format="pcm16", samplerate=RATE, channels=2)
    sink = MemorySink()
    progress: list[float] = []
    assert encode_stems(files, sink, output, progress.append) == ["vocals", "rest"]
    assert progress == [0.5, 1.0] and sink.published == ["vocals", "rest"]
    for name, path in files.items():
        assert sink.formats[name][2] == "PCM_16"
        assert np.array_equal(np.concatenate(sink.blocks[name]), quantize(read(path), "PCM_16"))
