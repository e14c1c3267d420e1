"""A real HTTP webhook receiver for tests: a `http.server` thread on a free port that
records every request and answers from a script (status codes, or hang)."""
from __future__ import annotations

import dataclasses
import http.server
import threading
import typing as tp

from tests.support.waiting import wait_for

HANG = "hang"
"""A scripted answer: keep the connection open without answering until the receiver stops."""


@dataclasses.dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class WebhookReceiver:
    """Answers request N with `script[N]` (the last entry repeats); `requests` lists what came in."""

    def __init__(self, script: tp.Sequence[tp.Union[int, str]] = (200,)):
        self.script = list(script)
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        self._released = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.requests.append(Received(self.path, dict(self.headers.items()), body))
                    answer = receiver.script[min(len(receiver.requests), len(receiver.script)) - 1]
                if answer == HANG:
                    receiver._released.wait(120)
                    return
                self.send_response(int(answer))
                self.send_header("Content-Length", "0")
                self.end_headers()

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
