"""The Python client (`demix.cli.client.Client`) and `demix separate` against the real API."""
from __future__ import annotations

import dataclasses
import threading
import time

import flask
import numpy as np
import pytest
import soundfile as sf

from demix.api import create_app
from demix.cli.client import Client, ClientError, JobFailed
from demix.cli.main import main
from demix.atomic_files import is_temporary
from demix.cli.redis_server import RedisServer, free_port
from testkit.synthetic_audio import write_wav
from tests.support.environment import UNCONSUMED_QUEUE
from tests.support.live import LiveServer
from tests.support.file_server import FileServer


def test_separate_uploads_a_batch_and_downloads_every_stem(live_server, tmp_path, capsys):
    first = write_wav(tmp_path / "first.wav", 44100, 2, seconds=1.0)
    second = write_wav(tmp_path / "second.wav", 16000, 1, seconds=0.5, seed=2)
    out = tmp_path / "stems"
    code = main(["separate", str(first), str(second), "--stems", "drums", "--server", live_server.url,
                 "-o", str(out)])
    assert code == 0
    assert "2 of 2 separated" in capsys.readouterr().out
    for path in (first, second):
        original, rate = sf.read(str(path), dtype="float64", always_2d=True)
        drums, drums_rate = sf.read(str(out / path.stem / "drums.wav"), dtype="float64", always_2d=True)
        rest, _ = sf.read(str(out / path.stem / "no_drums.wav"), dtype="float64", always_2d=True)
        assert drums_rate == rate and drums.shape == original.shape
        assert np.abs(drums + rest - original).max() <= 1 / 2 ** 15
    assert not [path for path in out.rglob("*") if is_temporary(path)]


