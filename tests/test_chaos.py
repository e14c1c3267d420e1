"""Chaos: real processes killed mid-job, and nobody restarting anything by hand.

Under `demix up` (its supervisor restarts what dies) and with several `demix worker`s
against one Redis (their leases and sweeps recover each other's jobs), a job survives
its worker being killed, Redis being killed, and a worker presumed dead coming back
late. Each test prints how long the service took to recover (run with `-s`).

Inputs are long enough with the tiny model that a job is mid-run when we strike: we
wait until its `progress` is above 0 (its first segment is done), then strike.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import typing as tp
from pathlib import Path

import pytest
import requests

from demix.cli.processes import popen_child, stop_process
from demix.cli.redis_server import RedisServer, free_port
from testkit.synthetic_audio import write_wav
from tests.support.http_api import decode_result
from tests.support.demix_up import DEMIX, demix_up, processes_with_marker
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.timeout(1200), pytest.mark.processes]

LEASE_S = "3"
"""Short leases: a lost worker's job is requeued within seconds."""

INPUT_SECONDS = 60.0
"""Eleven model segments with the tiny model: seconds of work left after the first on a
fast quiet machine (25 s, since the allocator tuning, left well under a second)."""

RECOVERY_TIMEOUT_S = 600.0
"""Generous: the machine running the tests may be loaded."""


def report(what: str, **seconds: float) -> None:
    """Print a recovery time measurement (visible with `pytest -s`)."""
    figures = ", ".join(f"{name.replace('_', ' ')} {value:.2f}s" for name, value in seconds.items())
    print(f"\nRECOVERY {what}: {figures}", flush=True)


def long_wav(tmp_path: Path, name: str = "long.wav", seed: int = 0) -> Path:
    return write_wav(tmp_path / name, 44100, 1, seconds=INPUT_SECONDS, seed=seed)


def post_job(url: str, path: Path) -> requests.Response:
    with open(path, "rb") as file:
        return requests.post(f"{url}/v1/jobs", files={"file": file}, data={"stems": "vocals"}, timeout=60)


def submit(url: str, path: Path) -> str:
    response = post_job(url, path)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def get_job(url: str, job_id: str) -> dict:
    response = requests.get(f"{url}/v1/jobs/{job_id}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def poll(condition: tp.Callable[[], tp.Any], what: str, timeout: float = RECOVERY_TIMEOUT_S,
         interval: float = 0.1) -> tp.Any:
    """The first truthy value of `condition()`, polled until `timeout`; an API that does not
    answer (it is restarting) counts as not yet."""
    def answered() -> tp.Any:
        try:
            return condition()
        except (requests.ConnectionError, requests.Timeout):
            return None

    return wait_for(answered, what, timeout=timeout, every=interval)


def wait_mid_run(url: str, job_id: str) -> dict:
    """Wait until the job runs and has done part of its work (not all of it)."""
    job = poll(lambda: (lambda j: j if j["status"] != "queued" and j["progress"] > 0 else None)(
        get_job(url, job_id)), f"job {job_id} to be running", timeout=RECOVERY_TIMEOUT_S, interval=0.05)
    assert job["status"] == "running" and job["progress"] < 1, f"the job was not mid-run: {job}"
    return job


def wait_running_again(url: str, job_id: str, attempt: int) -> dict:
    return poll(lambda: (lambda j: j if j["attempts"] >= attempt and j["status"] != "queued" else None)(
        get_job(url, job_id)), f"attempt {attempt} of job {job_id} to start")


def wait_finished(url: str, job_id: str) -> dict:
    return poll(lambda: (lambda j: j if j["status"] in ("succeeded", "failed", "cancelled") else None)(
        get_job(url, job_id)), f"job {job_id} to finish")


def assert_complete_stems(url: str, job: dict, frames: int) -> dict:
    """The job's stems decode to whole WAVs of the input's length; returns them."""
    assert job["status"] == "succeeded", job["error"]
    stems = decode_result(requests.get(job["result_url"], timeout=120).json())
    assert sorted(stems) == ["no_vocals", "vocals"]
    for name, (data, samplerate, _subtype) in stems.items():
        assert samplerate == 44100 and data.shape == (frames, 1), name
    return stems


# -- processes ------------------------------------------------------------------------------

