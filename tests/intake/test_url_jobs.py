"""`url` inputs and the private-address rule: a real file server on loopback, the real app
over real HTTP, a real Redis and a real Celery worker fetching and separating."""
from __future__ import annotations

import dataclasses
import io
import threading
import time
import typing as tp

import numpy as np
import pytest
import requests
import soundfile as sf

from demix import redis_keys as keys
from demix.errors import FetchFailed, UploadTooLarge
from demix.intake.url_fetch import fetch_url
from demix.worker.attempt import JobInterrupted
from demix.jobs.webhooks import Delivery, post_delivery
from testkit.synthetic_audio import write_wav
from tests.support.live import LiveServer, wait_for_job
from tests.support.file_server import FileServer
from tests.support.trickle_server import TrickleServer
from tests.support.waiting import wait_for
from tests.support.webhook_receiver import WebhookReceiver


@pytest.fixture
def files() -> tp.Iterator[FileServer]:
    with FileServer() as server:
        yield server


@pytest.fixture
def strict(settings):
    """The settings of a public deployment: the private-address rule on."""
    return dataclasses.replace(settings, allow_private_urls=False, url_timeout_s=5.0)


# -- fetching (the address rule itself: tests/test_outbound.py) ---------------------------------

def test_redirects_are_followed_up_to_the_limit(files, settings, tmp_path):
    files.routes["/a"] = (302, {"Location": "/b"}, b"")
    files.routes["/b"] = (301, {"Location": f"{files.base}/c"}, b"")
    files.routes["/c"] = (200, {}, b"the body")
    with open(tmp_path / "got", "wb") as file:
        assert fetch_url(f"{files.base}/a", file, settings) == 8
    assert (tmp_path / "got").read_bytes() == b"the body"
    files.routes["/loop"] = (302, {"Location": "/loop"}, b"")
    with open(tmp_path / "loop", "wb") as file, pytest.raises(FetchFailed, match="redirects"):
        fetch_url(f"{files.base}/loop", file, dataclasses.replace(settings, url_max_redirects=3))
    assert files.requests.count("/loop") == 4


def test_a_body_announced_over_the_limit_is_not_read(files, settings, tmp_path):
    files.routes["/big.wav"] = (200, {"Content-Length": str(2 * 1024 * 1024)}, b"x" * 10)
    with open(tmp_path / "got", "wb") as file, pytest.raises(UploadTooLarge):
        fetch_url(f"{files.base}/big.wav", file, dataclasses.replace(settings, max_upload_mb=1))
    assert (tmp_path / "got").stat().st_size == 0


def test_an_answer_with_over_100_headers_fails_saying_so(files, settings, tmp_path):
    files.routes["/many.wav"] = (200, {f"X-Header-{n}": "x" for n in range(101)}, b"RIFF")
    with open(tmp_path / "got", "wb") as file, pytest.raises(FetchFailed) as failed:
        fetch_url(f"{files.base}/many.wav", file, settings)
    assert "the server sent more than 100 headers" in failed.value.message
    assert "could not connect" not in failed.value.message


# -- fetches bounded in time, whatever the server does --------------------------------------------

DEADLINE_S = 3.0
"""The fetch deadline these tests set; each fetch must have ended `SLACK_S` after it."""

SLACK_S = 2.0


@pytest.mark.parametrize("mode", ["body", "headers"])
def test_a_trickling_server_is_given_up_at_the_deadline(settings, tmp_path, mode):
    """A byte every 0.5 s, of the body or of the headers, never lets the read time out:
    the deadline ends the fetch all the same, and the connection is closed."""
    quick = dataclasses.replace(settings, url_deadline_s=DEADLINE_S, url_timeout_s=5.0)
    seen: list[int] = []
    with TrickleServer(mode, interval=0.5) as server:
        started = time.monotonic()
        with open(tmp_path / "got", "wb") as file, pytest.raises(FetchFailed, match="DEMIX_URL_DEADLINE_S"):
            fetch_url(server.url, file, quick, progress=lambda received, total: seen.append(received))
        took = time.monotonic() - started
        assert server.hung_up.wait(SLACK_S) and server.connections == 1
    assert DEADLINE_S <= took < DEADLINE_S + SLACK_S
    if mode == "body":  # received bytes reported as they trickle in, not per full buffer
        assert len(set(seen)) >= 3 and seen == sorted(seen) and seen[-1] == (tmp_path / "got").stat().st_size


def test_a_silent_server_fails_after_the_read_timeout(settings, tmp_path):
    quick = dataclasses.replace(settings, url_deadline_s=60.0, url_timeout_s=1.0)
    with TrickleServer("silent") as server:
        started = time.monotonic()
        with open(tmp_path / "got", "wb") as file, pytest.raises(FetchFailed, match="DEMIX_URL_TIMEOUT_S"):
            fetch_url(server.url, file, quick)
        assert time.monotonic() - started < 1.0 + SLACK_S
        assert server.hung_up.wait(SLACK_S)


