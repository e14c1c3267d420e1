"""The worker's pool guard (`demix.worker.pool_guard`): pool processes forked from a main process
that holds no lock, a watchdog that replaces one that never gets warm, and the state probes
read. The real-worker tests start `demix worker` with the hazards of
`tests/support/fork_hazard/` loaded into its processes."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest

from demix import redis_keys as keys
from demix.jobs.metrics import WARM_TIMEOUTS_FIELD, ServiceCollector
from demix.readiness import probe_workers, ready_workers
from tests.support.waiting import wait_for
from tests.support.workers import background_pids, pool_pids, worker_answers, worker_processes
from demix.worker.pool_guard import STACK_SIGNAL, PoolWatchdog

HAZARDS = Path(__file__).resolve().parents[1] / "support" / "fork_hazard"


# -- the watchdog, on processes made for it ------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sleeper_with_a_stack_handler(stderr: tp.IO) -> subprocess.Popen:
    """A process that, like a pool process, writes its Python stack on STACK_SIGNAL."""
    code = ("import faulthandler, signal, sys, time\n"
            f"faulthandler.register({int(STACK_SIGNAL)}, file=sys.stderr, all_threads=True)\n"
            "def stuck_in_warm_up():\n    time.sleep(120)\n"
            "print('ready', flush=True)\nstuck_in_warm_up()\n")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=stderr)
    with process.stdout:
        assert process.stdout.readline() == b"ready\n"
    return process


@pytest.mark.processes
def test_the_watchdog_replaces_a_process_not_warm_in_time_and_reads_its_stack(tmp_path):
    clock, later, counted = FakeClock(), [], []
    stderr = tmp_path / "stderr"
    with open(stderr, "wb") as output:
        hung, warm = sleeper_with_a_stack_handler(output), sleeper_with_a_stack_handler(output)
    try:
        processes = {hung.pid: False, warm.pid: True}
        watchdog = PoolWatchdog(30.0, lambda: processes, lambda delay, action: later.append(action),
                                lambda: counted.append(1), clock=clock)
        assert watchdog.check() == {hung.pid: "warming", warm.pid: "warm"}
        clock.now += 29.0
        watchdog.check()
        assert later == [] and counted == []
        clock.now += 1.0
        assert watchdog.check() == {hung.pid: "replacing", warm.pid: "warm"}
        assert counted == [1] and len(later) == 1
        clock.now += 60.0
        watchdog.check()  # being replaced: not asked twice
        assert counted == [1] and len(later) == 1
        wait_for(lambda: "in stuck_in_warm_up" in stderr.read_text(), "the stack written", timeout=30)
        later[0]()  # the kill, once the stack had time to be written
        assert hung.wait(10) == -signal.SIGKILL
        assert warm.poll() is None
    finally:
        for process in (hung, warm):
            process.kill()
            process.wait()


def test_the_watchdog_times_each_process_from_when_it_appeared():
    clock, later = FakeClock(), []
    processes = {101: True}
    watchdog = PoolWatchdog(30.0, lambda: processes, lambda delay, action: later.append(action),
                            lambda: None, clock=clock)
    watchdog.check()
    clock.now += 100.0
    processes[102] = False  # a replacement, started long after the first
    assert watchdog.check() == {101: "warm", 102: "warming"}
    clock.now += 29.0
    assert watchdog.check()[102] == "warming" and later == []
    processes[102] = True
    clock.now += 10.0
    assert watchdog.check() == {101: "warm", 102: "warm"} and later == []


@pytest.mark.processes
def test_openblas_stops_its_thread_at_a_fork():
    """The one thread the worker's main process has besides its own (numpy's OpenBLAS,
    started at import) is not running at a fork: OpenBLAS stops it in its own
    pthread_atfork handler, so it can hold nothing the pool process needs."""
    code = ("import os, numpy\n"
            "numpy.ones((256, 256)) @ numpy.ones((256, 256))\n"
            "before = len(os.listdir('/proc/self/task'))\n"
            "pid = os.fork()\n"
            "if pid == 0:\n    os._exit(0)\n"
            "after = len(os.listdir('/proc/self/task'))\n"
            "os.waitpid(pid, 0)\n"
            "print(before, after)\n")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2"}
    before, after = map(int, subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                            capture_output=True, text=True, timeout=60).stdout.split())
    assert before == 2 and after == 1


# -- probes ------------------------------------------------------------------------------

def write_status(data_dir: Path, pid: int, pool: dict, updated_at: float) -> None:
    import json

    folder = data_dir / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{socket.gethostname()}-{pid}.json").write_text(
        json.dumps({"pool": pool, "pid": pid, "updated_at": updated_at}))


def test_probes_read_the_workers_status_files(tmp_path):
    now = time.time()
    assert probe_workers(tmp_path, "live", now) == (False, f"no running worker on {socket.gethostname()} "
                                                           "has written its status yet")
    write_status(tmp_path, os.getpid(), {"11": "warming"}, now - 5)
    assert probe_workers(tmp_path, "live", now)[0]
    passed, said = probe_workers(tmp_path, "ready", now)
    assert not passed and said == "no pool process has warmed its models yet"
    write_status(tmp_path, os.getpid(), {"11": "warming", "12": "warm"}, now - 5)
    assert probe_workers(tmp_path, "ready", now) == (True, "1 pool process(es) warm")
    write_status(tmp_path, os.getpid(), {"12": "warm"}, now - 600)  # its event loop is stuck
    passed, said = probe_workers(tmp_path, "live", now)
    assert not passed and "has not updated its status for 600s" in said


@pytest.mark.processes
def test_probes_forget_workers_that_are_gone(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    write_status(tmp_path, gone.pid, {"12": "warm"}, time.time())
    assert not probe_workers(tmp_path, "live")[0]
    assert not (tmp_path / "workers" / f"{socket.gethostname()}-{gone.pid}.json").exists()


# -- a real worker ----------------------------------------------------------------------

def hazard_settings(tmp_path: Path, hazards: str, **settings: str) -> dict[str, str]:
    hazard_dir = tmp_path / "hazard"
    hazard_dir.mkdir(exist_ok=True)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(HAZARDS), os.environ.get("PYTHONPATH")])),
            "DEMIX_TEST_FORK_HAZARD": hazards, "DEMIX_TEST_HAZARD_DIR": str(hazard_dir),
            "DEMIX_DATA_DIR": str(tmp_path / "data"), **settings}


def warm_pool_pids(client: redis.Redis, worker_pid: int) -> set[int]:
    """Pool processes of this worker with a readiness entry (they loaded and warmed the model)."""
    host = socket.gethostname()
    entries = ready_workers(client)
    return {pid for pid in pool_pids(worker_pid) if f"{host}:{pid}" in entries}


def logs(folder: Path) -> str:
    return "".join(path.read_text(errors="replace") for path in sorted(folder.glob("*.log")))


@pytest.mark.processes
@pytest.mark.slow
def test_a_pool_process_forked_while_a_sweep_holds_an_import_lock_still_starts(
        redis_client, tiny_model_repo, tmp_path):
    """The hang this guards against, made certain: a maintenance sweep holds a module's
    import lock for two minutes, a pool process is killed so that Celery forks another
    meanwhile, and the new one imports that module before its warm-up. Forked from a
    process where the sweep runs, it would wait for the lock for ever."""
    hold_s = 240.0
    settings = hazard_settings(tmp_path, "hold-import-lock", DEMIX_TEST_HOLD_S=str(hold_s))
    hazard_dir = Path(settings["DEMIX_TEST_HAZARD_DIR"])
    with worker_processes(tmp_path, 1, settings) as [worker]:
        holder = wait_for(lambda: next(hazard_dir.glob("holding-*"), None), "the sweep holding the lock",
                          timeout=120, log=tmp_path)
        held_since = float(holder.read_text())
        [first] = wait_for(lambda: warm_pool_pids(redis_client, worker.pid), "the first pool process warm",
                           timeout=120, log=tmp_path)
        wait_for(lambda: worker_answers(worker), "the worker answering", timeout=120, log=tmp_path)
        os.kill(first, signal.SIGKILL)
        replacement = wait_for(lambda: pool_pids(worker.pid) - {first}, "a replacement", timeout=60, log=tmp_path)
        assert time.time() < held_since + hold_s, "the lock was released before the fork: no test"
        wait_for(lambda: warm_pool_pids(redis_client, worker.pid) & replacement,
                 "the pool process forked while the lock was held getting warm", timeout=hold_s / 2, log=tmp_path)
        # The sweep ran, and holds the lock still, in the background process, not in the
        # main process that forks the pool.
        assert int(holder.name.split("-")[1]) in background_pids(worker.pid)
        assert "forking a pool process while" not in logs(tmp_path)


@pytest.mark.processes
@pytest.mark.slow
def test_the_watchdog_replaces_a_pool_process_that_hangs_before_it_is_warm(
        redis_client, tiny_model_repo, tmp_path):
    # Long enough for a healthy warm-up on a loaded machine (a few seconds on an idle one):
    # only the process that hangs may be replaced.
    settings = hazard_settings(tmp_path, "hang-first-warm-up", DEMIX_WARM_TIMEOUT_S="45")
    hazard_dir = Path(settings["DEMIX_TEST_HAZARD_DIR"])
    redis_client.hdel(keys.metrics_counters_key(), WARM_TIMEOUTS_FIELD)
    with worker_processes(tmp_path, 1, settings) as [worker]:
        hanging = wait_for(lambda: next(hazard_dir.glob("hanging-*"), None), "a pool process hanging",
                           timeout=120, log=tmp_path)
        hung_pid = int(hanging.name.split("-")[1])
        warm = wait_for(lambda: warm_pool_pids(redis_client, worker.pid), "a warm replacement",
                        timeout=600, log=tmp_path)
        assert hung_pid not in warm and hung_pid not in pool_pids(worker.pid)
        log = wait_for(lambda: (text := logs(tmp_path)) and "in hang_on_purpose" in text and text,
                       "the hung process's stack in the log", timeout=30, log=tmp_path)
        assert f"pool process {hung_pid} is not warm" in log and "DEMIX_WARM_TIMEOUT_S=45" in log
        assert int(redis_client.hget(keys.metrics_counters_key(), WARM_TIMEOUTS_FIELD)) == 1
        registry = CollectorRegistry()
        registry.register(ServiceCollector(redis_client, {}, tmp_path))
        assert b"demix_pool_warm_timeouts_total 1.0" in generate_latest(registry)
        # What a Kubernetes probe runs sees it too.
        probe = [sys.executable, "-m", "demix.cli.main", "worker-probe"]
        env = {**os.environ, "DEMIX_DATA_DIR": settings["DEMIX_DATA_DIR"]}
        ready = wait_for(lambda: (run := subprocess.run([*probe, "ready"], env=env, capture_output=True,
                                                        text=True, timeout=60)).returncode == 0 and run,
                         "the readiness probe passing", timeout=60)
        assert "warm" in ready.stdout


@pytest.mark.processes
@pytest.mark.slow
def test_200_pool_processes_killed_with_sigkill_are_each_replaced_without_a_hang(redis_client, tmp_path):
    """Each replacement is forked while the worker's other parts go on (its background
    process sweeping, its event loop answering); every one must start and report itself up.

    The worker's model folder is empty, so each warm-up fails to load the model at once
    (and says so in its readiness entry) instead of running a forward pass: every start
    still runs the whole start-up of a pool process and reports itself up.
    """
    concurrency, rounds = 2, 100
    redis_client.hdel(keys.metrics_counters_key(), WARM_TIMEOUTS_FIELD)
    (tmp_path / "no-models").mkdir()
    settings = {"DEMIX_DATA_DIR": str(tmp_path / "data"), "DEMIX_TORCH_THREADS": "1",
                "DEMIX_MODEL_REPO": str(tmp_path / "no-models")}
    with worker_processes(tmp_path, 1, settings, concurrency=concurrency) as [worker]:
        previous = wait_for(lambda: len(w := warm_pool_pids(redis_client, worker.pid)) == concurrency and w,
                            "every pool process warm", timeout=300, log=tmp_path)
        wait_for(lambda: worker_answers(worker), "the worker answering", timeout=120, log=tmp_path)
        for round_number in range(rounds):
            for pid in previous:
                os.kill(pid, signal.SIGKILL)
            previous = wait_for(
                lambda: len(w := warm_pool_pids(redis_client, worker.pid) - previous) == concurrency and w,
                f"round {round_number + 1}: {concurrency} replacements warm", timeout=300, log=tmp_path)
            assert len(os.listdir(f"/proc/{worker.pid}/task")) == 1  # the main process: one thread
        assert "forking a pool process while" not in logs(tmp_path)
    assert redis_client.hget(keys.metrics_counters_key(), WARM_TIMEOUTS_FIELD) is None  # none hung
