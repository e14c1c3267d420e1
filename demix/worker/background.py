"""The worker's background process: the maintenance sweeps (`demix.worker.maintenance`) and the
webhook sender (`demix.jobs.webhooks`), run beside a Celery worker's main process, never in it.

Celery's prefork pool forks the main process each time it starts a pool process: at start,
and again whenever one is replaced after a crash, a kill or `max-tasks-per-child`. A fork
copies every lock in the state it is in, and only the forking thread goes on in the child:
a lock another thread held at that instant (a module's import lock, a logging handler's, a
Redis connection pool's) stays held in the child for ever, and the pool process hangs
before it ever takes a job. The sweeps and the sender need threads, so they live here: a
process started by fork *and exec* (`subprocess`: no Python runs in the child before the
exec, so nothing of the main process's state carries over), tied to the main process (it
ends when that one dies, even by SIGKILL) and restarted by it when it dies. The main
process runs no thread of ours, so any fork of it, the first or the hundredth, copies a
process with one thread, which is forking and holds nothing.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import typing as tp

from demix.config import Settings, get_settings
from demix.host_processes import die_with_parent

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0
"""How long a stopping worker waits for its background process to end before killing it."""

PARENT_CHECK_S = 1.0
"""How often the background process looks whether its worker is still there (where Linux's
parent-death signal is not to be had)."""

LOG_FORMAT = "[%(asctime)s: %(levelname)s/Background] %(message)s"
"""Celery's log format, so the worker's log reads as one."""


def background_argv(worker_pid: int) -> list[str]:
    """The command running the background process of the worker whose main process is `worker_pid`."""
    return [sys.executable, "-m", __name__, str(worker_pid)]


class BackgroundProcess:
    """The background process of this worker, seen from its main process: started,
    restarted when it died (`check`, from the worker's event loop) and stopped."""

    def __init__(self) -> None:
        self.process: tp.Optional[subprocess.Popen] = None
        self.restarts = 0

    def start(self) -> None:
        # Its output goes where the worker's goes (a terminal, `demix up`'s relay, a log file).
        self.process = subprocess.Popen(background_argv(os.getpid()))
        log.info("background process started (pid %d): maintenance sweeps and webhook sender",
                 self.process.pid)

    def check(self) -> None:
        """Start it again if it died."""
        if self.process is None or self.process.poll() is None:
            return
        log.error("the background process (pid %d) exited with %s; starting it again",
                  self.process.pid, self.process.returncode)
        self.restarts += 1
        self.start()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Ask it to stop (SIGTERM), wait up to `timeout_s`, then kill it."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("the background process (pid %d) did not stop within %gs; killing it",
                        process.pid, timeout_s)
            process.kill()
            process.wait()


def run_background(worker_pid: int, settings: Settings, stop: threading.Event) -> None:
    """Run the sweeps and the webhook sender until `stop` is set or the worker is gone."""
    # Imported here: the worker's main process imports this module for `BackgroundProcess`
    # and must not load what only this process needs.
    from demix.celery_app import celery_app
    from demix.services import redis_client
    from demix.jobs.webhooks import start_sender

    from demix.worker.maintenance import SWEEPS, MaintenanceLoop, maintenance_context

    if not die_with_parent(signal.SIGTERM, worker_pid):
        log.warning("worker %d is gone before its background process started", worker_pid)
        return
    loop = MaintenanceLoop(maintenance_context(celery_app, settings), SWEEPS)
    loop.start()
    sender = start_sender(redis_client(settings), settings)
    try:
        while not stop.wait(PARENT_CHECK_S):
            if os.getppid() != worker_pid:
                log.warning("worker %d is gone; its background process stops", worker_pid)
                break
            sender.ensure_running()  # its loop survives any error; this is for what it cannot
    finally:
        sender.stop()
        loop.stop()


def main(argv: tp.Sequence[str]) -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # SIGINT: a terminal's Ctrl-C reaches the whole group
        signal.signal(sig, lambda _signum, _frame: stop.set())
    run_background(int(argv[0]), get_settings(), stop)


if __name__ == "__main__":
    main(sys.argv[1:])