@pytest.mark.parametrize("mode", ["silent", "body", "headers"])
def test_an_interrupted_fetch_stops_within_a_second_whatever_the_server_does(settings, tmp_path, mode):
    """`check_interrupted` is how a worker's lease stops a fetch (a cancelled job): it is
    asked while the server sends nothing, a byte at a time, or its headers a byte at a time."""
    interrupted = threading.Event()
    stop_asked_at: list[float] = []

    def check_interrupted() -> None:
        if interrupted.is_set():
            raise JobInterrupted("cancelled", "the job was cancelled")

    def interrupt_once_connected() -> None:
        gives_up = time.monotonic() + 10
        while server.connections == 0 and time.monotonic() < gives_up:
            time.sleep(0.02)
        stop_asked_at.append(time.monotonic())
        interrupted.set()

    with TrickleServer(mode, lifetime=30) as server:
        interrupter = threading.Thread(target=interrupt_once_connected)
        interrupter.start()
        with open(tmp_path / "got", "wb") as file, pytest.raises(JobInterrupted):
            fetch_url(server.url, file, settings, check_interrupted=check_interrupted)
        stopped_after = time.monotonic() - stop_asked_at[0]
        interrupter.join(10)
        assert server.hung_up.wait(SLACK_S)
    assert stopped_after < SLACK_S  # checked every 0.5 s


def test_a_webhook_to_a_private_address_is_refused_at_connection(strict):
    """A callback host that resolves inward when the delivery is made gets nothing."""
    with WebhookReceiver([200]) as receiver:
        reason = post_delivery(Delivery(id="d" * 32, job_id="j" * 32, url=receiver.url, body=b"{}",
                                        attempts=0), strict)
        assert reason is not None and reason.startswith("url_not_allowed")
        assert receiver.requests == []
        assert post_delivery(Delivery(id="d" * 32, job_id="j" * 32, url=receiver.url, body=b"{}",
                                      attempts=0), dataclasses.replace(strict, allow_private_urls=True)) is None


# -- through the service -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def strict_server(redis_server, settings):
    """The API with the rule on, in front of a queue no worker consumes."""
    from demix.api import create_app
    from tests.support.environment import SESSION_DIR, UNCONSUMED_QUEUE

    strict_settings = dataclasses.replace(settings, allow_private_urls=False, queue=UNCONSUMED_QUEUE,
                                          data_dir=SESSION_DIR / "strict-data")
    with LiveServer(create_app({"SETTINGS": strict_settings})) as server:
        yield server


@pytest.mark.parametrize("field, value", [("url", "http://127.0.0.1:8000/song.wav"),
                                          ("url", "http://169.254.169.254/latest"),
                                          ("callback_url", "http://10.0.0.1/hook"),
                                          ("url", "http://localhost:8000/song.wav"),
                                          ("callback_url", "http://localhost/hook")])
