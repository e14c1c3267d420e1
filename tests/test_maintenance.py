"""The workers' maintenance loop and its lost-job sweep, against a real Redis (the
requeued tasks go to a queue no worker consumes, so the test counts them)."""
from __future__ import annotations

import dataclasses
import json
import threading
import time
import typing as tp

import pytest

from shared import keys
from shared.celery_app import celery_app
from shared.jobs import Job, JobStatus, JobStore, new_job_id
from shared.lifecycle import recover_lost_job
from shared.storage import JobStorage
from worker.maintenance import SWEEPS, LostJobSweep, MaintenanceContext, MaintenanceLoop, Sweep
from tests.support.waiting import wait_for

QUEUE = "demix-tests-maintenance"


@pytest.fixture
def context(settings, redis_client, tmp_path) -> tp.Iterator[MaintenanceContext]:
    redis_client.delete(*keys.queue_keys(QUEUE))
    jobs = JobStore(redis_client)
    before = set(jobs.running_job_ids())
    yield MaintenanceContext(settings=dataclasses.replace(settings, queue=QUEUE, max_attempts=3),
                             jobs=jobs, storage=JobStorage(tmp_path), celery=celery_app)
    for job_id in set(jobs.running_job_ids()) - before:  # no input: no worker should get them
        jobs.delete(job_id)


def queued(context: MaintenanceContext) -> str:
    job = Job(id=new_job_id(), status=JobStatus.QUEUED, stems="all", model="tiny", samplerate=44100,
              channels=2, frames=44100, created_at=time.time())
    context.jobs.create(job)
    return job.id


def lose_worker(context: MaintenanceContext, job_id: str) -> int:
    """Start an attempt whose worker then dies: its lease runs out."""
    attempt = context.jobs.mark_running(job_id, lease_s=0.001).attempts
    time.sleep(0.05)
    return attempt


def messages(context: MaintenanceContext) -> int:
    return sum(context.jobs.redis.llen(key) for key in keys.queue_keys(QUEUE))


def test_the_lost_job_sweep_is_one_of_the_sweeps_every_worker_runs():
    assert any(isinstance(sweep.run, LostJobSweep) for sweep in SWEEPS)


def test_a_job_without_lease_is_requeued_on_the_second_sweep_and_sent_again(context):
    lost, alive = queued(context), queued(context)
    lose_worker(context, lost)
    context.jobs.mark_running(alive, lease_s=60)
    counted = int(context.jobs.redis.hget(keys.metrics_counters_key(), "requeued:lost") or 0)
    sweep = LostJobSweep()
    assert lost not in sweep(context)  # first sighting: its worker gets one more heartbeat
    assert context.jobs.get(lost).status is JobStatus.RUNNING and messages(context) == 0
    recovered = sweep(context)
    assert lost in recovered and alive not in recovered
    job = context.jobs.get(lost)
    assert job.status is JobStatus.QUEUED and job.attempts == 1 and job.counted_attempts == 1
    assert messages(context) == len(recovered)
    assert int(context.jobs.redis.hget(keys.metrics_counters_key(), "requeued:lost")) == counted + len(recovered)
    assert context.jobs.get(alive).status is JobStatus.RUNNING  # its lease is live
    assert context.jobs.mark_running(lost, lease_s=60).attempts == 2


def test_a_lease_renewed_between_two_sweeps_saves_the_job(context):
    job_id = queued(context)
    lose_worker(context, job_id)
    sweep = LostJobSweep()
    sweep(context)
    context.jobs.heartbeat(job_id, 1, lease_s=60)  # the worker was only cut off from Redis
    assert job_id not in sweep(context) and job_id not in sweep(context)
    assert context.jobs.get(job_id).status is JobStatus.RUNNING


def test_after_max_attempts_lost_the_job_fails_with_worker_lost(context):
    job_id = queued(context)
    sweep = LostJobSweep()
    for attempt in (1, 2, 3):
        assert lose_worker(context, job_id) == attempt
        sweep(context)
        sweep(context)
    job = context.jobs.get(job_id)
    assert job.status is JobStatus.FAILED and job.attempts == 3
    assert job.error["code"] == "worker_lost"
    assert "3 times" in job.error["message"] and "DEMIX_MAX_ATTEMPTS=3" in job.error["message"]
    assert messages(context) == 2  # requeued after the first two losses only
    assert job_id not in context.jobs.running_job_ids()


