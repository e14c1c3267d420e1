"""The HTTP front: the server `demix api` runs the Flask app under (waitress), held against
slow and hostile clients.

Why waitress: it reads every request, headers and body, in its one I/O thread and hands a
request to a worker thread only once the request is complete. A client sending a byte every
few seconds costs a socket and a small buffer, never a thread. (gunicorn's gthread worker
gave the connection to a thread as soon as it was readable: 16 slow clients held all 16
threads and `/healthz` went unanswered.) Bodies above `inbuf_overflow` are spooled to an
unlinked file in the storage's staging folder, the folder uploads are received into
anyway, never into memory or `/tmp`.

What waitress lacks is added here, all enforced from the I/O thread:
- **A deadline on the request headers** (`DEMIX_API_HEADER_TIMEOUT_S`): waitress's own idle
  timeout alone lets a client sending a byte every few seconds hold a connection for ever.
- **A deadline on the body that grows with what arrived**: `DEMIX_API_IDLE_TIMEOUT_S` plus
  one second per `DEMIX_API_MIN_UPLOAD_KBPS` KiB received (Apache's mod_reqtimeout rule):
  a 500 MB upload over a slow link goes through, a trickle does not.
- **A response the client stops reading** closes the connection after
  `DEMIX_API_IDLE_TIMEOUT_S` without progress, which frees the thread blocked writing it.
- **Load shedding**: over `DEMIX_API_MAX_CONNECTIONS` open connections a new one is
  answered 503 (`Retry-After`) and closed, instead of waiting unanswered in the backlog.
- **Answers that need only the headers** are sent as soon as the headers are in, before
  the body is read or spooled: a body announced over the upload limit (413, waitress's
  own check), and whatever the app answers from the headers alone
  (`demix.api.early_answers`: a missing or unknown API key, a repeated `Idempotency-Key`,
  an owner at its limit, a full disk). Each goes with `Connection: close`, then the server
  reads and drops what the client still sends for a moment (a lingering close), so the
  client reads the answer instead of a reset, and its next request opens a new connection.
- waitress's own errors (malformed requests, headers too large) leave as the API's JSON
  errors, `{"error": {"code", "message"}}`.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import http
import io
import json
import logging
import resource
import signal
import socket
import sys
import tempfile
import threading
import time
import typing as tp
from pathlib import Path

from waitress.channel import HTTPChannel
from waitress.adjustments import Adjustments
from waitress.buffers import TempfileBasedBuffer
from waitress.server import TcpWSGIServer
from waitress import wasyncore
from waitress.task import ErrorTask, ThreadedTaskDispatcher

from demix.api import FORM_OVERHEAD_BYTES
from demix.api.early_answers import answer_from_headers
from demix.config import Settings
from demix.errors import DemixError
from demix.intake.uploads import disk_filled_while_receiving, upload_too_large
from demix.storage.local import is_disk_full

log = logging.getLogger(__name__)

LINGER_S = 2.0
"""How long a connection refused before its body was read keeps reading (and dropping) what
the client still sends, so that closing it does not reset the answer away."""
RETRY_AFTER_S = 5
"""`Retry-After` of a 503 sent because the server is at its connection limit."""
RECV_BYTES = 256 * 1024
"""Bytes read per `recv`: large reads keep a fast upload's I/O thread time low."""
SPOOL_OVER_BYTES = 512 * 1024
"""Request bodies larger than this are spooled to a file rather than kept in memory."""
MAINTENANCE_INTERVAL_S = 1
"""How often the deadlines are checked."""
EARLY_ANSWER_THREADS = 2
"""Threads asking the app whether a request's headers decide its answer (each a few Redis reads)."""
SHED_LOG_INTERVAL_S = 10.0
"""At most one log line per this many seconds while connections are being shed."""
OTHER_FILES = 256
"""Open files the API needs besides its connections (spooled bodies, uploads, Redis)."""


_spool = threading.local()
"""The folder request bodies being parsed in this thread overflow into (`received` sets it)."""


