"""Which worker processes are warm (`demix.readiness`), in a real Redis: each process's
entry, reading the ones written since a time, removing one's own, and forgetting the
entries of this host's processes that died without removing theirs."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from demix.redis_keys import warm_workers_key
from demix.readiness import clear_ready, forget_dead_processes, mark_ready, process_id, ready_workers

HOST = socket.gethostname()


@pytest.fixture
def written(redis_client):
    """Worker names this test wrote entries for (removed after it)."""
    names: list[str] = []
    yield names
    if names:
        redis_client.hdel(warm_workers_key(), *names)


def exited_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def test_this_process_is_named_by_host_and_pid_and_clears_only_its_own_entry(redis_client, written):
    assert process_id() == f"{HOST}:{os.getpid()}"
    written += [process_id(), "elsewhere:1"]
    mark_ready(redis_client, {"model": "htdemucs", "device": "cpu"})
    mark_ready(redis_client, {"model": "htdemucs"}, worker="elsewhere:1")
    entry = ready_workers(redis_client)[process_id()]
    assert entry["model"] == "htdemucs" and entry["device"] == "cpu" and entry["ready_at"] > 0
    clear_ready(redis_client)
    assert process_id() not in ready_workers(redis_client)
    assert "elsewhere:1" in ready_workers(redis_client)


def test_only_entries_written_since_a_time_are_read_as_ready(redis_client, written):
    written += ["host-a:1", "host-b:2"]
    mark_ready(redis_client, {"model": "m", "ready_at": 1000.0}, worker="host-a:1")
    mark_ready(redis_client, {"model": "m", "ready_at": 2000.0}, worker="host-b:2")
    assert {"host-a:1", "host-b:2"} <= set(ready_workers(redis_client))
    since = ready_workers(redis_client, since=2000.0)
    assert "host-b:2" in since and "host-a:1" not in since  # `demix up` waits for a fresh one


@pytest.mark.processes
def test_entries_of_this_hosts_dead_processes_are_forgotten(redis_client, written):
    gone = exited_pid()
    names = [f"{HOST}:{gone}", process_id(), f"elsewhere:{gone}", f"{HOST}:not-a-pid"]
    written += names
    for name in names:
        mark_ready(redis_client, {"model": "htdemucs"}, worker=name)
    assert forget_dead_processes(redis_client) == [f"{HOST}:{gone}"]
    left = set(ready_workers(redis_client))
    assert {process_id(), f"elsewhere:{gone}", f"{HOST}:not-a-pid"} <= left and f"{HOST}:{gone}" not in left
    # Each host cleans up its own: told it is `elsewhere`, it removes that host's dead entry.
    assert forget_dead_processes(redis_client, host="elsewhere") == [f"elsewhere:{gone}"]


def test_another_users_live_process_is_not_taken_for_dead(redis_client, written):
    written.append(f"{HOST}:1")  # pid 1 always exists (signalling it may not be permitted to us)
    mark_ready(redis_client, {"model": "htdemucs"}, worker=f"{HOST}:1")
    assert f"{HOST}:1" not in forget_dead_processes(redis_client)
    assert f"{HOST}:1" in ready_workers(redis_client)
