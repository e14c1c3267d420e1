"""A real `demix up` for the benches: started in a scratch folder, timed through its HTTP API.

Not a bench itself (the leading underscore keeps `tests/test_bench.py` from running it
as one); `compare_demucs.py`, `service_overhead.py` and `soak.py` use it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.client import Client  # noqa: E402
from cli.redis_server import free_port  # noqa: E402

READY_LINE = "demix is ready"


@dataclasses.dataclass
class LiveService:
    url: str
    ready_s: float
    """From starting `demix up` to its ready line: Redis, the API, and a worker that has
    loaded and warmed the model."""
    pid: int = 0
    """`demix up`'s process (its parts are its children)."""
    output: tp.Optional[Path] = None
    """Everything `demix up` prints (its events and its parts' logs), written as it comes."""

    def output_text(self) -> str:
        return self.output.read_text(errors="replace") if self.output else ""

    @property
    def redis_url(self) -> tp.Optional[str]:
        """The URL of the private Redis `demix up` started (None with DEMIX_REDIS_URL set)."""
        found = re.search(r"started private Redis \(.*\) on port (\d+)", self.output_text())
        return f"redis://127.0.0.1:{found.group(1)}/0" if found else None


@contextlib.contextmanager
def running_service(scratch: Path, settings: dict[str, str],
                    ready_timeout_s: float = 600.0) -> tp.Iterator[LiveService]:
    """`demix up` with `settings` (DEMIX_* variables) over a clean environment, its data
    under `scratch`; stopped (SIGINT, as Ctrl-C) on leaving. Its output is drained into
    `scratch/demix-up-<port>.out` all along (a full pipe would stall the service)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMIX_")}
    env.update({"DEMIX_PORT": str(port), "DEMIX_DATA_DIR": str(scratch / "data"),
                # Only the service's own path is measured: no Flower, no gRPC (nor their ports).
                "DEMIX_FLOWER_PORT": "0", "DEMIX_GRPC_PORT": "0", **settings})
    started = time.perf_counter()
    scratch.mkdir(parents=True, exist_ok=True)
    log, output = scratch / f"demix-up-{port}.log", scratch / f"demix-up-{port}.out"
    ready = threading.Event()
    with open(log, "w") as log_file:
        up = subprocess.Popen([str(Path(sys.executable).parent / "demix"), "up"], env=env,
                              stdout=subprocess.PIPE, stderr=log_file, text=True)

    def drain() -> None:
        assert up.stdout is not None
        with open(output, "w") as out:
            for line in up.stdout:
                out.write(line)
                out.flush()
                if READY_LINE in line:
                    ready.set()

    drainer = threading.Thread(target=drain, name="demix-up-output", daemon=True)
    drainer.start()
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not ready.wait(0.2):
            if up.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"demix up did not get ready: {log.read_text()[-2000:]}"
                                   f"{output.read_text(errors='replace')[-2000:]}")
        yield LiveService(f"http://127.0.0.1:{port}", time.perf_counter() - started, up.pid, output)
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(120)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        drainer.join(10)


def time_job(url: str, path: Path, stems: str, out: Path, **output_options: tp.Any) -> float:
    """Seconds from uploading `path` to having every stem downloaded into `out`, the way a
    client of the service does it (`cli.client`: submit, poll, download)."""
    started = time.perf_counter()
    with Client(url) as client:
        job = client.submit(path, stems, **output_options)
        done = client.wait(job["id"], poll_interval_s=0.1)
        client.download(job["id"], out, job=done)
    return time.perf_counter() - started