def _spool_file(_buffer: tp.Any) -> tp.BinaryIO:
    # waitress spools a body past `inbuf_overflow` into tempfile.TemporaryFile(), /tmp by
    # default; ours go to the storage's staging folder, beside the uploads they become.
    file = tempfile.TemporaryFile("w+b", dir=getattr(_spool, "dir", None))
    getattr(_spool, "opened", []).append(file)  # to close if the disk fills before waitress holds it
    return file


TempfileBasedBuffer.newfile = _spool_file  # waitress builds these by name: no subclass reaches them


@dataclasses.dataclass(frozen=True)
class EarlyAnswer:
    """A response the front sends itself, before or instead of the app: always the last on
    its connection (`Connection: close`), since the request's body was not read."""
    status: str
    """"401 UNAUTHORIZED"; the reason phrase is the app's."""
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @classmethod
    def json_error(cls, status: str, code: str, message: str,
                   headers: tp.Iterable[tuple[str, str]] = ()) -> "EarlyAnswer":
        """An error in the API's JSON form, `{"error": {"code", "message"}}`."""
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        return cls(status, (("Content-Type", "application/json"), *headers), body)

    @classmethod
    def of_error(cls, error: DemixError) -> "EarlyAnswer":
        """One of the service's errors, as the app would answer it."""
        return cls.json_error(f"{error.http_status} {http.HTTPStatus(error.http_status).phrase}",
                              error.code, error.message, error.headers.items())

    @classmethod
    def of_response(cls, response: tp.Any) -> "EarlyAnswer":
        """The app's own (Flask) response."""
        headers = tuple((name, value) for name, value in response.headers.items()
                        if name.lower() not in ("content-length", "connection"))
        return cls(response.status, headers, response.get_data())

    def to_bytes(self) -> bytes:
        head = [f"HTTP/1.1 {self.status}", *(f"{name}: {value}" for name, value in self.headers),
                f"Content-Length: {len(self.body)}", "Connection: close", "Server: demix"]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + self.body


def request_environ(request: tp.Any, server: "GuardedServer") -> dict:
    """The WSGI environ of a request whose body has not arrived (`wsgi.input` is empty), as
    waitress would build it for the app."""
    environ = {"REQUEST_METHOD": request.command, "PATH_INFO": request.path, "QUERY_STRING": request.query,
               "SERVER_NAME": server.server_name, "SERVER_PORT": str(server.effective_port),
               "SERVER_PROTOCOL": f"HTTP/{request.version}", "SCRIPT_NAME": "",
               "wsgi.url_scheme": request.url_scheme, "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr,
               "wsgi.version": (1, 0), "wsgi.multithread": True, "wsgi.multiprocess": False,
               "wsgi.run_once": False}
    for key, value in request.headers.items():
        environ[key if key in ("CONTENT_LENGTH", "CONTENT_TYPE") else f"HTTP_{key}"] = value
    return environ


