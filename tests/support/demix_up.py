"""`demix up` run as a user runs it, and the processes it leaves behind."""
from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import typing as tp
import uuid
from pathlib import Path

from demix.cli.redis_server import free_port

DEMIX = str(Path(sys.executable).parent / "demix")
SILENCE_S = 150.0


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


def describe_processes(pids: tp.Iterable[int]) -> str:
    """One line per process: pid, parent, state, what it waits in, command line."""
    described = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            wchan = Path(f"/proc/{pid}/wchan").read_text()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        described.append(f"  pid {pid} ppid {ppid} state {state} wchan {wchan or '-'}: {argv[:200]}")
    return "\n".join(described)


def _diagnose_hang(process: subprocess.Popen, marker: str, lines: queue.Queue, output: list) -> str:
    """What `demix up` and its children were doing when it fell silent: the processes, then
    each one's Python stacks (faulthandler prints them on SIGABRT), children first."""
    pids = processes_with_marker(marker)
    report = "".join(output) + "\nprocesses:\n" + describe_processes(pids) + "\n"
    for pid in sorted(pids, key=lambda pid: pid == process.pid):
        if pid == process.pid:
            time.sleep(2)  # the children's stacks reach us through demix up's output relays
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGABRT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)
    while True:
        try:
            report += lines.get(timeout=2)
        except queue.Empty:
            return report


@contextlib.contextmanager
def demix_up(tmp_path: Path, ready_timeout: float = 400, stop_signal: int = signal.SIGINT,
             **settings: str) -> tp.Iterator[tuple[str, list, str]]:
    """Run `demix up` with a fresh data dir until the block ends, then Ctrl-C it (or send
    `stop_signal`) and check it exits 0 leaving no process behind. Yields (url, output
    lines, marker).

    It must say it is ready within `ready_timeout`, and never be silent for `SILENCE_S`
    meanwhile (while it waits it says so every `demix.cli.supervisor.WAITING_NOTICE_S`): a hang
    fails the test with the output so far and every process's stacks.
    """
    marker_value = uuid.uuid4().hex
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DEMIX_REDIS_URL"}
    env.update({"DEMIX_PORT": str(port), "DEMIX_FLOWER_PORT": str(free_port()),
                "DEMIX_GRPC_PORT": str(free_port()), "DEMIX_DATA_DIR": str(tmp_path / "data"),
                "DEMIX_TEST_MARKER": marker_value,
                # A process that hangs is sent SIGABRT below and prints its Python stacks.
                "PYTHONFAULTHANDLER": "1", **settings})
    process = subprocess.Popen([DEMIX, "up"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True)
    reader.start()
    output: list = []
    deadline = time.monotonic() + ready_timeout
    try:
        while not output or "demix is ready" not in output[-1]:
            wait_s = min(SILENCE_S, deadline - time.monotonic())
            try:
                output.append(lines.get(timeout=max(wait_s, 0)))
            except queue.Empty:
                raise AssertionError(f"demix up was not ready within {ready_timeout:.0f}s, or silent for "
                                     f"{SILENCE_S:.0f}s:\n"
                                     + _diagnose_hang(process, marker_value, lines, output)) from None
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


@contextlib.contextmanager
def demix_up_started(tmp_path: Path, demix: str = DEMIX, cwd: tp.Optional[Path] = None,
                     env: tp.Optional[tp.Mapping[str, str]] = None,
                     **settings: str) -> tp.Iterator[tuple[subprocess.Popen, str, list]]:
    """`demix up` (the program `demix`, in `cwd`, with `env` or ours) started as in
    `demix_up`, without waiting for it to be ready; yields (process, marker, its output lines
    so far: a list that grows). Whatever is left of it when the block ends is killed (a test
    that checks nothing is left does so inside)."""
    marker = uuid.uuid4().hex
    env = {k: v for k, v in (os.environ if env is None else env).items() if k != "DEMIX_REDIS_URL"}
    env.update({"DEMIX_PORT": str(free_port()), "DEMIX_FLOWER_PORT": "0", "DEMIX_GRPC_PORT": "0",
                "DEMIX_DATA_DIR": str(tmp_path / "data"),
                "DEMIX_TEST_MARKER": marker, **settings})
    process = subprocess.Popen([demix, "up"], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    output: list = []
    reader = threading.Thread(target=lambda: [output.append(line) for line in process.stdout], daemon=True)
    reader.start()
    try:
        yield process, marker, output
    finally:
        for pid in processes_with_marker(marker):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        process.wait(30)
        reader.join(10)
        process.stdout.close()
