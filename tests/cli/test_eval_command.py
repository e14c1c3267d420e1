"""`demix eval` (`demix.cli.eval_command`): a folder of songs with reference stems scored by
the engine in this process, and by a running service with `--url`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf

from demix.cli.main import main
from testkit.synthetic_audio import music_like
from tests.support.service_state import job_count


def write_songs(folder: Path, count: int = 2, seconds: float = 2.0) -> Path:
    """`count` MUSDB18-style tracks: references for drums, bass and vocals, and their sum."""
    for index in range(count):
        track = folder / f"song {index}"
        track.mkdir(parents=True)
        stems = {name: music_like(44100, 2, seconds, seed=10 * index + k) * 0.5
                 for k, name in enumerate(("drums", "bass", "vocals"))}
        for name, samples in stems.items():
            sf.write(str(track / f"{name}.wav"), samples, 44100, subtype="FLOAT")
        sf.write(str(track / ("mixture.flac" if index else "mixture.wav")), sum(stems.values()), 44100,
                 subtype="PCM_24")
    return folder


def check_report(data: dict, stems: set[str]) -> None:
    assert [track["name"] for track in data["tracks"]] == ["song 0", "song 1"]
    for track in data["tracks"]:
        assert "error" not in track and set(track["stems"]) == stems
        for score in track["stems"].values():
            assert isinstance(score["sdr"], float) and isinstance(score["chunked_median_sdr"], float)
    assert set(data["mean"]) == stems
    for stem in stems:
        mean = sum(track["stems"][stem]["sdr"] for track in data["tracks"]) / 2
        assert data["mean"][stem]["sdr"] == pytest.approx(mean, abs=1e-3)


@pytest.mark.slow
def test_eval_scores_the_engine_in_process_as_a_table_and_json(tmp_path, tiny_model_repo, capsys):
    songs = write_songs(tmp_path / "songs")
    report = tmp_path / "scores.json"
    assert main(["eval", str(songs), "--json", str(report)]) == 0
    out, err = capsys.readouterr()
    data = json.loads(report.read_text())
    check_report(data, {"drums", "bass", "vocals"})
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["track", "drums", "sdr"]
    assert [line.split()[:2] for line in lines[1:3]] == [["song", "0"], ["song", "1"]]
    assert lines[3].split()[0] == "mean"
    assert lines[3].split()[1] == f"{data['mean']['drums']['sdr']:.2f}"
    assert "2.00/2 tracks" in err  # the progress bar ran to the end

    assert main(["eval", str(songs), "--stems", "vocals,bass,guitar", "--json", str(report)]) == 0
    check_report(json.loads(report.read_text()), {"vocals", "bass"})
    assert "no track has a score for 'guitar'" in capsys.readouterr().err


def test_eval_says_where_no_track_was_found(tmp_path, capsys):
    (tmp_path / "song").mkdir()
    sf.write(str(tmp_path / "song" / "vocals.wav"), music_like(8000, 1, 0.1), 8000)
    assert main(["eval", str(tmp_path)]) == 1
    assert "no track in" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nowhere")]) == 1
    assert "nowhere is not a folder" in capsys.readouterr().err


def test_eval_reports_a_model_it_cannot_load(tmp_path, tiny_model_repo, capsys):
    songs = write_songs(tmp_path / "songs", count=1, seconds=0.5)
    assert main(["eval", str(songs), "--model", "no_such_model"]) == 1
    assert "no_such_model" in capsys.readouterr().err


@pytest.mark.slow
def test_a_track_that_cannot_be_scored_is_reported_and_fails_the_command(tmp_path, tiny_model_repo, capsys):
    songs = write_songs(tmp_path / "songs", seconds=0.5)
    sf.write(str(songs / "song 1" / "vocals.wav"), music_like(22050, 2, 0.5), 22050)
    assert main(["eval", str(songs)]) == 1
    out, err = capsys.readouterr()
    song_0, song_1 = out.splitlines()[1:3]
    assert song_0.startswith("song 0") and "failed" not in song_0
    assert song_1.split()[:3] == ["song", "1", "failed:"]
    assert "song 1: track 'song 1': vocals.wav is at 22050 Hz" in err


@pytest.mark.slow
def test_eval_through_the_service_scores_what_the_engine_scores(tmp_path, live_server, redis_client, capsys):
    songs = write_songs(tmp_path / "songs")
    by_service, in_process = tmp_path / "service.json", tmp_path / "engine.json"
    jobs_before = job_count(redis_client)
    assert main(["eval", str(songs), "--url", live_server.url, "--json", str(by_service)]) == 0
    assert job_count(redis_client) == jobs_before  # each job deleted once its stems were scored
    assert main(["eval", str(songs), "--url", live_server.url, "--model", "no_such_model"]) == 1
    assert "the service has no model 'no_such_model'; it serves tiny" in capsys.readouterr().err
    assert main(["eval", str(songs), "--json", str(in_process)]) == 0
    service, engine = json.loads(by_service.read_text()), json.loads(in_process.read_text())
    check_report(service, {"drums", "bass", "vocals"})
    for remote, local in zip(service["tracks"], engine["tracks"]):
        for stem, score in remote["stems"].items():
            assert score["sdr"] == pytest.approx(local["stems"][stem]["sdr"], abs=1e-2)


@pytest.mark.slow
def test_eval_scores_a_workflow_on_the_service(tmp_path, live_server, capsys):
    songs = write_songs(tmp_path / "songs")
    workflow = tmp_path / "band.json"
    workflow.write_text(json.dumps({"steps": [{"name": "band", "models": ["tiny"]}],
                                    "outputs": {"drums": "band/drums", "bass": "band/bass", "vocals": "band/vocals"}}))
    assert main(["eval", str(songs), "--workflow", str(workflow)]) == 2
    assert "a workflow runs on the service" in capsys.readouterr().err
    by_workflow, by_model = tmp_path / "workflow.json", tmp_path / "model.json"
    assert main(["eval", str(songs), "--url", live_server.url, "--workflow", str(workflow),
                 "--json", str(by_workflow)]) == 0
    assert main(["eval", str(songs), "--url", live_server.url, "--json", str(by_model)]) == 0
    # One step of one model: the workflow's stems are that model's, so are their scores.
    workflow_scores, model_scores = json.loads(by_workflow.read_text()), json.loads(by_model.read_text())
    check_report(workflow_scores, {"drums", "bass", "vocals"})
    assert workflow_scores["mean"] == model_scores["mean"]
