"""Child processes that never outlive their parent."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

from demix.host_processes import process_ids, process_stat

_TIE_TO_PARENT = Path(__file__).with_name("tie_to_parent.py")


def popen_child(args: tp.Sequence[str], **kwargs: tp.Any) -> subprocess.Popen:
    """Start `args` in its own process group (a terminal's Ctrl-C reaches only us, and
    we stop the children in order) and, on Linux, tied to our lifetime: it gets SIGTERM
    when we die, even by SIGKILL (`tie_to_parent.py` says how, and why not `preexec_fn`).

    Raises:
        FileNotFoundError: the program does not exist, as `subprocess.Popen` would.
    """
    args = list(args)
    program = shutil.which(args[0], path=(kwargs.get("env") or os.environ).get("PATH"))
    if program is None:
        raise FileNotFoundError(f"no such program: {args[0]}")
    if sys.platform.startswith("linux"):
        args = [sys.executable, "-I", "-S", str(_TIE_TO_PARENT), str(os.getpid()), program, *args[1:]]
    return subprocess.Popen(args, start_new_session=True, **kwargs)


GROUP_GONE_TIMEOUT_S = 10.0
"""How long `stop_process` waits for a SIGKILLed process group's members to be gone."""


def stop_process(process: subprocess.Popen, timeout: float, sig: int = signal.SIGTERM) -> tp.Optional[int]:
    """Ask a child to stop, wait up to `timeout`, then kill its whole process group, and
    return once no member of the group is left (SIGKILL is delivered asynchronously).

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
    _wait_group_gone(process.pid, GROUP_GONE_TIMEOUT_S)
    return process.returncode


def _wait_group_gone(group: int, timeout: float) -> bool:
    """Wait until process group `group` has no running member left; False if one still runs
    after `timeout` (a process stuck in the kernel: nothing more can be done from here).
    Zombies count as gone: they run nothing, and whoever inherited them reaps them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running_group_members(group):
            return True
        time.sleep(0.02)
    return False


def _running_group_members(group: int) -> list[int]:
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):
        return []
    if not os.path.isdir("/proc/self"):  # no /proc to tell zombies apart: the group is there
        return [group]
    return [pid for pid in process_ids()
            if (stat := process_stat(pid)) is not None and stat.group == group and stat.running]


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