class JsonErrorTask(ErrorTask):
    """waitress's answer to a request it could not parse, as the API's JSON error."""

    def execute(self) -> None:
        error = self.request.error
        body = json.dumps({"error": {"code": error.reason.lower().replace(" ", "_"),
                                     "message": f"{error.reason}: {error.body}"}}).encode()
        if error.code == 413:
            body = EarlyAnswer.of_error(upload_too_large(self.channel.server.settings)).body
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class GuardedChannel(HTTPChannel):
    """A connection with deadlines on each request's headers and body, and early refusals."""

    error_task_class = JsonErrorTask
    server: "GuardedServer"

    def __init__(self, server: "GuardedServer", sock: socket.socket, addr: tp.Any, adj: tp.Any,
                 map: tp.Any = None) -> None:
        super().__init__(server, sock, addr, adj, map)
        # The connection's first request starts when it opens: one that sends nothing
        # is held to the header deadline too.
        self.request_started: tp.Optional[float] = time.monotonic()
        self.body_started: tp.Optional[float] = None
        self.body_received = 0
        self.linger_until: tp.Optional[float] = None
        self._write_shut = False

    # -- reading ---------------------------------------------------------------------------
    def readable(self) -> bool:
        if self.linger_until is not None:
            return True  # keep draining what a refused client still sends
        return super().readable()

    def handle_read(self) -> None:
        if self.linger_until is None:
            return super().handle_read()
        try:
            if not self.recv(self.adj.recv_bytes):
                self.handle_close()
        except OSError:
            self.handle_close()

    def received(self, data: bytes) -> bool:
        now = time.monotonic()
        partial_before = self.request
        _spool.dir = self.server.spool_dir  # a body parsed now overflows into this folder
        _spool.opened = []
        try:
            handled = super().received(data)
        except OSError as exc:
            for file in _spool.opened:
                file.close()
            if not is_disk_full(exc):
                raise
            self.refuse(EarlyAnswer.of_error(disk_filled_while_receiving()))
            return False
        request = self.request  # the request still being received, if any
        if request is None:
            self.request_started, self.body_started, self.body_received = None, None, 0
            return handled
        if request is not partial_before or self.request_started is None:
            self.request_started, self.body_started, self.body_received = now, None, 0
        if request.headers_finished:
            if self.body_started is None:  # its headers are in, its body is still coming
                self.body_started = now
                self.server.ask_early_answer(self, request)
            self.body_received += len(data)
        return handled

    # -- deadlines ----------------------------------------------------------------------------
    def enforce_deadlines(self, now_monotonic: float, now_wall: float) -> None:
        settings = self.server.settings
        if self.linger_until is not None:
            if now_monotonic > self.linger_until:
                self.handle_close()
            return
        if self.will_close or self.close_when_flushed:
            return
        if self.requests:
            # Being answered: only a response that stopped moving is cut (the client
            # reads nothing), which wakes the thread blocked writing it.
            if self.total_outbufs_len and now_wall - self.last_activity > settings.api_idle_timeout_s:
                log.info("closing %s: the client read nothing of the response for %gs",
                         self.addr, settings.api_idle_timeout_s)
                # Now, not via will_close: that waits for the socket to be writable, which a
                # client reading nothing never makes it. Closing wakes the blocked thread.
                self.handle_close()
            return
        if self.request_started is None:
            return  # idle between requests: waitress's channel_timeout
        if self.body_started is None:
            if now_monotonic - self.request_started > settings.api_header_timeout_s:
                self.refuse(EarlyAnswer.json_error(
                    "408 Request Timeout", "request_timeout",
                    f"the request headers took longer than {settings.api_header_timeout_s:g} s "
                    "(DEMIX_API_HEADER_TIMEOUT_S)"))
            return
        allowed = settings.api_idle_timeout_s + self.body_received / (settings.api_min_upload_kbps * 1024)
        if now_monotonic - self.body_started > allowed or now_wall - self.last_activity > settings.api_idle_timeout_s:
            self.refuse(EarlyAnswer.json_error(
                "408 Request Timeout", "request_timeout",
                f"the request body came slower than {settings.api_min_upload_kbps:g} KiB/s after its "
                f"first {settings.api_idle_timeout_s:g} s, or stalled (DEMIX_API_MIN_UPLOAD_KBPS, "
                "DEMIX_API_IDLE_TIMEOUT_S)"))

    def refuse(self, answer: EarlyAnswer) -> None:
        """Send `answer` now, from the I/O thread, stop parsing, and close after a linger."""
        if self.requests:  # an earlier request of this connection is being answered
            self.will_close = True
            return
        self._drop_partial_request()
        payload = answer.to_bytes()
        with self.outbuf_lock:
            self.outbufs[-1].append(payload)
            self.current_outbuf_count += len(payload)
            self.total_outbufs_len += len(payload)
        self._start_linger()
        self.server.pull_trigger()

    def _start_linger(self) -> None:
        """From now on: send what is queued, then half-close and drop whatever the client
        still sends until it closes or `LINGER_S` passes. Closing at once, with its unread
        body in our receive buffer, would make the kernel reset the connection, and the
        client could lose the answer with it."""
        self._drop_partial_request()
        self.request_started = None
        self.close_when_flushed = False
        self.linger_until = time.monotonic() + LINGER_S
        self._write_shut = False

    def _drop_partial_request(self) -> None:
        if self.request is not None:
            self.request.close()  # its body's spool file, if it overflowed into one
            self.request = None

    def handle_close(self) -> None:
        self._drop_partial_request()
        super().handle_close()

    def close(self) -> None:
        # `wasyncore.close_all` calls this, not handle_close: release the spool files too.
        self.handle_close()

    def handle_write(self) -> None:
        if self.linger_until is None and self.close_when_flushed and not self.requests:
            self._start_linger()  # the last answer (an error, `Connection: close`) is queued
        if self.linger_until is None:
            return super().handle_write()
        self._flush_exception(self._flush_some)
        if not self.total_outbufs_len and not self._write_shut and self.socket is not None:
            self._write_shut = True
            try:  # the answer is out: say so, and drain the rest until the linger ends
                self.socket.shutdown(socket.SHUT_WR)
            except OSError:
                self.handle_close()

    def writable(self) -> bool:
        if self.linger_until is not None:
            return bool(self.total_outbufs_len)
        return super().writable()


