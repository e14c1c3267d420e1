"""A threaded HTTP server on 127.0.0.1 answering scripted routes, for code that downloads."""
from __future__ import annotations

import contextlib
import http.server
import threading
import typing as tp


@contextlib.contextmanager
def serve(handler_factory: tp.Callable[..., type]) -> tp.Iterator[str]:
    """Run a threaded HTTP server on 127.0.0.1 for the duration of the block; yield its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_factory)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def handler(routes: dict[str, tp.Callable[[http.server.BaseHTTPRequestHandler], None]]) -> type:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            route = routes.get(self.path)
            if route is None:
                self.send_error(404)
            else:
                route(self)

        def log_message(self, *args: tp.Any) -> None:
            pass
    return Handler