def test_the_api_refuses_private_addresses_and_queues_nothing(strict_server, redis_client, field, value):
    before = redis_client.zcard(keys.jobs_index_key())
    # A literal public address: checked, never connected to (the callback is refused first).
    data = {"url": "http://93.184.215.14/song.wav"}
    data[field] = value
    response = requests.post(f"{strict_server.url}/v1/jobs", data=data, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "url_not_allowed" and set(error) == {"code", "message"}
    if "localhost" in value:  # the answer names the host given, never the address it resolves to
        assert "localhost" in error["message"] and "127.0.0.1" not in error["message"] \
            and "::1" not in error["message"]
    assert redis_client.zcard(keys.jobs_index_key()) == before


@pytest.mark.parametrize("data, code", [
    ({"url": "ftp://example.com/a.wav"}, "invalid_url"),
    ({"url": "http://127.0.0.1/a.wav", "stems": "kazoo"}, "invalid_stems"),
    ({}, "missing_file"),
])
def test_bad_url_submissions_are_400(live_server, data, code):
    response = requests.post(f"{live_server.url}/v1/jobs", data=data, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == code, response.text


def test_a_file_and_a_url_at_once_is_400(live_server, tmp_path):
    song = write_wav(tmp_path / "song.wav", 44100, 2, seconds=0.2)
    with open(song, "rb") as file:
        response = requests.post(f"{live_server.url}/v1/jobs", data={"url": "http://127.0.0.1/a.wav"},
                                 files={"file": ("song.wav", file)}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "file_and_url"


def test_a_url_job_shows_its_download_then_separates_it(live_server, files, tmp_path):
    song = write_wav(tmp_path / "song.wav", 44100, 2, seconds=3.0, subtype="PCM_24")
    body = song.read_bytes()
    files.routes["/music/song.wav"] = (200, {"Content-Type": "audio/wav"}, body)
    files.hold.add("/music/song.wav")  # half the body, then wait until the test saw it downloading
    response = requests.post(f"{live_server.url}/v1/jobs",
                             data={"url": f"{files.base}/music/song.wav", "stems": "vocals"}, timeout=30)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["source_url"] == f"{files.base}/music/song.wav" and job["frames"] == 0

    def downloading() -> tp.Optional[dict]:
        seen = requests.get(job["url"], timeout=10).json()
        return seen if seen["stage"] == "downloading" and seen["download"] else None

    seen = wait_for(downloading, "the job shown downloading", timeout=120)
    assert seen["status"] == "running" and seen["download"]["total_bytes"] == len(body)
    assert 0 <= seen["download"]["received_bytes"] < len(body)
    files.release.set()
    done = wait_for_job(live_server.url, job["id"], timeout=300)
    assert done["status"] == "succeeded", done["error"]
    assert done["download"] == {"received_bytes": len(body), "total_bytes": len(body)}
    assert (done["samplerate"], done["channels"], done["frames"]) == (44100, 2, 3 * 44100)
    assert done["input_format"] == "WAV/PCM_24" and done["output"]["sample_format"] == "pcm24"
    stems = {name: sf.read(io.BytesIO(requests.get(url, timeout=30).content), dtype="float64")[0]
             for name, url in done["outputs"].items()}
    mix = sf.read(song, dtype="float64")[0]
    assert set(stems) == {"vocals", "no_vocals"}
    assert np.abs(stems["vocals"] + stems["no_vocals"] - mix).max() <= 2 / 2 ** 23


@pytest.mark.parametrize("route, answer, code", [
    ("/missing.wav", None, "fetch_failed"),
    ("http://no-such-host.invalid/a.wav", None, "fetch_failed"),
    ("/picture.wav", (200, {}, b"\x89PNG\r\n\x1a\n" + bytes(64)), "unsupported_format"),
    ("/huge.wav", (200, {"Content-Length": str(600 * 1024 * 1024)}, b"RIFF"), "upload_too_large"),
])
def test_a_url_job_that_cannot_be_fetched_or_accepted_fails_saying_why(live_server, files, route, answer, code):
    if answer is not None:
        files.routes[route] = answer
    url = route if route.startswith("http") else files.base + route
    response = requests.post(f"{live_server.url}/v1/jobs", data={"url": url}, timeout=30)
    assert response.status_code == 202, response.text
    done = wait_for_job(live_server.url, response.json()["id"], timeout=120)
    assert done["status"] == "failed" and done["error"]["code"] == code, done
    assert done["outputs"] is None


def test_cancelling_a_url_job_stops_its_trickling_fetch_within_seconds(live_server):
    """The worker shows the bytes as they trickle in, and a cancel reaches the fetch through
    the job's lease: the connection is closed in seconds, and the worker is free again."""
    with TrickleServer("body", interval=0.5, lifetime=60) as server:
        response = requests.post(f"{live_server.url}/v1/jobs", data={"url": server.url}, timeout=30)
        assert response.status_code == 202, response.text
        job = response.json()

        def trickling() -> tp.Optional[dict]:
            seen = requests.get(job["url"], timeout=10).json()
            return seen if (seen["download"] or {}).get("received_bytes", 0) >= 2 else None

        wait_for(trickling, "the job showing bytes received", timeout=60)
        cancelled_at = time.monotonic()
        assert requests.post(f"{job['url']}/cancel", timeout=10).status_code == 200
        assert server.hung_up.wait(10), "the fetch still runs 10 s after the cancel"
        assert server.hung_up_at - cancelled_at < 2 * SLACK_S
        assert server.connections == 1
    assert wait_for_job(live_server.url, job["id"], timeout=30)["status"] == "cancelled"


def test_a_url_job_takes_every_format_an_upload_takes(live_server, files, tmp_path):
    """The fetched file goes through the same intake: a FLAC is decoded to the job's input."""
    song = write_wav(tmp_path / "song.wav", 44100, 2, seconds=1.0)
    flac = tmp_path / "song.flac"
    sf.write(flac, sf.read(song, dtype="int16")[0], 44100, subtype="PCM_16", format="FLAC")
    files.routes["/song.flac"] = (200, {"Content-Type": "audio/flac"}, flac.read_bytes())
    response = requests.post(f"{live_server.url}/v1/jobs", data={"url": f"{files.base}/song.flac"}, timeout=30)
    done = wait_for_job(live_server.url, response.json()["id"], timeout=300)
    assert done["status"] == "succeeded", done["error"]
    assert done["input_format"].startswith("FLAC/") and done["frames"] == 44100
