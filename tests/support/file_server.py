"""A real HTTP file server for tests of `url` inputs: a `http.server` thread on loopback
that answers scripted routes, and can hold a body half-sent until the test releases it."""
from __future__ import annotations

import http.server
import threading
import typing as tp


class FileServer:
    """Serves scripted answers on `host` (and `port`; 0: a free one): `routes` maps a path
    to (status, headers, body); a route may hold its body's second half until `release` is set."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.routes: dict[str, tuple[int, dict, bytes]] = {}
        self.hold: set[str] = set()
        self.release = threading.Event()
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                status, headers, body = server.routes.get(self.path, (404, {}, b"no such file"))
                self.send_response(status)
                headers = {"Content-Length": str(len(body)), **headers}
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if self.path in server.hold:
                    half = len(body) // 2
                    self.wfile.write(body[:half])
                    self.wfile.flush()
                    server.release.wait(120)
                    body = body[half:]
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading: what a refusal looks like from here

            def log_message(self, *_: tp.Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_port
        self.base = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FileServer":
        self._thread.start()
        return self

    def __exit__(self, *_: tp.Any) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)
