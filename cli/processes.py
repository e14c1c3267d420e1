"""Child processes that never outlive their parent."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import typing as tp

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux delivers SIGTERM to the child if the parent dies, even by SIGKILL.
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass


def popen_child(args: tp.Sequence[str], **kwargs: tp.Any) -> subprocess.Popen:
    """Start `args` in its own process group (a terminal's Ctrl-C reaches only us, and
    we stop the children in order) and tied to our lifetime."""
    return subprocess.Popen(list(args), start_new_session=True, preexec_fn=_die_with_parent, **kwargs)


def stop_process(process: subprocess.Popen, timeout: float, sig: int = signal.SIGTERM) -> tp.Optional[int]:
    """Ask a child to stop, wait up to `timeout`, then kill its whole process group.

    `sig` goes to the child alone, as `docker compose stop` sends it to a container's
    first process: Celery and gunicorn then stop their own pool processes gracefully (a
    Celery worker hands its running job back to the queue). Signalling the whole group
    would kill the pool processes outright, and a running job would wait for its lease
    to expire.
    """
    if process.poll() is None:
        try:
            os.kill(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()
    # Grandchildren (gunicorn or celery pool workers) may linger a moment after their parent.
    _signal_group(process, signal.SIGKILL)
    return process.returncode


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