class GuardedServer(TcpWSGIServer):
    """waitress's TCP server with the deadlines and the connection limit above."""

    channel_class = GuardedChannel

    def __init__(self, application: tp.Any, flask_app: tp.Any, settings: Settings, adj: Adjustments,
                 spool_dir: Path, sock: tp.Optional[socket.socket] = None) -> None:
        self.flask_app = flask_app  # for the early answers: `application` is wrapped
        self.settings = settings
        self.spool_dir = str(spool_dir)
        self.shed_connections = 0
        self._last_shed_log = 0.0
        self._stop_requested = False
        self._early_answers: collections.deque = collections.deque()
        self._early_pool = concurrent.futures.ThreadPoolExecutor(EARLY_ANSWER_THREADS,
                                                                  thread_name_prefix="early-answer")
        dispatcher = ThreadedTaskDispatcher()
        dispatcher.set_thread_count(adj.threads)
        super().__init__(application, map={}, _sock=sock, dispatcher=dispatcher, adj=adj,
                         sockinfo=adj.listen[0], bind_socket=sock is None)

    def stop(self) -> None:
        """Make `run()` return (from any thread): it stops taking requests and ends its threads."""
        self._stop_requested = True
        self.pull_trigger()

    def readable(self) -> bool:
        # Called by the I/O thread at every turn of its loop (and woken by `pull_trigger`).
        if self._stop_requested:
            raise SystemExit  # ends `run()`
        self._send_early_answers()
        super().readable()  # runs `maintenance` every MAINTENANCE_INTERVAL_S
        # Always accept: over the limit a connection gets a 503 rather than the backlog.
        return self.accepting

    def handle_accept(self) -> None:
        if len(self.active_channels) < self.settings.api_max_connections:
            return super().handle_accept()
        try:
            accepted = self.accept()
        except OSError:
            return
        if accepted is None:
            return
        conn, addr = accepted
        self.shed_connections += 1
        now = time.monotonic()
        if now - self._last_shed_log > SHED_LOG_INTERVAL_S:
            self._last_shed_log = now
            log.warning("at the limit of %d connections (DEMIX_API_MAX_CONNECTIONS): answering 503 "
                        "to new ones (%d so far)", self.settings.api_max_connections, self.shed_connections)
        # A channel of its own, so the 503 lingers like any refusal instead of being reset away.
        channel = self.channel_class(self, conn, self.fix_addr(addr), self.adj, map=self._map)
        channel.refuse(EarlyAnswer.json_error(
            "503 Service Unavailable", "service_unavailable",
            f"the server is at its limit of {self.settings.api_max_connections} connections "
            "(DEMIX_API_MAX_CONNECTIONS); try again shortly", (("Retry-After", str(RETRY_AFTER_S)),)))

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # idle keep-alive connections (channel_timeout)
        monotonic = time.monotonic()
        for channel in list(self.active_channels.values()):
            channel.enforce_deadlines(monotonic, now)

    def ask_early_answer(self, channel: GuardedChannel, request: tp.Any) -> None:
        """Ask the app, in the early-answer thread, whether the headers of `request` (its
        body still coming) decide its answer; `readable` sends it if so."""
        environ = request_environ(request, self)

        def answered(future: concurrent.futures.Future) -> None:
            answer = future.result()
            if answer is not None:
                self._early_answers.append((channel, request, EarlyAnswer.of_response(answer)))
                self.pull_trigger()

        self._early_pool.submit(answer_from_headers, self.flask_app, environ).add_done_callback(answered)

    def _send_early_answers(self) -> None:
        while self._early_answers:
            channel, request, answer = self._early_answers.popleft()
            # Only while that request is still being received: a request that arrived
            # whole meanwhile is the app's, which gives the same answer.
            if channel.request is request and channel.connected:
                channel.refuse(answer)


