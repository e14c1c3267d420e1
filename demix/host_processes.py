"""Processes of this machine: named by what they leave behind (a readiness entry, a scratch
folder), `<host>` and a pid, so that a sweep can tell the leftovers of a dead process from
the belongings of a live one; and tied to the life of their parent."""
from __future__ import annotations

import ctypes
import os
import socket
import sys
import typing as tp
from pathlib import Path


PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal this process gets when its parent dies."""


def this_host() -> str:
    return socket.gethostname()


def die_with_parent(sig: int, parent: int) -> bool:
    """Have Linux send `sig` to this process when its parent dies, even by SIGKILL;
    returns False when `parent` is already gone (the signal would never come) or the
    platform has no such tie (then callers watch `os.getppid()` themselves)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    return os.getppid() == parent


def process_is_gone(pid: int) -> bool:
    """Whether process `pid` of this machine has exited.

    A zombie counts as gone: a worker killed with SIGKILL can leave its pool processes as
    zombies of a parent that never reaps them, and they run nothing any more.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's process: it exists
        pass
    # No /proc (not Linux), or it exited just now: say alive, the safe side.
    stat = process_stat(pid)
    return stat is not None and not stat.running


class ProcessStat(tp.NamedTuple):
    """What /proc/<pid>/stat says of a process that concerns us."""
    state: str
    ppid: int
    group: int

    @property
    def running(self) -> bool:
        """Not a zombie (it has exited, its parent has not reaped it yet) nor dead."""
        return self.state not in ("Z", "X")


def process_stat(pid: int) -> tp.Optional[ProcessStat]:
    """Process `pid`'s state, parent and process group; None when it is gone or there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    try:
        return ProcessStat(fields[0], int(fields[1]), int(fields[2]))
    except (IndexError, ValueError):
        return None


def process_ids() -> list[int]:
    """Every process of this machine (an empty list without /proc)."""
    try:
        return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return []


def is_gone_here(host: str, pid: str) -> bool:
    """Whether `<host>`, `<pid>` (as a name spells them) is a process of this machine that
    has exited; another machine's processes are never judged gone (their pids mean nothing here)."""
    return host == this_host() and pid.isdigit() and process_is_gone(int(pid))
