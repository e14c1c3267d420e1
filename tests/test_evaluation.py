"""Scoring a model on a folder of songs (`demix.evaluation`): MSST's SDR, museval's median of
1-s windows, finding MUSDB18-style tracks, and the engine's estimates scored end to end."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from demix.errors import DemixError, InvalidAudio
from demix.evaluation import (BLOCK_FRAMES, EPS, EngineSeparator, Report, StemScore, Track, TrackResult, chunked_median_sdr,
                              evaluate, evaluation_job, find_tracks, read_track_audio, score_stems, score_track,
                              sdr, window_sdrs)
from testkit.synthetic_audio import music_like


def msst_sdr(references: np.ndarray, estimates: np.ndarray) -> np.ndarray:
    """MSST's definition restated: `(sources, channels, samples)` arrays, both sums over channels
    and samples, 1e-8 added to each."""
    numerator = np.sum(references ** 2, axis=(1, 2)) + 1e-8
    denominator = np.sum((references - estimates) ** 2, axis=(1, 2)) + 1e-8
    return 10 * np.log10(numerator / denominator)


# -- the metric ---------------------------------------------------------------------------------

def test_sdr_is_the_energy_ratio_by_hand():
    reference = np.ones((100, 2))
    estimate = 0.9 * reference  # error energy: 200 * 0.01 = 2, against 200
    assert sdr(reference, estimate) == pytest.approx(10 * math.log10((200 + 1e-8) / (2 + 1e-8)), abs=1e-12)
    assert sdr(reference, estimate) == pytest.approx(20.0, abs=1e-6)


def test_sdr_is_msst_s_over_every_channel_and_sample_at_once():
    rng = np.random.default_rng(0)
    frames = 2 * BLOCK_FRAMES + 1234  # summed in blocks: the result is the whole array's
    reference = rng.standard_normal((frames, 2)) * np.array([1.0, 0.1])  # channels at different levels
    estimate = reference + rng.standard_normal((frames, 2)) * np.array([0.5, 0.001])
    expected = msst_sdr(reference.T[None], estimate.T[None])[0]
    assert sdr(reference, estimate) == pytest.approx(expected, abs=1e-9)
    per_channel_mean = np.mean([sdr(reference[:, [c]], estimate[:, [c]]) for c in range(2)])
    assert abs(sdr(reference, estimate) - per_channel_mean) > 10  # not the mean of the channels' SDRs


def test_an_exact_estimate_scores_as_high_as_eps_allows_and_silence_against_silence_is_0_db():
    reference = music_like(8000, 2, 0.5).astype(np.float64)
    energy = np.sum(reference ** 2)
    assert sdr(reference, reference) == pytest.approx(10 * math.log10((energy + EPS) / EPS))
    assert sdr(reference, reference) > 100
    silence = np.zeros((100, 2))
    assert sdr(silence, silence) == 0.0
    assert sdr(reference, np.zeros_like(reference)) == pytest.approx(0.0, abs=1e-9)


def test_noise_at_a_known_level_gives_that_many_db():
    rng = np.random.default_rng(1)
    reference = np.sin(np.linspace(0, 2000 * np.pi, 441000))[:, None] * np.ones((1, 2))
    noise = rng.standard_normal(reference.shape)
    noise *= math.sqrt(np.sum(reference ** 2) / np.sum(noise ** 2) / 10 ** (15 / 10))  # 15 dB below
    assert sdr(reference, reference + noise) == pytest.approx(15.0, abs=1e-6)
    assert sdr(reference.astype(np.float32), (reference + noise).astype(np.float32)) == pytest.approx(15.0, abs=1e-3)


def test_sdr_refuses_arrays_of_different_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        sdr(np.zeros((10, 2)), np.zeros((11, 2)))


def scaled_error(reference: np.ndarray, db: float, seed: int) -> np.ndarray:
    """An error signal `db` below `reference`'s energy."""
    noise = np.random.default_rng(seed).standard_normal(reference.shape)
    return noise * math.sqrt(np.sum(reference ** 2) / np.sum(noise ** 2) / 10 ** (db / 10))


def test_the_chunked_median_leaves_silent_reference_windows_and_the_partial_tail_out():
    rate = 100  # 1-s windows of 100 frames
    reference = np.random.default_rng(2).standard_normal((450, 2))
    reference[100:200] = 0.0  # second 2 is silent
    estimate = reference.copy()
    for index, db in ((0, 10.0), (2, 30.0), (3, 20.0)):
        part = slice(index * rate, (index + 1) * rate)
        estimate[part] += scaled_error(reference[part], db, seed=index)
    estimate[400:] += 100.0  # the half window at the end is not a window
    scores = window_sdrs(reference, estimate, rate)
    assert len(scores) == 4 and math.isnan(scores[1])
    assert scores[[0, 2, 3]] == pytest.approx([10.0, 30.0, 20.0], abs=1e-6)
    assert chunked_median_sdr(reference, estimate, rate) == pytest.approx(20.0, abs=1e-6)