def _proc_stat(pid: int) -> tuple[int, int]:
    """(parent pid, process group) of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[2])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def part_of_up(marker: str, *words: str) -> int:
    """The pid of the child of `demix up` (a part: the leader of its own process group)
    whose command line has all `words`. Found by parent, not by the marker: Redis
    overwrites its environment when it sets its process title."""
    up = [pid for pid in processes_with_marker(marker) if _cmdline(pid).rstrip().endswith("demix up")]
    assert len(up) == 1, up
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            parent, group = _proc_stat(pid)
        except OSError:
            continue
        if parent == up[0] and group == pid and all(word in _cmdline(pid) for word in words):
            return pid
    raise AssertionError(f"demix up has no child {' '.join(words)}")


def kill_group(leader: int, sig: int = signal.SIGKILL) -> None:
    """Signal a whole process tree started in its own group (the worker and its pool)."""
    os.killpg(leader, sig)


@contextlib.contextmanager
def service(tmp_path: Path, redis_server: RedisServer, workers: int) -> tp.Iterator[tuple[str, list]]:
    """`demix api` and `workers` `demix worker`s (each in its own process group) on their
    own queue of `redis_server`; yields the API's URL and the workers' processes."""
    port = free_port()
    env = {**os.environ, "DEMIX_REDIS_URL": redis_server.url, "DEMIX_PORT": str(port),
           "DEMIX_DATA_DIR": str(tmp_path / "data"), "DEMIX_QUEUE": "chaos", "DEMIX_LEASE_S": LEASE_S,
           "DEMIX_TORCH_THREADS": "1"}
    logs = tmp_path / "logs"
    logs.mkdir()
    processes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        with open(logs / f"{name}.log", "wb") as log:
            process = popen_child([DEMIX, *args], env=env, stdout=log, stderr=subprocess.STDOUT)
        processes.append(process)
        return process

    try:
        start("api", "api")
        worker_processes = [start(f"worker-{n}", "worker") for n in range(workers)]
        url = f"http://127.0.0.1:{port}"
        poll(lambda: requests.get(f"{url}/healthz", timeout=5).status_code == 200, "the API")
        for n, process in enumerate(worker_processes):
            poll(lambda: " ready." in (logs / f"worker-{n}.log").read_text(errors="replace"), f"worker {n}")
        yield url, worker_processes
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGCONT)  # a stopped worker must be able to stop
            stop_process(process, timeout=30)


@pytest.fixture
def own_redis(tmp_path) -> tp.Iterator[RedisServer]:
    """A Redis for this test alone: no other test's worker sweeps its jobs."""
    with RedisServer(tmp_path / "redis", persist=True) as server:
        yield server


def lease_holder_pid(redis_server: RedisServer, job_id: str, candidates: tp.Sequence[int]) -> int:
    """Which of the `candidates` worker processes holds the job's lease."""
    import redis

    from demix import redis_keys as keys

    client = redis.Redis.from_url(redis_server.url)
    try:
        holder = (client.get(keys.lease_key(job_id)) or b"").decode()
    finally:
        client.close()
    found = [pid for pid in candidates if str(pid) in holder.split()]
    assert len(found) == 1, f"lease {holder!r} names none or several of {candidates}"
    return found[0]


# -- under `demix up` ---------------------------------------------------------------------

def test_worker_tree_killed_mid_job_is_restarted_by_demix_up_and_the_job_succeeds(tiny_model_repo, tmp_path):
    path = long_wav(tmp_path)
    with demix_up(tmp_path, DEMIX_LEASE_S=LEASE_S, DEMIX_FLOWER_PORT="0") as (url, output, marker):
        job_id = submit(url, path)
        wait_mid_run(url, job_id)
        worker = part_of_up(marker, "celery", "worker")
        kill_group(worker)
        killed = time.monotonic()
        wait_running_again(url, job_id, attempt=2)
        running_again = time.monotonic() - killed
        job = wait_finished(url, job_id)
        succeeded = time.monotonic() - killed
        assert job["status"] == "succeeded", job["error"]
        assert job["attempts"] == 2
        assert_complete_stems(url, job, frames=int(INPUT_SECONDS * 44100))
        assert part_of_up(marker, "celery", "worker") != worker
    log = "".join(output)
    assert f"worker (pid {worker}) died: killed by SIGKILL" in log and "restarting it in 1s" in log, log
    report("worker tree kill -9 under demix up", job_running_again_after=running_again,
           job_succeeded_after=succeeded)


