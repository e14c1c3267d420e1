"""The disk guard on uploads, over real HTTP: below `DEMIX_MIN_FREE_MB` free, a new upload
gets 507 with a JSON error and nothing is kept (checked before the body is read, and again
after it); a disk that fills up while the upload streams in gives the same answer."""
from __future__ import annotations

import dataclasses
import http.client
import json
import socket

import pytest
import requests

import demix.storage.local
from demix.api import create_app
from testkit.synthetic_audio import wav_bytes
from tests.support.live import LiveServer
from tests.support.small_disk import mounted_tmpfs
from tests.support.http_api import assert_error, post  # noqa: F401
from tests.support.service_state import files_under  # noqa: F401

MIB = 1024 * 1024


def free_space_probe(monkeypatch, *answers_mib: int) -> list:
    """Make the free-space probe answer `answers_mib` in turn (the last one from then on)."""
    calls = []

    def probe(path):
        calls.append(path)
        return answers_mib[min(len(calls), len(answers_mib)) - 1] * MIB

    monkeypatch.setattr(demix.storage.local, "disk_free_bytes", probe)
    return calls


def test_an_upload_below_the_free_space_minimum_gets_507_and_nothing_is_kept(
        idle_server, snapshot, monkeypatch, tmp_path):
    calls = free_space_probe(monkeypatch, 100)
    response = post(idle_server, files={"file": ("song.wav", wav_bytes(tmp_path), "audio/wav")})
    assert_error(response, 507, "insufficient_storage", "100 MiB free", "at least 1024 MiB",
                 "DEMIX_MIN_FREE_MB", "not kept")
    assert response.json()["error"]["free_mb"] == 100 and response.json()["error"]["min_free_mb"] == 1024
    assert calls and snapshot()


def test_the_refusal_comes_before_the_body_is_read(idle_server, snapshot, monkeypatch):
    free_space_probe(monkeypatch, 100)
    host, port = idle_server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        # Headers promising 1 MiB (within the upload limit), and not one byte of body: the
        # answer must not wait for it, and says the connection ends (its body is unread).
        connection.putrequest("POST", "/v1/jobs")
        connection.putheader("Content-Type", "multipart/form-data; boundary=x")
        connection.putheader("Content-Length", str(MIB))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 507
        assert response.getheader("Connection") == "close"
        assert b"insufficient_storage" in response.read()
    finally:
        connection.close()
    assert snapshot()


def test_a_body_over_the_size_limit_gets_413_even_when_the_disk_is_low_too(idle_server, snapshot, monkeypatch):
    """100 GiB promised to a server low on disk: the answer is the size limit, which no amount
    of free space would change, not the disk's 507."""
    free_space_probe(monkeypatch, 100)
    status, body = answer_to_headers(idle_server.url, content_length=100 * 1024 * MIB,
                                     body_start=b"--x\r\nContent-Disposition: form-data; name=\"file\"")
    assert status == 413, body
    assert body["error"]["code"] == "upload_too_large"
    assert "1 MiB limit (DEMIX_MAX_UPLOAD_MB)" in body["error"]["message"], body
    assert snapshot()


def test_a_body_of_text_fields_over_its_limit_gets_413_even_when_the_disk_is_low_too(
        idle_server, snapshot, monkeypatch):
    """Within the front's upload limit, so the app answers from the headers: its size check
    comes before its disk check."""
    free_space_probe(monkeypatch, 100)
    status, body = answer_to_headers(idle_server.url, content_length=600_000, body_start=b"url=https",
                                     content_type="application/x-www-form-urlencoded")
    assert status == 413, body
    assert body["error"]["code"] == "form_field_too_large" and "500000 bytes" in body["error"]["message"], body
    assert snapshot()


@pytest.mark.parametrize("content_type,content_length,code", [
    ("multipart/form-data; boundary=x", 100 * 1024 * MIB, "upload_too_large"),
    ("multipart/form-data; boundary=x", MIB + 1024 * 1024 + 1, "upload_too_large"),  # one byte over
    ("application/x-www-form-urlencoded", 500_001, "form_field_too_large"),
])
def test_the_apps_answer_from_the_headers_is_the_size_limit_before_the_disk(idle_server, monkeypatch,
                                                                           content_type, content_length, code):
    from werkzeug.test import EnvironBuilder

    from demix.api.early_answers import answer_from_headers

    free_space_probe(monkeypatch, 100)
    environ = EnvironBuilder(path="/v1/jobs", method="POST", content_type=content_type,
                             headers={"Content-Length": str(content_length)}).get_environ()
    environ["CONTENT_LENGTH"] = str(content_length)
    response = answer_from_headers(idle_server.app, environ)
    assert response.status_code == 413, response.get_data(as_text=True)
    assert response.get_json()["error"]["code"] == code


