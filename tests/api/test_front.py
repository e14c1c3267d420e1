"""The HTTP front (`demix.api.front`) against slow and hostile clients, over real sockets on
loopback: slow connections hold no thread, headers and bodies have deadlines, a response the
client stops reading frees its thread, over the connection limit a client gets 503, answers
that need only the headers go before the body with `Connection: close`, and waitress's own
errors are JSON."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import pytest
import requests

from demix.api import create_app
from demix.api.early_answers import answer_from_headers
from demix.cli.argv import api_argv
from demix.cli.redis_server import free_port
from testkit.synthetic_audio import wav_bytes
from tests.support.live import LiveServer
from tests.support.waiting import wait_for

pytestmark = pytest.mark.processes  # the app needs the tests' Redis

MIB = 1024 * 1024
SOCKET_TIMEOUT_S = 30.0
"""Longest a test waits for one answer from the front: far above every deadline set here."""


@contextlib.contextmanager
def front(settings, redis_server, tmp_path: Path, routes: tp.Callable[[tp.Any], None] = lambda app: None,
          **changes: tp.Any) -> tp.Iterator[LiveServer]:
    """The app behind the front, in this process, with `changes` to the settings."""
    changed = dataclasses.replace(settings, data_dir=tmp_path / "data", queue="demix-tests-unconsumed", **changes)
    app = create_app({"SETTINGS": changed})
    routes(app)
    with LiveServer(app) as server:
        yield server


def connect(server: LiveServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT_S)
    return sock


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict:
        return json.loads(self.body)["error"]


def read_answer(sock: socket.socket) -> Answer:
    """One HTTP response from `sock` (the front always sends Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"the connection closed before an answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Answer(int(status_line.split()[1]), headers, body)


def trickle_until_answered(sock: socket.socket, piece: bytes, every_s: float, most: int) -> Answer:
    """Send `piece` every `every_s` until the front answers (at most `most` pieces)."""
    sock.settimeout(every_s)
    for _ in range(most):
        try:
            if sock.recv(1, socket.MSG_PEEK):
                break
        except socket.timeout:
            sock.sendall(piece)
    sock.settimeout(SOCKET_TIMEOUT_S)
    return read_answer(sock)


def healthz_answers(url: str) -> bool:
    with requests.get(f"{url}/healthz", timeout=5) as answer:
        return answer.status_code == 200


# -- slow clients hold no thread (the command the service runs) ---------------------------------

def test_fifty_slow_connections_do_not_starve_demix_api(settings, redis_server, tmp_path):
    """Issue 20's first case: 16 connections sending their headers a byte at a time took the
    API (gunicorn, 2 x 8 threads) down. `demix api` is run as the service runs it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMIX_")}
    env.update(DEMIX_REDIS_URL=redis_server.url, DEMIX_PORT=str(port), DEMIX_DATA_DIR=str(tmp_path / "data"))
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "api.log", "w") as log:
        api = subprocess.Popen(api_argv(settings), env=env, stdout=log, stderr=subprocess.STDOUT)
    slow: list[socket.socket] = []
    try:
        wait_for(lambda: _answers(url), "the API to answer", timeout=60, log=tmp_path / "api.log")
        for number in range(50):
            sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S)
            slow.append(sock)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" if number % 2 else
                         b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: 100000\r\n\r\n--b\r\n")
        for _ in range(3):  # and they go on trickling
            for sock in slow:
                sock.sendall(b"X")
            started = time.monotonic()
            assert healthz_answers(url)  # a 5 s timeout: the old server never answered
            assert time.monotonic() - started < 1.0
    finally:
        for sock in slow:
            sock.close()
        api.terminate()
        api.wait(30)
    assert api.returncode == 0, (tmp_path / "api.log").read_text()[-2000:]


def _answers(url: str) -> bool:
    try:
        return healthz_answers(url)
    except requests.RequestException:
        return False


# -- deadlines ----------------------------------------------------------------------------------

def test_headers_sent_a_line_at_a_time_get_408_after_the_header_deadline(settings, redis_server, tmp_path):
    with front(settings, redis_server, tmp_path, api_header_timeout_s=1.0) as server, \
            contextlib.closing(connect(server)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        answer = trickle_until_answered(sock, b"X-Slow: 1\r\n", every_s=0.2, most=100)
        assert answer.status == 408 and answer.headers["connection"] == "close"
        assert answer.error()["code"] == "request_timeout"
        assert "DEMIX_API_HEADER_TIMEOUT_S" in answer.error()["message"]
        assert sock.recv(1) == b""  # then closed


def test_a_connection_that_sends_nothing_is_answered_408_and_closed(settings, redis_server, tmp_path):
    with front(settings, redis_server, tmp_path, api_header_timeout_s=1.0) as server, \
            contextlib.closing(connect(server)) as sock:
        assert read_answer(sock).status == 408
        assert sock.recv(1) == b""


def test_a_body_slower_than_the_minimum_rate_gets_408(settings, redis_server, tmp_path):
    with front(settings, redis_server, tmp_path, api_idle_timeout_s=1.0, api_min_upload_kbps=100.0) as server, \
            contextlib.closing(connect(server)) as sock:
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 1000000\r\n\r\n")
        answer = trickle_until_answered(sock, b"x" * 10, every_s=0.2, most=100)
        assert answer.status == 408
        assert "DEMIX_API_MIN_UPLOAD_KBPS" in answer.error()["message"]


def test_a_fast_upload_is_not_held_to_the_idle_deadline(settings, redis_server, tmp_path):
    # 1 s of grace plus 1 s per 100 KiB: a 900 KB upload at full speed is well within it.
    with front(settings, redis_server, tmp_path, api_idle_timeout_s=1.0, api_min_upload_kbps=100.0,
               max_upload_mb=1) as server:
        with requests.post(f"{server.url}/v1/jobs", timeout=SOCKET_TIMEOUT_S, files={
                "file": ("song.wav", wav_bytes(tmp_path, seconds=10.0, samplerate=44100, channels=1), "audio/wav")}) as answer:
            assert answer.status_code == 202, answer.text


def test_a_response_the_client_stops_reading_frees_its_thread(settings, redis_server, tmp_path):
    """One request thread; a client asks for 64 MiB and reads none of it. The thread blocks
    writing; after the idle deadline the connection is closed and the thread serves others."""

    def big_route(app: tp.Any) -> None:
        app.add_url_rule("/test-big", "test_big", lambda: app.response_class(
            (b"x" * MIB for _ in range(64)), mimetype="application/octet-stream"))

    with front(settings, redis_server, tmp_path, big_route, api_threads=1, api_idle_timeout_s=1.0) as server, \
            contextlib.closing(connect(server)) as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(b"GET /test-big HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: _answers(server.url), "the one thread to be free again", timeout=60)


# -- load shedding --------------------------------------------------------------------------------

def test_over_the_connection_limit_a_new_connection_gets_503_with_retry_after(settings, redis_server, tmp_path):
    with front(settings, redis_server, tmp_path, api_max_connections=3) as server, contextlib.ExitStack() as held:
        for _ in range(3):
            held.enter_context(contextlib.closing(connect(server))).sendall(b"GET /healthz HTTP/1.1\r\n")
        with contextlib.closing(connect(server)) as fourth:
            fourth.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_answer(fourth)
        assert answer.status == 503 and answer.headers["retry-after"] == "5"
        assert answer.headers["connection"] == "close"
        assert answer.error()["code"] == "service_unavailable"
        assert "DEMIX_API_MAX_CONNECTIONS" in answer.error()["message"]
        held.close()  # the three go: room again
        wait_for(lambda: _answers(server.url), "a connection to be served again", timeout=30)


# -- answers from the headers alone ---------------------------------------------------------------

def test_a_content_length_of_100_gib_gets_413_before_anything_else(settings, redis_server, tmp_path, monkeypatch):
    import demix.storage.local
    monkeypatch.setattr(demix.storage.local, "disk_free_bytes", lambda _path: 10 * MIB)  # low on disk too
    with front(settings, redis_server, tmp_path) as server, contextlib.closing(connect(server)) as sock:
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 107374182400\r\n\r\n--b\r\n")
        answer = read_answer(sock)
        assert answer.status == 413 and answer.error()["code"] == "upload_too_large"
        assert answer.headers["connection"] == "close"


def test_an_upload_without_a_key_gets_401_before_its_body_and_the_next_request_works(
        settings, redis_server, tmp_path):
    with front(settings, redis_server, tmp_path, api_keys="key-front-1234") as server:
        with contextlib.closing(connect(server)) as sock:
            # 4 MiB announced, 64 KiB sent: the answer must not wait for the rest.
            sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: 4194304\r\n\r\n" + b"x" * 65536)
            answer = read_answer(sock)
            assert answer.status == 401 and answer.error()["code"] == "unauthorized"
            assert answer.headers["connection"] == "close" and "www-authenticate" in answer.headers
        # A client that sends its whole body first reads the same answer, then goes on.
        with requests.Session() as session:
            refused = session.post(f"{server.url}/v1/jobs", timeout=SOCKET_TIMEOUT_S,
                                   files={"file": ("song.wav", b"\0" * (3 * MIB), "audio/wav")})
            assert refused.status_code == 401 and refused.headers["Connection"] == "close"
            with session.get(f"{server.url}/healthz", timeout=SOCKET_TIMEOUT_S) as after:
                assert after.status_code == 200


def test_a_repeated_idempotency_key_is_answered_before_the_body(idle_server, tmp_path):
    body = wav_bytes(tmp_path, seconds=10.0, samplerate=44100, channels=1)[: 900 * 1024]
    headers = {"Idempotency-Key": f"front-{time.time_ns()}"}
    with requests.post(f"{idle_server.url}/v1/jobs", headers=headers, timeout=SOCKET_TIMEOUT_S,
                       files={"file": ("song.wav", body, "audio/wav")}) as first:
        assert first.status_code == 202, first.text
    with contextlib.closing(socket.create_connection(
            tuple(idle_server.url.removeprefix("http://").split(":")), timeout=SOCKET_TIMEOUT_S)) as sock:  # type: ignore[arg-type]
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Idempotency-Key: " + headers["Idempotency-Key"].encode()
                     + b"\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 65536)
        answer = read_answer(sock)
    assert answer.status == 200 and json.loads(answer.body)["id"] == first.json()["id"]
    assert answer.headers["connection"] == "close"


def test_a_malformed_idempotency_key_with_a_large_body_gets_400_and_connection_close(idle_server):
    with requests.Session() as session:
        refused = session.post(f"{idle_server.url}/v1/jobs", headers={"Idempotency-Key": "k" * 1000},
                               files={"file": ("song.wav", b"\0" * (900 * 1024), "audio/wav")},
                               timeout=SOCKET_TIMEOUT_S)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_idempotency_key"
        assert refused.headers["Connection"] == "close"
        with session.get(f"{idle_server.url}/healthz", timeout=SOCKET_TIMEOUT_S) as after:
            assert after.status_code == 200


# -- the front's own answers and files ------------------------------------------------------------

def test_a_malformed_request_gets_a_json_400(idle_server):
    with contextlib.closing(socket.create_connection(
            tuple(idle_server.url.removeprefix("http://").split(":")), timeout=SOCKET_TIMEOUT_S)) as sock:  # type: ignore[arg-type]
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: twelve\r\n\r\n")
        answer = read_answer(sock)
    assert answer.status == 400 and answer.headers["content-type"] == "application/json"
    assert answer.error()["code"] == "bad_request"


def test_a_large_body_is_spooled_in_the_staging_folder_not_tmp(settings, redis_server, tmp_path):
    with front(settings, redis_server, tmp_path) as server, contextlib.closing(connect(server)) as sock:
        incoming = tmp_path / "data" / "incoming"
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 4000000\r\n\r\n" + b"x" * (1 * MIB))

        def spool_files() -> list[str]:
            found = []
            for fd in os.listdir("/proc/self/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/self/fd/{fd}")
                    if target.endswith("(deleted)") and target.startswith(str(incoming)):
                        found.append(target)
            return found

        assert wait_for(spool_files, "the body's spool file in the staging folder", timeout=30)


def test_the_app_answers_from_headers_only_what_the_headers_decide(settings, redis_server, tmp_path):
    keyed = create_app({"SETTINGS": dataclasses.replace(settings, data_dir=tmp_path / "data",
                                                        api_keys="key-early-5678")})
    try:
        def environ(path: str, **headers: str) -> dict:
            from werkzeug.test import EnvironBuilder
            built = EnvironBuilder(path=path, method="POST", headers=headers).get_environ()
            built["CONTENT_LENGTH"] = str(MIB)  # announced; not one byte of it is there
            return built

        refused = answer_from_headers(keyed, environ("/v1/jobs"))
        assert refused is not None and refused.status_code == 401
        assert refused.get_json()["error"]["code"] == "unauthorized"
        # With a key, an upload's answer needs its body; so does any other view.
        assert answer_from_headers(keyed, environ("/v1/jobs", Authorization="Bearer key-early-5678")) is None
        assert answer_from_headers(keyed, environ("/healthz")) is None
    finally:
        keyed.extensions["demix"].jobs.redis.close()