def test_a_song_shorter_than_a_window_is_one_window_and_an_all_silent_reference_has_no_median():
    reference = np.ones((50, 1))
    assert chunked_median_sdr(reference, 0.9 * reference, 100) == pytest.approx(sdr(reference, 0.9 * reference))
    assert math.isnan(chunked_median_sdr(np.zeros((300, 2)), np.ones((300, 2)), 100))


def test_score_stems_cuts_to_the_shorter_and_scores_stems_in_both_only():
    reference = music_like(1000, 2, 3.0).astype(np.float64)
    estimate = reference[:2500] * 0.9
    scores = score_stems({"vocals": reference, "drums": reference}, {"vocals": estimate, "bass": estimate}, 1000)
    assert list(scores) == ["vocals"]
    assert scores["vocals"].sdr == pytest.approx(sdr(reference[:2500], estimate))
    assert scores["vocals"].chunked_median_sdr == pytest.approx(20.0, abs=1e-6)
    with pytest.raises(ValueError, match="channels"):
        score_stems({"vocals": reference}, {"vocals": reference[:, :1]}, 1000)


# -- tracks -------------------------------------------------------------------------------------

def write(path: Path, seconds: float = 1.0, seed: int = 0, rate: int = 8000, subtype: str = "PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), music_like(rate, 2, seconds, seed), rate, subtype=subtype)
    return path


def test_find_tracks_reads_musdb_s_layout_with_any_audio_format(tmp_path):
    write(tmp_path / "test" / "Song A" / "mixture.wav")
    write(tmp_path / "test" / "Song A" / "vocals.wav")
    write(tmp_path / "test" / "Song A" / "drums.flac")
    write(tmp_path / "train" / "Song B" / "mixture.flac")
    write(tmp_path / "train" / "Song B" / "vocals.wav")
    (tmp_path / "train" / "Song B" / "notes.txt").write_text("not audio")
    (tmp_path / "train" / "Song B" / "mixture.txt").write_text("not audio either")
    write(tmp_path / "stems only" / "vocals.wav")  # no mixture: not a track
    tracks = find_tracks(tmp_path)
    assert [track.name for track in tracks] == ["test/Song A", "train/Song B"]
    song_a, song_b = tracks
    assert song_a.mixture == tmp_path / "test" / "Song A" / "mixture.wav"
    assert dict(song_a.references) == {"drums": tmp_path / "test" / "Song A" / "drums.flac",
                                       "vocals": tmp_path / "test" / "Song A" / "vocals.wav"}
    assert song_b.mixture.suffix == ".flac" and list(song_b.references) == ["vocals"]
    assert [track.name for track in find_tracks(tmp_path / "test" / "Song A")] == ["Song A"]  # one track


def test_a_track_with_two_files_for_one_stem_is_refused_naming_them(tmp_path):
    write(tmp_path / "Song" / "mixture.wav")
    write(tmp_path / "Song" / "vocals.wav")
    write(tmp_path / "Song" / "vocals.flac")
    with pytest.raises(InvalidAudio, match="vocals.flac, vocals.wav") as caught:
        find_tracks(tmp_path)
    assert caught.value.code == "ambiguous_track"


def test_a_flac_reference_is_decoded_as_the_service_decodes_uploads(tmp_path, settings):
    wav = write(tmp_path / "vocals.wav", subtype="PCM_24", seed=3)
    flac = write(tmp_path / "vocals.flac", subtype="PCM_24", seed=3)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    from_flac, rate = read_track_audio(flac, settings, scratch)
    from_wav, _ = read_track_audio(wav, settings, scratch)
    assert rate == 8000 and from_flac.shape == from_wav.shape == (8000, 2)
    assert np.abs(from_flac - from_wav).max() <= 2 ** -23  # libsndfile rounds to 24 bits in each its way
    assert np.array_equal(from_flac, sf.read(str(flac), dtype="float32", always_2d=True)[0])
    assert list(scratch.iterdir()) == []


def test_score_track_refuses_a_reference_at_another_rate(tmp_path, settings):
    track = Track("Song", write(tmp_path / "mixture.wav"), {"vocals": write(tmp_path / "vocals.wav", rate=16000)})
    estimate = write(tmp_path / "estimates" / "vocals.wav")
    with pytest.raises(InvalidAudio, match="16000 Hz") as caught:
        score_track(track, {"vocals": estimate}, settings, tmp_path)
    assert caught.value.code == "reference_mismatch"


# -- the report ---------------------------------------------------------------------------------

def test_the_report_means_each_stem_over_its_tracks_and_shows_nan_as_none():
    report = Report([TrackResult("a", {"vocals": StemScore(10.0, 12.0), "drums": StemScore(4.0, math.nan)}),
                     TrackResult("b", {"vocals": StemScore(6.0, 8.0)}),
                     TrackResult("c", error="the model is not available")])
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["mean"] == {"vocals": {"sdr": 8.0, "chunked_median_sdr": 10.0},
                            "drums": {"sdr": 4.0, "chunked_median_sdr": None}}
    assert data["tracks"][0] == {"name": "a", "stems": {"vocals": {"sdr": 10.0, "chunked_median_sdr": 12.0},
                                                        "drums": {"sdr": 4.0, "chunked_median_sdr": None}}}
    assert data["tracks"][2] == {"name": "c", "stems": {}, "error": "the model is not available"}
    lines = report.table().splitlines()
    assert lines[0].split() == ["track", "vocals", "sdr", "vocals", "median", "drums", "sdr", "drums", "median"]
    assert lines[1].split() == ["a", "10.00", "12.00", "4.00", "-"]
    assert lines[2].split() == ["b", "6.00", "8.00", "-", "-"]
    assert lines[3].split()[:2] == ["c", "failed:"]
    assert lines[4].split() == ["mean", "8.00", "10.00", "4.00", "-"]
    nothing_scored = Report([TrackResult("only", error="no such model")]).table().splitlines()
    assert nothing_scored == ["track", "only   failed: no such model", "mean"]


def test_a_failing_separation_is_reported_and_the_other_tracks_go_on(tmp_path, settings):
    tracks = [Track("bad", write(tmp_path / "bad" / "mixture.wav"), {"vocals": write(tmp_path / "bad" / "vocals.wav")}),
              Track("good", write(tmp_path / "good" / "mixture.wav"), {"vocals": write(tmp_path / "good" / "vocals.wav")})]

    def separate(mixture: Path, folder: Path, progress) -> dict[str, Path]:
        if mixture.parent.name == "bad":
            raise DemixError("no such model", code="model_unavailable")
        progress(0.5)
        return {"vocals": shutil.copy(mixture.parent / "vocals.wav", folder / "vocals.wav")}

    seen = []
    report = evaluate(tracks, separate, settings, progress=lambda index, track, fraction: seen.append((index, fraction)))
    assert [(track.name, track.error) for track in report.tracks] == [("bad", "no such model"), ("good", "")]
    assert report.tracks[1].scores["vocals"].sdr > 100
    assert seen == [(0, 1.0), (1, 0.5), (1, 1.0)]


def test_the_evaluation_job_asks_for_every_source_as_float_wav():
    assert evaluation_job() == {"stems": "all", "format": "wav", "sample_format": "float32"}
    assert evaluation_job("htdemucs_ft")["model"] == "htdemucs_ft"


# -- the engine, end to end ---------------------------------------------------------------------

@pytest.mark.slow
def test_the_engine_s_estimates_are_scored_against_the_references(tmp_path, settings, tiny_model_repo):
    folder = tmp_path / "songs"
    for index, (rate, suffix) in enumerate(((44100, "wav"), (22050, "flac"))):
        stems = {name: music_like(rate, 2, 2.0, seed=10 * index + k) * 0.5
                 for k, name in enumerate(("drums", "bass", "vocals"))}
        track = folder / f"song{index}"
        track.mkdir(parents=True)
        for name, samples in stems.items():
            sf.write(str(track / f"{name}.wav"), samples, rate, subtype="FLOAT")
        sf.write(str(track / f"mixture.{suffix}"), sum(stems.values()), rate, subtype="PCM_24")
    engine = EngineSeparator(settings, evaluation_job())
    kept = tmp_path / "estimates"

    def separate_and_keep(mixture: Path, out: Path, progress) -> dict[str, Path]:
        estimates = engine(mixture, out, progress)
        copies = kept / mixture.parent.name
        copies.mkdir(parents=True)
        return {name: Path(shutil.copy(path, copies / path.name)) for name, path in estimates.items()}

    tracks = find_tracks(folder)
    report = evaluate(tracks, separate_and_keep, settings)
    assert [(track.name, track.error) for track in report.tracks] == [("song0", ""), ("song1", "")]
    for track, result in zip(tracks, report.tracks):
        assert list(result.scores) == ["drums", "bass", "vocals"]  # the model's order; "other" has no reference
        for stem, score in result.scores.items():
            reference, rate = sf.read(str(track.references[stem]), dtype="float64", always_2d=True)
            estimate, estimate_rate = sf.read(str(kept / track.name / f"{stem}.wav"), dtype="float64",
                                              always_2d=True)
            assert estimate_rate == rate and estimate.shape == reference.shape
            assert sf.info(str(kept / track.name / f"{stem}.wav")).subtype == "FLOAT"
            assert score.sdr == pytest.approx(sdr(reference, estimate), abs=1e-9)
            assert score.chunked_median_sdr == pytest.approx(chunked_median_sdr(reference, estimate, rate), abs=1e-9)
    data = report.to_dict()
    assert set(data) == {"metric", "tracks", "mean"} and set(data["mean"]) == {"bass", "drums", "vocals"}
    assert data["mean"]["vocals"]["sdr"] == pytest.approx(
        np.mean([result.scores["vocals"].sdr for result in report.tracks]), abs=1e-4)