def test_separate_has_the_service_fetch_urls_beside_files(live_server, tmp_path, capsys):
    local = write_wav(tmp_path / "local.wav", 44100, 2, seconds=0.5)
    remote = write_wav(tmp_path / "served.wav", 22050, 1, seconds=0.5, seed=3)
    out = tmp_path / "stems"
    with FileServer() as files:
        files.routes["/music/remote.wav"] = (200, {}, remote.read_bytes())
        code = main(["separate", str(local), f"{files.base}/music/remote.wav", "--stems", "vocals",
                     "--server", live_server.url, "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "2 of 2 separated" in capsys.readouterr().out
    for path, folder in ((local, "local"), (remote, "remote")):
        original, rate = sf.read(str(path), dtype="float64", always_2d=True)
        vocals, vocals_rate = sf.read(str(out / folder / "vocals.wav"), dtype="float64", always_2d=True)
        rest, _ = sf.read(str(out / folder / "no_vocals.wav"), dtype="float64", always_2d=True)
        assert vocals_rate == rate and np.abs(vocals + rest - original).max() <= 1 / 2 ** 15


def test_a_refused_file_is_reported_with_the_services_message(live_server, tmp_path, capsys):
    bogus = tmp_path / "song.wav"
    bogus.write_bytes(b"MThd\x00\x00\x00\x06" + bytes(200))
    assert main(["separate", str(bogus), "--server", live_server.url, "-o", str(tmp_path / "o")]) == 1
    assert "MIDI" in capsys.readouterr().err


# -- the library -------------------------------------------------------------------------

def test_submit_wait_download_and_result(live_server, tmp_path):
    song = write_wav(tmp_path / "song.wav", 44100, 2, seconds=1.0)
    seen: list[dict] = []
    uploaded: list[tuple[int, int]] = []
    with Client(live_server.url) as demix:
        job = demix.submit(song, stems="vocals", format="flac", on_upload=lambda *sent: uploaded.append(sent))
        # An idle worker may take the job before the POST's answer reads it back.
        assert job["status"] in ("queued", "running") and job["output"]["format"] == "flac"
        done = demix.wait(job["id"], progress=seen.append, poll_interval_s=0.05)
        paths = demix.download(job["id"], tmp_path / "out")
        stems = demix.result(job["id"])
    assert uploaded[-1] == (song.stat().st_size, song.stat().st_size)
    assert done["status"] == "succeeded" and seen[-1]["status"] == "succeeded"
    assert [j["progress"] for j in seen] == sorted(j["progress"] for j in seen)
    assert paths == {"vocals": tmp_path / "out" / "vocals.flac", "no_vocals": tmp_path / "out" / "no_vocals.flac"}
    original, rate = sf.read(str(song), always_2d=True)
    for name, path in paths.items():
        samples, stem_rate = sf.read(str(path), always_2d=True)
        assert stem_rate == rate and samples.shape == original.shape
        assert stems[name] == path.read_bytes()


def test_refusals_carry_the_services_code_and_message(idle_server, tmp_path):
    bogus = tmp_path / "song.wav"
    bogus.write_bytes(b"MThd\x00\x00\x00\x06" + bytes(200))
    with Client(idle_server.url) as demix:
        with pytest.raises(ClientError) as unsupported:
            demix.submit(bogus)
        with pytest.raises(ClientError) as bad_stems:
            demix.submit(write_wav(tmp_path / "a.wav", 8000, 1, seconds=0.1), stems="guitar")
        with pytest.raises(ClientError) as unknown:
            demix.job("0" * 32)
    assert (unsupported.value.code, unsupported.value.http_status) == ("unsupported_format", 415)
    assert "MIDI" in unsupported.value.message
    assert (bad_stems.value.code, bad_stems.value.http_status) == ("invalid_stems", 400)
    assert "guitar" in bad_stems.value.message and "guitar" in str(bad_stems.value)
    assert (unknown.value.code, unknown.value.http_status) == ("not_found", 404)


def test_wait_raises_job_failed_for_a_cancelled_job(idle_server, tmp_path):
    with Client(idle_server.url) as demix:
        job = demix.submit(write_wav(tmp_path / "a.wav", 8000, 1, seconds=0.1),
                           callback_url="http://127.0.0.1:9/unused")
        assert job["callback_url"] == "http://127.0.0.1:9/unused"
        assert demix.cancel(job["id"])["status"] == "cancelled"
        with pytest.raises(JobFailed) as failed:
            demix.wait(job["id"], poll_interval_s=0.05)
        demix.delete(job["id"])
        with pytest.raises(ClientError) as gone:
            demix.job(job["id"])
    assert failed.value.job["status"] == "cancelled" and failed.value.code == "cancelled"
    assert gone.value.code == "not_found"


def test_connection_errors_are_retried_until_the_service_answers(idle_server, tmp_path):
    from werkzeug.serving import make_server

    port = free_port()
    server = make_server("127.0.0.1", port, idle_server.app, threaded=True)
    starter = threading.Timer(1.0, server.serve_forever)  # not listening yet when the client starts
    starter.start()
    try:
        with Client(f"http://127.0.0.1:{port}", retries=6, backoff_s=0.3) as demix:
            job = demix.submit(write_wav(tmp_path / "a.wav", 8000, 1, seconds=0.1))
        assert job["status"] == "queued"
    finally:
        starter.join(5)
        server.shutdown()
        server.server_close()


def test_retries_are_bounded_and_then_say_why(tmp_path):
    with Client(f"http://127.0.0.1:{free_port()}", retries=3, backoff_s=0.01) as demix:
        with pytest.raises(ClientError) as error:
            demix.job("0" * 32)
    assert error.value.code == "unreachable" and error.value.http_status is None


@pytest.mark.processes  # its own redis-server, stopped and started again
def test_503_is_retried_until_redis_is_back(settings, tmp_path):
    """The API answers 503 while its Redis is down; the client backs off and tries again."""
    port = free_port()
    down_at_first = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{port}/0",
                                        queue=UNCONSUMED_QUEUE, data_dir=tmp_path / "data")
    statuses: list[int] = []
    with LiveServer(create_app({"SETTINGS": down_at_first})) as server:
        server.app.after_request(lambda response: statuses.append(response.status_code) or response)
        outcome: dict = {}

        def submit() -> None:
            with Client(server.url, retries=8, backoff_s=0.3) as demix:
                outcome["job"] = demix.submit(write_wav(tmp_path / "a.wav", 8000, 1, seconds=0.1))

        client_thread = threading.Thread(target=submit)
        client_thread.start()
        time.sleep(1.5)
        # Started from this thread: a child started by a thread dies with that thread (PDEATHSIG).
        with RedisServer(tmp_path / "redis", port=port, persist=False):
            client_thread.join(120)
    job = outcome["job"]
    assert job["status"] == "queued"
    assert statuses[0] == 503 and statuses[-1] == 202


def test_separate_sends_the_api_key_from_the_option_or_the_environment(live_server, tmp_path, monkeypatch):
    seen: list[str] = []

    def record() -> None:
        seen.append(flask.request.headers.get("Authorization", ""))

    hooks = live_server.app.before_request_funcs.setdefault(None, [])
    hooks.append(record)
    song = str(write_wav(tmp_path / "a.wav", 8000, 1, seconds=0.2))
    try:
        assert main(["separate", song, "--server", live_server.url, "--api-key", "k-option",
                     "-o", str(tmp_path / "o1")]) == 0
        from_option, seen[:] = list(seen), []
        monkeypatch.setenv("DEMIX_API_KEY", "k-env")
        assert main(["separate", song, "--server", live_server.url, "-o", str(tmp_path / "o2")]) == 0
    finally:
        hooks.remove(record)
    assert from_option and set(from_option) == {"Bearer k-option"}
    assert seen and set(seen) == {"Bearer k-env"}


def test_models_lists_the_catalogue_and_submit_chooses_one(redis_server, settings, tmp_path):
    two = dataclasses.replace(settings, queue=UNCONSUMED_QUEUE, models=f"{settings.model},htdemucs_6s",
                              data_dir=tmp_path / "data")
    with LiveServer(create_app({"SETTINGS": two})) as server, Client(server.url) as demix:
        models = demix.models()
        assert [(m["name"], m["default"]) for m in models] == [(settings.model, True), ("htdemucs_6s", False)]
        assert models[1]["stems"] == ["all", "drums", "bass", "other", "vocals", "guitar", "piano"]
        song = write_wav(tmp_path / "a.wav", 8000, 1, seconds=0.1)
        job = demix.submit(song, stems="piano", model="htdemucs_6s")
        assert (job["model"], job["stems"], job["status"]) == ("htdemucs_6s", "piano", "queued")
        assert job["waiting_for"].startswith("no worker serves model 'htdemucs_6s' yet")
        with pytest.raises(ClientError) as unknown:
            demix.submit(song, model="htdemucs_ft")
        assert (unknown.value.code, unknown.value.http_status) == ("unknown_model", 400)
        demix.delete(job["id"])