class AccessLog:
    """One log line per answered request (method, path, status, bytes, seconds), as the
    API's former server wrote: a WSGI middleware, since waitress keeps no access log."""

    def __init__(self, app: tp.Any) -> None:
        self.app = app

    def __call__(self, environ: dict, start_response: tp.Callable) -> tp.Iterator[bytes]:
        started = time.perf_counter()
        status = ["-"]
        sent = 0

        def recording_start_response(status_line: str, headers: list, exc_info: tp.Any = None) -> tp.Any:
            status[0] = status_line.split(" ", 1)[0]
            return start_response(status_line, headers, exc_info)

        body = self.app(environ, recording_start_response)
        try:
            for chunk in body:
                sent += len(chunk)
                yield chunk
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
            access_log.info('%s "%s %s" %s %d %.3fs', environ.get("REMOTE_ADDR", "-"), environ["REQUEST_METHOD"],
                            environ.get("PATH_INFO", ""), status[0], sent, time.perf_counter() - started)


access_log = logging.getLogger("demix.api.access")


def make_server(app: tp.Any, settings: Settings, sock: tp.Optional[socket.socket] = None,
                log_requests: bool = False) -> GuardedServer:
    """The front serving the API `app` on DEMIX_HOST:DEMIX_PORT (or on the listening `sock`),
    with an access log line per request when `log_requests`."""
    services = app.extensions["demix"]
    services.storage.incoming_dir.mkdir(parents=True, exist_ok=True)
    _raise_open_file_limit(settings.api_max_connections + OTHER_FILES)
    adj = Adjustments(
        host=settings.host, port=settings.port,
        threads=settings.api_threads,
        # The connection limit is ours (shedding with a 503); waitress's stops accepting.
        connection_limit=1 << 30,
        channel_timeout=max(1, round(settings.api_idle_timeout_s)),
        cleanup_interval=MAINTENANCE_INTERVAL_S,
        recv_bytes=RECV_BYTES,
        inbuf_overflow=SPOOL_OVER_BYTES,
        max_request_body_size=settings.max_upload_bytes + FORM_OVERHEAD_BYTES + 1,  # then 413
        asyncore_use_poll=True,  # select() stops at 1024 descriptors
        ident="demix",
        expose_tracebacks=False,
    )
    return GuardedServer(AccessLog(app) if log_requests else app, app, settings, adj,
                         services.storage.incoming_dir, sock)


def _raise_open_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """`python -m demix.api.front [--threads N]`: serve `demix.api.create_app()` until SIGTERM or SIGINT."""
    import argparse

    from demix.api import create_app

    parser = argparse.ArgumentParser(prog="python -m demix.api.front")
    parser.add_argument("--threads", type=int, help="threads running requests (DEMIX_API_THREADS)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    # waitress warns of a "task queue depth" whenever all threads are busy: a normal moment.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    settings = Settings.from_env(**({"api_threads": args.threads} if args.threads else {}))
    server = make_server(create_app({"SETTINGS": settings}), settings, log_requests=True)

    def stop(_signum: int, _frame: tp.Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    log.info("serving the API on http://%s:%s (%d threads, at most %d connections)",
             settings.host, server.effective_port, settings.api_threads, settings.api_max_connections)
    try:
        server.run()  # returns on SystemExit/KeyboardInterrupt, after stopping its threads
    finally:
        close_server(server)


def close_server(server: GuardedServer) -> None:
    """Close the listening socket and every connection of a server that has stopped running."""
    server._early_pool.shutdown(wait=True, cancel_futures=True)
    wasyncore.close_all(server._map)


if __name__ == "__main__":
    sys.exit(main())
