"""A real HTTP webhook receiver for tests: a `http.server` thread on a free port that
records every request and answers from a script (status codes, hang, trickle, a slow answer,
a redirect), for all requests in turn or for each delivery id on its own."""
from __future__ import annotations

import collections
import dataclasses
import http.server
import threading
import time
import typing as tp

from tests.support.waiting import wait_for

HANG = "hang"
"""A scripted answer: keep the connection open without answering until the receiver stops."""


@dataclasses.dataclass(frozen=True)
class Trickle:
    """A scripted answer: the status line `HTTP/1.1 <status> ...` sent a byte at a time over
    `seconds`, then the headers (unless the client hung up meanwhile)."""
    status: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class Slow:
    """A scripted answer: `status`, after `seconds` of silence."""
    status: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class Redirect:
    """A scripted answer: `status` (a 3xx) with `Location: <location>`."""
    location: str
    status: int = 302


Answer = tp.Union[int, str, Trickle, Slow, Redirect]


@dataclasses.dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class WebhookReceiver:
    """Answers request N with `script[N]` (the last entry repeats); `requests` lists what came in,
    `answered` the (delivery id, status) of every answer sent in full, `hung_up` the delivery
    ids of trickled answers the client left before their end.

    Args:
        per_delivery: count N per `X-Demix-Delivery` id, so every delivery meets the whole script.
    """

    def __init__(self, script: tp.Sequence[Answer] = (200,), per_delivery: bool = False):
        self.script = list(script)
        self.per_delivery = per_delivery
        self.requests: list[Received] = []
        self.answered: list[tuple[str, int]] = []
        self.hung_up: list[str] = []
        self._lock = threading.Lock()
        self._released = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                delivery = self.headers.get("X-Demix-Delivery", "")
                with receiver._lock:
                    receiver.requests.append(Received(self.path, dict(self.headers.items()), body))
                    seen = sum(1 for r in receiver.requests
                               if not receiver.per_delivery or r.headers.get("X-Demix-Delivery") == delivery)
                    answer = receiver.script[min(seen, len(receiver.script)) - 1]
                try:
                    status = self._answer(answer)
                except OSError:  # the client hung up
                    if isinstance(answer, Trickle):
                        with receiver._lock:
                            receiver.hung_up.append(delivery)
                    self.close_connection = True
                    return
                if status is not None:
                    with receiver._lock:
                        receiver.answered.append((delivery, status))

            def _answer(self, answer: Answer) -> tp.Optional[int]:
                if answer == HANG:
                    receiver._released.wait(120)
                    return None
                if isinstance(answer, Trickle):
                    line = f"HTTP/1.1 {answer.status} Trickled\r\n".encode()
                    for byte in line:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        if receiver._released.wait(answer.seconds / len(line)):
                            return None
                    self.wfile.write(b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                    self.wfile.flush()
                    return answer.status
                if isinstance(answer, Slow):
                    time.sleep(answer.seconds)
                    answer = answer.status
                if isinstance(answer, Redirect):
                    self.send_response(answer.status)
                    self.send_header("Location", answer.location)
                    status = answer.status
                else:
                    status = int(answer)
                    self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return status

            def log_message(self, *_: tp.Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "WebhookReceiver":
        self._thread.start()
        return self

    def __exit__(self, *_: tp.Any) -> None:
        self._released.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)

    def wait_for(self, count: int, timeout: float = 60.0) -> list[Received]:
        """Wait until at least `count` requests arrived; returns them."""
        def arrived() -> tp.Optional[list[Received]]:
            with self._lock:
                return list(self.requests) if len(self.requests) >= count else None

        return wait_for(arrived, f"{count} webhook request(s)",
                        timeout=timeout, every=0.02)

    def successes(self) -> collections.Counter[str]:
        """How many 2xx answers each delivery id got."""
        with self._lock:
            return collections.Counter(delivery for delivery, status in self.answered if 200 <= status < 300)

    def requests_per_delivery(self) -> collections.Counter[str]:
        with self._lock:
            return collections.Counter(r.headers.get("X-Demix-Delivery", "") for r in self.requests)
