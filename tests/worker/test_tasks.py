"""Real `demix worker` processes (Celery prefork, the command `demix worker` runs) against
the test Redis: a worker killed mid-job, a worker frozen and presumed dead that comes
back late, and a worker stopped with SIGTERM. The in-process test worker (the
`celery_worker` fixture, on the main queue) is the other worker that notices and
finishes the job."""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import time
import typing as tp
from pathlib import Path

import pytest

from demix.cli.argv import worker_argv
from demix.cli.processes import popen_child, stop_process
from demix import redis_keys as keys
from demix.celery_app import celery_app
from demix.config import Settings
from demix.jobs.records import Job, JobStatus, JobStore, new_job_id
from demix.jobs.lifecycle import enqueue_job
from demix.storage.local import JobStorage
from testkit.synthetic_audio import write_wav
from tests.support.waiting import wait_for

pytestmark = pytest.mark.processes


def test_every_worker_runs_its_background_process_and_a_prefork_one_guards_its_pool():
    """The worker's bootsteps: the background process (sweeps, webhooks) in every worker, the
    pool guard (fork hooks, watchdog, bounded shutdown) only where a pool forks."""
    from types import SimpleNamespace

    from celery.concurrency.prefork import TaskPool
    from celery.concurrency.solo import TaskPool as SoloPool

    import demix.worker.tasks  # noqa: F401  adds the steps
    from demix.worker.pool_guard import BackgroundStep, PoolGuard

    assert {BackgroundStep, PoolGuard} <= celery_app.steps["worker"]
    guard = PoolGuard.__new__(PoolGuard)
    assert guard.include_if(SimpleNamespace(pool_cls=TaskPool))
    assert not guard.include_if(SimpleNamespace(pool_cls=SoloPool))

SIDE_QUEUE = "demix-tests-side-worker"
"""The queue only the subprocess worker consumes, so it (not the test worker) starts the job."""

SIDE_LEASE_S = 3
LONG_SECONDS = 40.0
COLD_SHUTDOWN_SECONDS = 300.0
"""Audio seconds of the cold-shutdown test's job: with the tiny model about 11 s of work on a
2-core AVX-512 machine, ten times the soft-shutdown wait (`COLD_SHUTDOWN_SOFT_S`) it must outlast."""

COLD_SHUTDOWN_SOFT_S = 1.0
"""The cold-shutdown test's worker's DEMIX_SOFT_SHUTDOWN_S: a short wait keeps its job short."""


@contextlib.contextmanager
def side_worker(log_path: Path, **settings: str) -> tp.Iterator[tp.Any]:
    """A `demix worker` process (prefork, one child) on `SIDE_QUEUE`, with `settings` (DEMIX_*)."""
    # Never split: these tests follow one run of a job.
    env = dict(os.environ, DEMIX_QUEUE=SIDE_QUEUE, DEMIX_LEASE_S=str(SIDE_LEASE_S), DEMIX_SPLIT_S="0",
               **settings)
    argv = worker_argv(Settings.from_env(env), concurrency=1, loglevel="INFO")
    with open(log_path, "ab") as log:
        process = popen_child(argv, env=env, stdout=log, stderr=log)
        try:
            yield process
        finally:
            stop_process(process, timeout=30, sig=signal.SIGKILL)


def only_attempt_2_left(storage: JobStorage, job_id: str, log: tp.Optional[Path] = None) -> None:
    """Wait until attempt 2's stems are the job's only ones: the run removes earlier attempts'
    leftovers just after it recorded its success, so a poll may see the success first."""
    wait_for(lambda: storage.attempts_on_disk(job_id) == [2], "only attempt 2's stems left", log=log)


def submit(settings, redis_client, tmp_path: Path, seconds: float) -> str:
    """A job whose input is in storage, sent to the side worker's queue."""
    job_id = new_job_id()
    upload = write_wav(tmp_path / f"{job_id}.wav", 44100, 2, seconds)
    JobStorage(settings.data_dir).accept_upload(upload, job_id)
    JobStore(redis_client).create(Job(id=job_id, status=JobStatus.QUEUED, stems="vocals",
                                      model=settings.model, samplerate=44100, channels=2,
                                      frames=int(44100 * seconds), created_at=time.time()))
    enqueue_job(celery_app, job_id, SIDE_QUEUE)
    return job_id


def stems_digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture
def store(redis_client) -> JobStore:
    return JobStore(redis_client)


def test_a_worker_killed_mid_job_is_replaced_by_another_and_the_job_succeeds_on_attempt_2(
        celery_worker, settings, redis_client, store, tmp_path):
    storage, log = JobStorage(settings.data_dir), tmp_path / "worker.log"
    job_id = submit(settings, redis_client, tmp_path, LONG_SECONDS)
    with side_worker(log) as worker:
        wait_for(lambda: store.get(job_id).progress > 0, "the side worker runs the job", log=log)
        assert " process " in store.lease_holder(job_id)
        os.killpg(worker.pid, signal.SIGKILL)  # the whole worker tree, as `kill -9` would
        killed = time.monotonic()
        wait_for(lambda: store.get(job_id).attempts == 2 or store.get(job_id).status is JobStatus.QUEUED,
                 "the job requeued", timeout=120)
        requeued = time.monotonic()
        job = wait_for(lambda: (j := store.get(job_id)).status.is_finished and j, "the job finished")
        done = time.monotonic()
    print(f"\nkill -9 -> requeued {requeued - killed:.1f}s (lease {SIDE_LEASE_S}s, sweep every "
          f"{settings.lease_s / 3:.0f}s), -> succeeded {done - killed:.1f}s")
    assert job.status is JobStatus.SUCCEEDED, job.error
    assert job.attempts == 2 and job.counted_attempts == 2 and job.outputs == ["vocals", "no_vocals"]
    only_attempt_2_left(storage, job_id)  # the dead attempt's partial stems are gone
    assert not redis_client.exists(keys.lease_key(job_id))


