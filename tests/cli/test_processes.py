"""demix.cli.processes: children in their own process group, tied to the parent's life."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from demix.cli.processes import popen_child, stop_process
from tests.support.waiting import wait_for

pytestmark = pytest.mark.processes


def alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_gets_sigterm_when_its_parent_is_killed_with_sigkill(tmp_path):
    """The promise `demix up` relies on: kill -9 it, and none of its parts is left behind."""
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parents[2])!r})
        from demix.cli.processes import popen_child
        child = popen_child(["sleep", "300"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(300)
        """)])
    try:
        child = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), "the child's pid", timeout=60))
        wait_for(lambda: Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0].endswith(b"sleep"),
                 "the child to become `sleep`", timeout=60)
        assert os.getpgid(child) == child != os.getpgid(parent.pid)  # its own process group
        parent.kill()
        parent.wait()
        wait_for(lambda: not alive(child), "the orphaned child to end", timeout=30)
    finally:
        parent.kill()
        parent.wait()


def test_children_started_while_other_threads_run_all_start():
    """Many children started while threads relay output (as `demix up` does): every one
    execs and exits (a fork-time lock held by another thread would leave one hanging)."""
    stop = threading.Event()

    def relay() -> None:
        chatter = subprocess.Popen(["yes", "a line of a child's output"], stdout=subprocess.PIPE)
        with chatter.stdout:
            for raw in chatter.stdout:
                raw.decode(errors="replace").rstrip()
                if stop.is_set():
                    break
        chatter.kill()
        chatter.wait()

    relays = [threading.Thread(target=relay) for _ in range(3)]
    for thread in relays:
        thread.start()
    try:
        for _ in range(50):
            assert popen_child([sys.executable, "-I", "-S", "-c", "pass"]).wait(timeout=60) == 0
    finally:
        stop.set()
        for thread in relays:
            thread.join(10)


def test_a_missing_program_is_refused_by_the_parent_as_popen_would():
    with pytest.raises(FileNotFoundError):
        popen_child(["no-such-program-demix"])


def test_stop_process_ends_the_child_and_its_group():
    child = popen_child(["sh", "-c", "sleep 300 & sleep 300 & wait"])
    wait_for(lambda: len(group(child.pid)) >= 3, "the shell and its two sleeps", timeout=60)
    stop_process(child, timeout=5)
    assert child.returncode == -signal.SIGTERM
    # The group gets SIGKILL; its members end as soon as the kernel delivers it.
    wait_for(lambda: group(child.pid) == [], "the child's whole group to end", timeout=30)


def group(pgid: int) -> list[int]:
    """Live processes of process group `pgid`."""
    return [int(entry.name) for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and alive(int(entry.name)) and _pgid(int(entry.name)) == pgid]


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError:
        return -1