def test_handed_back_runs_do_not_use_up_attempts(context):
    job_id = queued(context)
    for attempt in (1, 2, 3):
        context.jobs.mark_running(job_id, lease_s=60)
        context.jobs.requeue(job_id, attempt, handed_back=True)
    lose_worker(context, job_id)  # attempt 4, the first one lost
    assert recover_lost_job(context.jobs, celery_app, QUEUE, job_id, 4, 3) is JobStatus.QUEUED


def test_a_lost_job_is_sent_back_to_its_own_queue_not_the_sweepers(context):
    other_queue = QUEUE + "-other"
    context.jobs.redis.delete(*keys.queue_keys(other_queue))
    job = Job(id=new_job_id(), status=JobStatus.QUEUED, stems="all", model="tiny", samplerate=44100,
              channels=2, frames=44100, created_at=time.time(), queue=other_queue)
    context.jobs.create(job)
    lose_worker(context, job.id)
    assert recover_lost_job(context.jobs, celery_app, QUEUE, job.id, 1, 3) is JobStatus.QUEUED
    assert messages(context) == 0
    assert sum(context.jobs.redis.llen(key) for key in keys.queue_keys(other_queue)) == 1
    context.jobs.redis.delete(*keys.queue_keys(other_queue))


def test_many_sweepers_noticing_one_lost_job_requeue_it_once(context):
    job_id = queued(context)
    lose_worker(context, job_id)
    outcomes, barrier = [], threading.Barrier(6)

    def sweeper() -> None:
        barrier.wait()
        outcomes.append(recover_lost_job(context.jobs, celery_app, QUEUE, job_id, 1, 3))

    threads = [threading.Thread(target=sweeper) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count(JobStatus.QUEUED) == 1 and outcomes.count(None) == 5
    assert messages(context) == 1


def test_the_loop_runs_each_sweep_at_start_and_then_periodically_surviving_failures(context, caplog):
    runs: dict[str, int] = {"steady": 0, "broken": 0}

    def steady(_context) -> None:
        runs["steady"] += 1

    def broken(_context) -> None:
        runs["broken"] += 1
        raise RuntimeError("sweep bug")

    loop = MaintenanceLoop(context, [Sweep("steady", steady, lambda s: 0.1),
                                     Sweep("broken", broken, lambda s: 0.1)])
    loop.start()
    try:
        wait_for(lambda: min(runs.values()) >= 3, "both sweeps run three times, the broken one too", timeout=60)
    finally:
        loop.stop()
    assert runs["steady"] >= 3 and runs["broken"] >= 3
    assert "broken sweep failed" in caplog.text


def test_a_job_the_sweep_fails_as_lost_sends_its_webhook(settings, redis_server):
    """The sweeps' job store is built like every other (`shared.services`): a job they fail
    with `worker_lost` is finished like one a worker finishes, webhook included."""
    from shared.webhooks import WebhookQueue, WebhookSender
    from tests.support.webhook_receiver import WebhookReceiver
    from worker.maintenance import maintenance_context

    # Database 1: the session's worker runs its own sender on database 0.
    own_db = dataclasses.replace(settings, redis_url=redis_server.url.rsplit("/", 1)[0] + "/1",
                                 queue=QUEUE, max_attempts=1, webhook_attempts=1)
    context = maintenance_context(celery_app, own_db)
    with WebhookReceiver([200]) as receiver:
        job = Job(id=new_job_id(), status=JobStatus.QUEUED, stems="all", model="tiny", samplerate=44100,
                  channels=2, frames=44100, created_at=time.time(), callback_url=receiver.url)
        context.jobs.create(job)
        lose_worker(context, job.id)
        sweep = LostJobSweep()
        sweep(context)
        assert job.id in sweep(context)
        assert context.jobs.get(job.id).status is JobStatus.FAILED
        sender = WebhookSender(WebhookQueue(context.jobs.redis, own_db), poll_interval_s=0.05).start()
        try:
            [received] = receiver.wait_for(1)
        finally:
            sender.stop()
    body = json.loads(received.body)
    assert body["id"] == job.id and body["status"] == "failed"
    assert body["error"]["code"] == "worker_lost"
    context.jobs.redis.flushdb()
