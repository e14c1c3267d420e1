"""`demix up` run as a user runs it, and the processes it leaves behind."""
from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import typing as tp
import uuid
from pathlib import Path

from cli.redis_server import free_port

DEMIX = str(Path(sys.executable).parent / "demix")


def processes_with_marker(marker: str) -> list[int]:
    """Pids of live processes whose environment carries `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                if "\nState:\tZ" not in (entry / "status").read_text():  # zombies are already dead
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


@contextlib.contextmanager
def demix_up(tmp_path: Path, ready_timeout: float = 300, stop_signal: int = signal.SIGINT,
             **settings: str) -> tp.Iterator[tuple[str, list, str]]:
    """Run `demix up` with a fresh data dir until the block ends, then Ctrl-C it (or send
    `stop_signal`) and check it exits 0 leaving no process behind. Yields (url, output
    lines, marker)."""
    marker_value = uuid.uuid4().hex
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DEMIX_REDIS_URL"}
    env.update({"DEMIX_PORT": str(port), "DEMIX_FLOWER_PORT": str(free_port()),
                "DEMIX_GRPC_PORT": str(free_port()), "DEMIX_DATA_DIR": str(tmp_path / "data"),
                "DEMIX_API_WORKERS": "1", "DEMIX_TEST_MARKER": marker_value, **settings})
    process = subprocess.Popen([DEMIX, "up"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True)
    reader.start()
    output: list = []
    try:
        while not output or "demix is ready" not in output[-1]:
            output.append(lines.get(timeout=ready_timeout))
        yield f"http://127.0.0.1:{port}", output, marker_value
    finally:
        process.send_signal(stop_signal)
        try:
            returncode = process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        finally:
            reader.join(10)
            process.stdout.close()
    output.extend(lines.queue)
    assert returncode == 0, "".join(output)
    assert processes_with_marker(marker_value) == []
