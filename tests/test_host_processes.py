"""demix.host_processes: telling a dead process's leftovers from a live one's belongings."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from demix.host_processes import is_gone_here, process_is_gone, this_host


def test_this_process_is_not_gone():
    assert not process_is_gone(os.getpid())
    assert not is_gone_here(this_host(), str(os.getpid()))


@pytest.mark.processes
def test_a_reaped_process_is_gone_and_so_is_an_unreaped_zombie():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped: a zombie
    assert process_is_gone(child.pid)
    child.wait()  # reaped: no such process at all
    assert process_is_gone(child.pid)


@pytest.mark.processes
def test_a_stopped_process_is_not_gone():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        os.kill(child.pid, signal.SIGSTOP)
        assert not process_is_gone(child.pid)
    finally:
        child.kill()
        child.wait()


def test_another_machines_process_or_a_malformed_pid_is_never_judged_gone():
    assert not is_gone_here(this_host() + "-elsewhere", "999999999")
    assert not is_gone_here(this_host(), "not-a-pid")
    assert is_gone_here(this_host(), "999999999")  # beyond pid_max: no such process here
