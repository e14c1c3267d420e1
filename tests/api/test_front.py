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
from demix.config import Settings
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
    return connect_to(server.url)


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


# -- `demix api` as the service runs it ----------------------------------------------------------

KEY = "key-front-1234"


@pytest.fixture(scope="module")
def demix_api(redis_server, tmp_path_factory) -> tp.Iterator[str]:
    """`demix api`'s own command (with API keys, in front of a queue no worker consumes); its URL."""
    scratch = tmp_path_factory.mktemp("demix-api")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMIX_")}
    env.update(DEMIX_REDIS_URL=redis_server.url, DEMIX_PORT=str(port), DEMIX_DATA_DIR=str(scratch / "data"),
               DEMIX_API_KEYS=KEY, DEMIX_QUEUE="demix-tests-unconsumed")
    url = f"http://127.0.0.1:{port}"
    with open(scratch / "api.log", "w") as log:
        api = subprocess.Popen(api_argv(Settings.from_env(env)), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _answers(url), "the API to answer", timeout=60, log=scratch / "api.log")
        yield url
    finally:
        api.terminate()
        api.wait(30)
    assert api.returncode == 0, (scratch / "api.log").read_text()[-2000:]


def test_fifty_slow_connections_do_not_starve_demix_api(demix_api):
    """Issue 20's first case: 16 connections sending their headers a byte at a time took the
    API (gunicorn, 2 x 8 threads) down."""
    port = int(demix_api.rsplit(":", 1)[1])
    with contextlib.ExitStack() as held:
        slow = [held.enter_context(contextlib.closing(socket.create_connection(("127.0.0.1", port),
                                                                               timeout=SOCKET_TIMEOUT_S)))
                for _ in range(50)]
        for number, sock in enumerate(slow):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" if number % 2 else
                         b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: 100000\r\n\r\n--b\r\n")
        for _ in range(3):  # and they go on trickling
            for sock in slow:
                sock.sendall(b"X")
            started = time.monotonic()
            assert healthz_answers(demix_api)  # a 5 s timeout: the old server never answered
            assert time.monotonic() - started < 1.0


REFUSED_BEFORE_THE_BODY = [({}, 401, "unauthorized"),
                           ({"Authorization": f"Bearer {KEY}", "Idempotency-Key": "k" * 1000}, 400,
                            "invalid_idempotency_key")]


@pytest.mark.parametrize("headers, status, code", REFUSED_BEFORE_THE_BODY, ids=["no key", "bad idempotency key"])
def test_a_refusal_before_the_body_closes_the_connection(demix_api, headers, status, code):
    """Issue 20, case 7: a refusal sent before a large body was read said nothing of the
    connection. 4 MiB announced, 64 KiB sent: the answer does not wait for the rest."""
    with contextlib.closing(connect_to(demix_api)) as sock:
        sock.sendall(upload_head(4 * MIB, headers) + b"x" * 65536)
        answer = read_answer(sock)
    assert answer.status == status and answer.error()["code"] == code
    assert answer.headers["connection"] == "close"


@pytest.mark.parametrize("headers, status, code", REFUSED_BEFORE_THE_BODY, ids=["no key", "bad idempotency key"])
def test_after_a_refused_upload_the_next_request_on_the_session_works(demix_api, headers, status, code):
    """...so the client's next request on that keep-alive connection failed with RemoteDisconnected."""
    with requests.Session() as session:
        refused = session.post(f"{demix_api}/v1/jobs", headers=headers, timeout=SOCKET_TIMEOUT_S,
                               files={"file": ("song.wav", b"\0" * (3 * MIB), "audio/wav")})
        assert refused.status_code == status and refused.json()["error"]["code"] == code
        with session.get(f"{demix_api}/v1/models", headers={"Authorization": f"Bearer {KEY}"},
                         timeout=SOCKET_TIMEOUT_S) as after:
            assert after.status_code == 200


def test_a_repeated_idempotency_key_is_answered_before_the_body_with_connection_close(demix_api, tmp_path):
    headers = {"Authorization": f"Bearer {KEY}", "Idempotency-Key": f"front-{time.time_ns()}"}
    with requests.post(f"{demix_api}/v1/jobs", headers=headers, timeout=SOCKET_TIMEOUT_S, files={
            "file": ("song.wav", wav_bytes(tmp_path, seconds=1.0), "audio/wav")}) as first:
        assert first.status_code == 202, first.text
    with contextlib.closing(connect_to(demix_api)) as sock:
        sock.sendall(upload_head(4 * MIB, headers) + b"x" * 65536)
        again = read_answer(sock)
    assert again.status == 200 and json.loads(again.body)["id"] == first.json()["id"]
    assert again.headers["connection"] == "close"


def upload_head(content_length: int, headers: tp.Mapping[str, str]) -> bytes:
    """The head of a multipart POST /v1/jobs announcing `content_length` bytes."""
    lines = ["POST /v1/jobs HTTP/1.1", "Host: x", "Content-Type: multipart/form-data; boundary=b",
             f"Content-Length: {content_length}", *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def connect_to(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT_S)


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