def test_ctrl_c_mid_job_hands_the_job_back_and_the_next_demix_up_finishes_it(tiny_model_repo, tmp_path):
    """Stopping `demix up` stops the worker gracefully: its running job goes straight back
    to the queue (not left `running` until a lease expires) and survives in Redis' file."""
    path = long_wav(tmp_path)
    with demix_up(tmp_path, DEMIX_FLOWER_PORT="0") as (url, output, _marker):
        job_id = submit(url, path)
        wait_mid_run(url, job_id)
        stopped = time.monotonic()
    stop_took = time.monotonic() - stopped
    log = "".join(output)
    assert f"job {job_id}: attempt 1 handed back to the queue (worker stopping)" in log, log
    with demix_up(tmp_path, DEMIX_FLOWER_PORT="0") as (url, _output, _marker):
        job = wait_finished(url, job_id)
        assert job["attempts"] == 2
        assert_complete_stems(url, job, frames=int(INPUT_SECONDS * 44100))
    report("Ctrl-C of demix up mid-job", demix_up_stopped_after=stop_took)


def test_redis_killed_mid_job_under_demix_up_loses_no_queued_or_running_job(tiny_model_repo, tmp_path):
    paths = [long_wav(tmp_path, f"song{n}.wav", seed=n) for n in range(3)]
    with demix_up(tmp_path, DEMIX_LEASE_S=LEASE_S, DEMIX_FLOWER_PORT="0") as (url, output, marker):
        job_ids = [submit(url, path) for path in paths]
        wait_mid_run(url, job_ids[0])
        assert [get_job(url, job_id)["status"] for job_id in job_ids[1:]] == ["queued", "queued"]
        redis_pid = part_of_up(marker, "redis-server")
        os.kill(redis_pid, signal.SIGKILL)
        killed = time.monotonic()
        poll(lambda: requests.get(f"{url}/healthz", timeout=10).status_code == 200, "Redis to be back")
        redis_back = time.monotonic() - killed
        jobs = [wait_finished(url, job_id) for job_id in job_ids]
        all_succeeded = time.monotonic() - killed
        for job in jobs:
            assert job["status"] == "succeeded", job
            assert_complete_stems(url, job, frames=int(INPUT_SECONDS * 44100))
        assert part_of_up(marker, "redis-server") != redis_pid
    log = "".join(output)
    assert f"Redis (pid {redis_pid}) died: killed by SIGKILL" in log, log
    report("Redis kill -9 under demix up (1 running + 2 queued jobs)", api_healthy_again_after=redis_back,
           all_three_jobs_succeeded_after=all_succeeded)
    print(f"attempts of the jobs: {[job['attempts'] for job in jobs]}")


def test_the_api_and_flower_are_restarted_by_demix_up_after_kill_9(tiny_model_repo, tmp_path):
    # Stopped with SIGTERM (as docker and systemd do): everything still goes, restarted parts too.
    with demix_up(tmp_path, stop_signal=signal.SIGTERM) as (url, output, marker):
        flower_url = output[-1].split("Flower: ")[1].split(";")[0]
        api = part_of_up(marker, "demix.api.front")
        flower = part_of_up(marker, "celery", "flower")
        kill_group(api)
        os.kill(flower, signal.SIGKILL)
        killed = time.monotonic()
        poll(lambda: requests.get(f"{url}/healthz", timeout=5).status_code == 200, "the API to answer")
        api_back = time.monotonic() - killed
        poll(lambda: requests.get(f"{flower_url}/healthcheck", timeout=5).text == "OK", "Flower to answer")
        flower_back = time.monotonic() - killed
        assert part_of_up(marker, "demix.api.front") != api
        assert part_of_up(marker, "celery", "flower") != flower
        job_id = submit(url, write_wav(tmp_path / "short.wav", 44100, 1, seconds=1.0))
        assert wait_finished(url, job_id)["status"] == "succeeded"
    log = "".join(output)
    assert f"API (pid {api}) died: killed by SIGKILL" in log, log
    assert f"Flower (pid {flower}) died: killed by SIGKILL" in log, log
    report("API (its front, demix.api.front) and Flower kill -9 under demix up", api_answering_after=api_back,
           flower_answering_after=flower_back)


# -- several workers on one Redis -------------------------------------------------------------

def test_a_worker_killed_mid_job_has_its_job_finished_by_the_other(tiny_model_repo, tmp_path, own_redis):
    path = long_wav(tmp_path)
    with service(tmp_path, own_redis, workers=2) as (url, workers):
        job_id = submit(url, path)
        wait_mid_run(url, job_id)
        holder = lease_holder_pid(own_redis, job_id, [w.pid for w in workers])
        kill_group(holder)
        killed = time.monotonic()
        wait_running_again(url, job_id, attempt=2)
        running_again = time.monotonic() - killed
        survivor = next(w.pid for w in workers if w.pid != holder)
        assert lease_holder_pid(own_redis, job_id, [w.pid for w in workers]) == survivor
        job = wait_finished(url, job_id)
        succeeded = time.monotonic() - killed
        assert job["status"] == "succeeded", job["error"]
        assert job["attempts"] == 2
        assert_complete_stems(url, job, frames=int(INPUT_SECONDS * 44100))
    report("one of two workers kill -9 (lease expiry + sweep by the other)",
           job_running_again_after=running_again, job_succeeded_after=succeeded)