def answer_to_headers(url: str, content_length: int, body_start: bytes,
                      content_type: str = "multipart/form-data; boundary=x") -> tuple[int, dict]:
    """POST to /v1/jobs over a raw socket: headers promising `content_length` bytes, then
    only `body_start`; returns the answer's status and JSON body (read within 30 s)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\n"
                           f"Content-Type: {content_type}\r\n"
                           f"Content-Length: {content_length}\r\n\r\n".encode() + body_start)
        response = http.client.HTTPResponse(connection)
        try:
            response.begin()
            return response.status, json.loads(response.read())
        finally:
            response.close()


def test_an_upload_that_would_bring_free_space_under_the_minimum_is_refused_at_once(
        idle_server, snapshot, monkeypatch, tmp_path):
    free_space_probe(monkeypatch, 1024)  # exactly the minimum: a body within the 1 MiB limit does not fit
    body = wav_bytes(tmp_path, seconds=12.0, samplerate=44100, channels=2)[: MIB - 1024]
    response = post(idle_server, files={"file": ("song.wav", body, "audio/wav")})
    assert_error(response, 507, "insufficient_storage", "1024 MiB free", "plus the upload's")
    assert snapshot()


def test_the_space_is_checked_again_once_the_upload_is_in(idle_server, snapshot, monkeypatch, tmp_path):
    # Room while the upload is coming, too little once its file is written. (How often the
    # space is checked before depends on timing: the front asks the app's checks early
    # when the body is still arriving after the headers, and the app asks them again.)
    incoming = idle_server.app.extensions["demix"].storage.incoming_dir
    upload_written: list[bool] = []

    def probe(_path):
        upload_written.append(any(incoming.glob("upload-*")))
        return (1000 if upload_written[-1] else 5000) * MIB

    monkeypatch.setattr(demix.storage.local, "disk_free_bytes", probe)
    response = post(idle_server, files={"file": ("song.wav", wav_bytes(tmp_path), "audio/wav")})
    assert_error(response, 507, "insufficient_storage", "1000 MiB free")
    # Checked before the upload was written and again after. Not "the last probe saw it": the
    # front's early check runs on its own thread and may probe after the view's second check.
    assert not upload_written[0] and any(upload_written)
    assert snapshot()  # the received upload was deleted


def test_uploads_are_accepted_again_when_space_is_back(idle_server, monkeypatch, tmp_path):
    free_space_probe(monkeypatch, 100)
    assert post(idle_server, files={"file": ("a.wav", wav_bytes(tmp_path), "audio/wav")}).status_code == 507
    free_space_probe(monkeypatch, 5000)
    assert post(idle_server, files={"file": ("a.wav", wav_bytes(tmp_path), "audio/wav")}).status_code == 202


@pytest.fixture
def tiny_data_disk(tmp_path):
    """A real 256 KiB filesystem (tmpfs) to hold the API's data dir."""
    with mounted_tmpfs(tmp_path / "tiny-disk", "256k", "the tests with a monkeypatched free-space probe") as disk:
        yield disk


def test_a_disk_that_fills_up_while_the_upload_streams_in_gives_507(settings, redis_server, tmp_path,
                                                                       tiny_data_disk):
    tiny = dataclasses.replace(settings, data_dir=tiny_data_disk, queue="demix-tests-unconsumed",
                               min_free_mb=0)
    with LiveServer(create_app({"SETTINGS": tiny})) as server:
        response = requests.post(f"{server.url}/v1/jobs", timeout=60, files={
            "file": ("song.wav", wav_bytes(tmp_path, seconds=3.0), "audio/wav")})  # ~520 KiB
    assert_error(response, 507, "insufficient_storage", "disk filled up", "not kept")
    assert files_under(tiny_data_disk) == set()