def test_a_presumed_dead_worker_coming_back_late_cannot_touch_the_new_runs_stems(
        celery_worker, settings, redis_client, store, tmp_path):
    storage, log = JobStorage(settings.data_dir), tmp_path / "worker.log"
    job_id = submit(settings, redis_client, tmp_path, LONG_SECONDS)
    with side_worker(log) as worker:
        # Frozen while writing its stems: its lease runs out, the test worker takes over.
        wait_for(lambda: storage.stems_dir(job_id, 1).exists(), "attempt 1 writes stems", log=log)
        os.killpg(worker.pid, signal.SIGSTOP)
        try:
            job = wait_for(lambda: (j := store.get(job_id)).status.is_finished and j,
                           "attempt 2 finished")
            assert job.status is JobStatus.SUCCEEDED and job.attempts == 2, job.error
            published = stems_digest(storage.stems_dir(job_id, 2))
        finally:
            os.killpg(worker.pid, signal.SIGCONT)
        # Back from the dead: its next heartbeat tells it the job is not its own any more.
        wait_for(lambda: not storage.stems_dir(job_id, 1).exists(),
                 "the late attempt removes its own stems", timeout=300, log=log)
        assert store.get(job_id) == job
        assert stems_digest(storage.stems_dir(job_id, 2)) == published
        assert storage.attempts_on_disk(job_id) == [2]

        # The worker that came back is healthy and takes the next job.
        next_id = submit(settings, redis_client, tmp_path, 0.5)
        after = wait_for(lambda: (j := store.get(next_id)).status.is_finished and j, "next job", log=log)
        assert after.status is JobStatus.SUCCEEDED and after.attempts == 1
        assert store.get(job_id) == job


def test_sigterm_to_a_busy_worker_hands_the_job_back_at_once(tiny_model_repo, settings, redis_client, store,
                                                               tmp_path):
    storage, log = JobStorage(settings.data_dir), tmp_path / "worker.log"
    redis_client.delete(*keys.queue_keys(SIDE_QUEUE))
    job_id = submit(settings, redis_client, tmp_path, LONG_SECONDS)
    before = redis_client.hget(keys.metrics_counters_key(), "requeued:handed_back") or 0
    with side_worker(log) as worker:
        wait_for(lambda: store.get(job_id).progress > 0, "the side worker runs the job", log=log)
        worker.send_signal(signal.SIGTERM)  # what `docker compose stop` sends
        stopping = time.monotonic()
        job = wait_for(lambda: (j := store.get(job_id)).status is JobStatus.QUEUED and j,
                       "the job handed back", timeout=120, log=log)
        handed_back = time.monotonic()
        assert worker.wait(120) == 0
        exited = time.monotonic()
    print(f"\nSIGTERM -> job back in the queue {handed_back - stopping:.1f}s, worker exited "
          f"{exited - stopping:.1f}s")
    assert job.attempts == 1 and job.handed_back == 1 and job.counted_attempts == 0
    assert job.progress == 0.0 and not storage.stems_dir(job_id, 1).exists()
    assert int(redis_client.hget(keys.metrics_counters_key(), "requeued:handed_back")) == int(before) + 1
    assert sum(redis_client.llen(key) for key in keys.queue_keys(SIDE_QUEUE)) == 1  # sent again

    with side_worker(log):  # the next worker redoes it
        job = wait_for(lambda: (j := store.get(job_id)).status.is_finished and j, "redone", log=log)
        assert job.status is JobStatus.SUCCEEDED and job.attempts == 2, job.error
        only_attempt_2_left(storage, job_id, log)


def test_a_cold_shutdown_cancels_the_run_and_gives_its_job_back(tiny_model_repo, settings, redis_client,
                                                                 store, tmp_path):
    storage, log = JobStorage(settings.data_dir), tmp_path / "worker.log"
    redis_client.delete(*keys.queue_keys(SIDE_QUEUE))
    # Long enough that the run outlasts the soft-shutdown wait (COLD_SHUTDOWN_SOFT_S) even on
    # a fast machine with a warm model, so it is the cancellation that gives the job back.
    job_id = submit(settings, redis_client, tmp_path, COLD_SHUTDOWN_SECONDS)
    with side_worker(log, DEMIX_SOFT_SHUTDOWN_S=str(COLD_SHUTDOWN_SOFT_S)) as worker:
        wait_for(lambda: store.get(job_id).progress > 0, "the side worker runs the job", log=log)
        worker.send_signal(signal.SIGQUIT)  # cold: Celery's soft shutdown wait, then cancel
        stopping = time.monotonic()
        job = wait_for(lambda: (j := store.get(job_id)).status is JobStatus.QUEUED and j,
                       "the job given back", timeout=120, log=log)
        given_back = time.monotonic()
        worker.wait(120)
    print(f"\nSIGQUIT -> job back in the queue {given_back - stopping:.1f}s")
    assert job.attempts == 1 and job.handed_back == 1 and job.counted_attempts == 0
    assert sum(redis_client.llen(key) for key in keys.queue_keys(SIDE_QUEUE)) >= 1  # sent again
    with side_worker(log):
        job = wait_for(lambda: (j := store.get(job_id)).status.is_finished and j, "redone", timeout=900, log=log)
        assert job.status is JobStatus.SUCCEEDED and job.attempts == 2, job.error
        only_attempt_2_left(storage, job_id, log)
