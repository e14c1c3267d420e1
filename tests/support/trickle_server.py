"""A slow HTTP server on loopback for tests of bounded fetches: it answers every request
without ever finishing, and notes when the client hangs up."""
from __future__ import annotations

import select
import socket
import threading
import time
import typing as tp

BODY_LENGTH = 10_000_000
"""The Content-Length announced, never reached."""


class TrickleServer:
    """Answers each connection by `mode`, one byte every `interval` seconds, for at most
    `lifetime` seconds (then it closes the connection, so a client that waits it out ends):

    - "body": the status line and headers at once, then the body a byte at a time;
    - "headers": the status line and headers a byte at a time, never ending;
    - "silent": the status line and headers at once, then nothing.

    `connections` counts the connections accepted, `requests` the requests read; `hung_up`
    is set, and `hung_up_at` (time.monotonic()) noted, when a client closes its connection;
    `sent` counts the body bytes sent.
    """

    def __init__(self, mode: str = "body", interval: float = 0.5, lifetime: float = 20.0):
        assert mode in ("body", "headers", "silent")
        self.mode, self.interval, self.lifetime = mode, interval, lifetime
        self.connections = 0
        self.requests = 0
        self.sent = 0
        self.hung_up = threading.Event()
        self.hung_up_at: tp.Optional[float] = None
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/song.wav"
        self._threads = [threading.Thread(target=self._accept, daemon=True)]

    def __enter__(self) -> "TrickleServer":
        self._threads[0].start()
        return self

    def __exit__(self, *_: tp.Any) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(10)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except socket.timeout:
                continue
            self.connections += 1
            thread = threading.Thread(target=self._answer, args=(connection,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            request = b""
            connection.settimeout(5)
            while b"\r\n\r\n" not in request:
                piece = connection.recv(4096)
                if not piece:
                    self._note_hang_up()
                    return
                request += piece
            self.requests += 1
            head = f"HTTP/1.1 200 OK\r\nContent-Type: audio/wav\r\nContent-Length: {BODY_LENGTH}\r\n".encode()
            if self.mode == "headers":
                drip = iter(head + b"X-Slow: " + b"a" * (1 << 20))
            else:
                connection.sendall(head + b"\r\n")
                drip = iter(b"RIFF" + b"\0" * (1 << 20)) if self.mode == "body" else iter(())
            ends = time.monotonic() + self.lifetime
            while time.monotonic() < ends and not self._stop.is_set():
                if self._client_left(connection):
                    self._note_hang_up()
                    return
                byte = next(drip, None)
                if byte is not None:
                    try:
                        connection.sendall(bytes([byte]))
                    except OSError:
                        continue  # the client left: seen at the next turn
                    if self.mode == "body":
                        self.sent += 1

    def _note_hang_up(self) -> None:
        self.hung_up_at = time.monotonic()
        self.hung_up.set()

    def _client_left(self, connection: socket.socket) -> bool:
        """Wait `interval` for the client to close its end (True) or not (False)."""
        readable, _, _ = select.select([connection], [], [], self.interval)
        if not readable:
            return False
        try:
            return connection.recv(4096) == b""
        except OSError:
            return True