def test_a_presumed_dead_worker_coming_back_late_does_not_touch_the_winning_stems(
        tiny_model_repo, tmp_path, own_redis):
    from demix.storage.local import JobStorage

    path = long_wav(tmp_path)
    storage = JobStorage(tmp_path / "data")
    with service(tmp_path, own_redis, workers=2) as (url, workers):
        job_id = submit(url, path)
        wait_mid_run(url, job_id)
        late = lease_holder_pid(own_redis, job_id, [w.pid for w in workers])
        kill_group(late, signal.SIGSTOP)  # frozen: no heartbeat, its lease runs out
        frozen = time.monotonic()
        job = wait_finished(url, job_id)
        finished = time.monotonic() - frozen
        assert job["status"] == "succeeded" and job["attempts"] == 2, job
        stems_before = {name: data for name, (data, _, _) in
                        assert_complete_stems(url, job, frames=int(INPUT_SECONDS * 44100)).items()}
        files_before = {p.relative_to(storage.job_dir(job_id)): p.read_bytes()
                        for p in storage.job_dir(job_id).rglob("*") if p.is_file() and "stems-2" in str(p)}

        kill_group(late, signal.SIGCONT)  # back, mid-way through attempt 1
        # It notices at its next heartbeat that attempt 2 replaced it, and removes its own files.
        poll(lambda: storage.attempts_on_disk(job_id) == [2], "the late attempt's files to be removed",
             timeout=120)
        assert next(w for w in workers if w.pid == late).poll() is None, "the late worker died"

        assert get_job(url, job_id) == job
        files_after = {p.relative_to(storage.job_dir(job_id)): p.read_bytes()
                       for p in storage.job_dir(job_id).rglob("*") if p.is_file() and "stems-2" in str(p)}
        assert files_after == files_before
        stems_after = {name: data for name, (data, _, _) in
                       assert_complete_stems(url, get_job(url, job_id), int(INPUT_SECONDS * 44100)).items()}
        assert all((stems_after[name] == stems_before[name]).all() for name in stems_before)
        # The worker that came back still serves: it (or the other) takes the next job.
        second = submit(url, write_wav(tmp_path / "short.wav", 44100, 1, seconds=1.0))
        assert wait_finished(url, second)["status"] == "succeeded"
    report("a worker frozen (SIGSTOP) mid-job, then resumed", job_succeeded_elsewhere_after=finished)


# -- Redis outages the API and the worker ride out by themselves -------------------------------

def test_while_redis_is_down_the_api_answers_503_and_both_reconnect_when_it_is_back(
        tiny_model_repo, tmp_path, own_redis):
    with service(tmp_path, own_redis, workers=1) as (url, _workers):
        before = submit(url, write_wav(tmp_path / "before.wav", 44100, 1, seconds=1.0))
        assert wait_finished(url, before)["status"] == "succeeded"
        stop_process(own_redis.process, timeout=10, sig=signal.SIGKILL)
        killed = time.monotonic()
        started = time.monotonic()
        health = requests.get(f"{url}/healthz", timeout=60)
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        response = requests.get(f"{url}/v1/jobs/{before}", timeout=60)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "service_unavailable"
        refused = post_job(url, tmp_path / "before.wav")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "service_unavailable"
        # The refused upload is not kept.
        assert list((tmp_path / "data" / "incoming").glob("*")) == []
        assert [p.name for p in (tmp_path / "data" / "jobs").iterdir()] == [before]
        answered_in = time.monotonic() - started
        time.sleep(5)  # longer than the worker's first reconnection delay
        own_redis.start()  # same port, same data dir
        after = poll(lambda: post_job(url, tmp_path / "before.wav").json().get("id"),
                     "a submit to be accepted again")
        job = wait_finished(url, after)
        assert job["status"] == "succeeded", job["error"]
        assert get_job(url, before)["status"] == "succeeded"  # kept by the append-only file
    report("Redis down 5s, then back on its port (no supervisor)", api_answered_503s_within=answered_in,
           new_job_succeeded_after_outage_began=time.monotonic() - killed)
