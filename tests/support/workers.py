"""`demix worker` processes started the way an operator starts them, for the tests that
need workers of their own (split jobs, machines sharing only Redis and a bucket)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import typing as tp
from pathlib import Path

from demix.cli.argv import worker_argv
from demix.cli.processes import popen_child, stop_process
from demix.config import Settings
from demix.host_processes import process_ids, process_stat


@contextlib.contextmanager
def worker_processes(folder: Path, count: int, settings: tp.Mapping[str, str],
                     own_data_dirs: bool = False, concurrency: int = 1) -> tp.Iterator[list[subprocess.Popen]]:
    """`count` `demix worker` processes (prefork, `concurrency` children, INFO logs) with the test
    environment plus `settings` (DEMIX_* variables), each logging to its own file in
    `folder`; killed (SIGKILL) on leaving, so a test can also kill one itself.

    Args:
        own_data_dirs: give worker n its own DEMIX_DATA_DIR, `folder/worker-<n>`, as on
            machines sharing no disk (else they all use `settings`' or the environment's).
    """
    processes = []
    with contextlib.ExitStack() as logs:
        try:
            for index in range(count):
                env = dict(os.environ, **settings)
                if own_data_dirs:
                    env["DEMIX_DATA_DIR"] = str(folder / f"worker-{index}")
                argv = worker_argv(Settings.from_env(env), concurrency=concurrency, loglevel="INFO")
                # A test may start workers more than once in one folder: every start has new logs.
                log = logs.enter_context(open(folder / f"worker-{index}-{time.monotonic_ns()}.log", "ab"))
                processes.append(popen_child(argv, env=env, stdout=log, stderr=log))
            yield processes
        finally:
            for process in processes:
                with contextlib.suppress(ProcessLookupError):
                    stop_process(process, timeout=30, sig=signal.SIGKILL)


def child_pids(parent: int) -> dict[int, str]:
    """The live (not zombie) children of process `parent`, with their command lines."""
    children = {}
    for pid in process_ids():
        stat = process_stat(pid)
        if stat is None or stat.ppid != parent or not stat.running:
            continue
        try:
            children[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # it ended meanwhile
            continue
    return children


def pool_pids(worker_pid: int) -> set[int]:
    """The pool processes of the `demix worker` whose main process is `worker_pid` (its
    children other than its background process)."""
    return {pid for pid, command in child_pids(worker_pid).items() if "demix.worker.background" not in command}


def background_pids(worker_pid: int) -> set[int]:
    """The background process(es) of that worker (one, but for a moment while it is restarted)."""
    return {pid for pid, command in child_pids(worker_pid).items() if "demix.worker.background" in command}


def worker_answers(worker: subprocess.Popen) -> bool:
    """Whether this `demix worker` answers a Celery ping: its event loop runs (Celery stops
    a worker whose pool processes die before that)."""
    import socket

    from demix.celery_app import celery_app

    args = list(worker.args)
    node = args[args.index("--hostname") + 1].replace("%h", socket.gethostname())
    with celery_app.connection_for_write() as connection:
        return bool(celery_app.control.ping(destination=[node], timeout=1.0, connection=connection))
