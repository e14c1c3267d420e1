"""The workers' maintenance loop, its lost-job and lost-message sweeps, against a real
Redis (the requeued tasks go to a queue no worker consumes, so the test counts them), and
a lost message found by a real `demix worker`."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import threading
import time
import typing as tp
from datetime import datetime
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from demix.cli.processes import popen_child, stop_process

from demix import redis_keys as keys
from demix.celery_app import celery_app
from demix.jobs.records import Job, JobStatus, JobStore, new_job_id
from demix.jobs.lifecycle import enqueue_job, recover_lost_job, resend_lost_message
from demix.storage.local import JobStorage
from testkit.synthetic_audio import write_wav
from tests.support.live import LiveServer, wait_for_job
from tests.support.demix_up import DEMIX
from tests.support.service_state import database_url
from tests.support.waiting import wait_for
from demix.worker.maintenance import (SWEEPS, LostJobSweep, LostMessageSweep, MaintenanceContext, MaintenanceLoop,
                                      Sweep, lost_message_sweep_interval)

QUEUE = "demix-tests-maintenance"

LOST_MESSAGE_S = 120
"""The lost-message bound of the sweeps called by hand: jobs are dated back, not waited for."""


@pytest.fixture
def context(settings, redis_client, tmp_path) -> tp.Iterator[MaintenanceContext]:
    redis_client.delete(*keys.queue_keys(QUEUE))
    jobs = JobStore(redis_client)
    before = set(jobs.running_job_ids())
    yield MaintenanceContext(settings=dataclasses.replace(settings, queue=QUEUE, max_attempts=3,
                                                          lost_message_s=LOST_MESSAGE_S),
                             jobs=jobs, storage=JobStorage(tmp_path), celery=celery_app)
    for job_id in set(jobs.running_job_ids()) - before:  # no input: no worker should get them
        jobs.delete(job_id)
    for job_id in redis_client.zrange(keys.queued_jobs_key(QUEUE), 0, -1):
        jobs.delete(job_id.decode())
    redis_client.delete(*keys.queue_keys(QUEUE))


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
    """The sweeps' job store is built like every other (`demix.services`): a job they fail
    with `worker_lost` is finished like one a worker finishes, webhook included."""
    from demix.jobs.webhooks import WebhookQueue, WebhookSender
    from tests.support.webhook_receiver import WebhookReceiver
    from demix.worker.maintenance import maintenance_context

    # Database 1: the session's worker runs its own sender on database 0.
    own_db = dataclasses.replace(settings, redis_url=database_url(redis_server, 1),
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


# -- lost messages ------------------------------------------------------------------------------

def queued_in_queue(context: MaintenanceContext, age_s: float, send: bool = True) -> str:
    """A job of the test queue that entered it `age_s` seconds ago, with its task sent."""
    job = Job(id=new_job_id(), status=JobStatus.QUEUED, stems="all", model="tiny", samplerate=44100,
              channels=2, frames=44100, created_at=time.time() - age_s, queue=QUEUE)
    context.jobs.create(job)
    if send:
        enqueue_job(context.celery, job.id, QUEUE)
    return job.id


def counted(context: MaintenanceContext, field: str) -> int:
    return int(context.jobs.redis.hget(keys.metrics_counters_key(), field) or 0)


def lose_messages(context: MaintenanceContext) -> None:
    """What a Redis crash after the last sync of its append-only file does to the queue."""
    context.jobs.redis.delete(*keys.queue_keys(QUEUE))


def test_the_lost_message_sweep_is_one_of_the_sweeps_and_runs_four_times_per_bound(settings):
    assert any(isinstance(sweep.run, LostMessageSweep) for sweep in SWEEPS)
    assert lost_message_sweep_interval(dataclasses.replace(settings, lost_message_s=120)) == 30


def test_a_queued_job_whose_message_is_gone_is_sent_again_on_the_second_sweep(context):
    job_id = queued_in_queue(context, age_s=LOST_MESSAGE_S)
    sweep = LostMessageSweep()
    assert sweep(context) == [] and sweep(context) == []  # its message waits in the queue
    lose_messages(context)
    resends = counted(context, "requeued:lost_message")
    assert sweep(context) == []  # first sighting
    assert sweep(context) == [job_id]
    assert messages(context) == 1
    assert counted(context, "requeued:lost_message") == resends + 1
    job = context.jobs.get(job_id)
    assert job.status is JobStatus.QUEUED and job.attempts == 0
    # Back at the end of the queue, where its new message is: not suspect again.
    assert sweep(context) == [] and sweep(context) == [] and messages(context) == 1


def test_a_job_queued_for_less_than_half_the_bound_is_not_suspect(context):
    """The API writes a job before it sends its task: a fresh job may have no message yet."""
    queued_in_queue(context, age_s=LOST_MESSAGE_S / 2 - 5, send=False)
    sweep = LostMessageSweep()
    assert sweep(context) == [] and sweep(context) == [] and messages(context) == 0


def test_a_job_whose_worker_took_its_message_lately_is_not_suspect_but_one_taken_long_ago_is(context):
    job_id = queued_in_queue(context, age_s=LOST_MESSAGE_S)
    # What kombu does when a worker takes a message: off the list, into the unacked hash.
    raw = context.jobs.redis.rpop(QUEUE)
    tag = f"test-{job_id}"
    context.jobs.redis.hset(keys.broker_unacked_key(), tag, f'[{raw.decode()}, "", "{QUEUE}"]')
    context.jobs.redis.zadd(keys.broker_unacked_index_key(), {tag: time.time()})
    try:
        sweep = LostMessageSweep()
        assert sweep(context) == [] and sweep(context) == []
        # Taken longer than the bound ago and its job still queued: that worker is gone.
        context.jobs.redis.zadd(keys.broker_unacked_index_key(), {tag: time.time() - LOST_MESSAGE_S - 1})
        assert sweep(context) == [] and sweep(context) == [job_id] and messages(context) == 1
    finally:
        context.jobs.redis.hdel(keys.broker_unacked_key(), tag)
        context.jobs.redis.zrem(keys.broker_unacked_index_key(), tag)


def test_a_job_that_left_the_queue_between_two_sweeps_is_not_sent_again(context):
    job_id = queued_in_queue(context, age_s=LOST_MESSAGE_S)
    lose_messages(context)
    sweep = LostMessageSweep()
    sweep(context)
    context.jobs.mark_running(job_id, lease_s=60)  # a worker took the message the sweep missed
    assert sweep(context) == [] and messages(context) == 0


def test_many_sweepers_finding_one_lost_message_send_it_once(context):
    job_id = queued_in_queue(context, age_s=LOST_MESSAGE_S, send=False)
    queued_since = context.jobs.queued_before(QUEUE, time.time())[job_id]
    outcomes, barrier = [], threading.Barrier(6)

    def sweeper() -> None:
        barrier.wait()
        outcomes.append(resend_lost_message(context.jobs, celery_app, QUEUE, job_id, queued_since))

    threads = [threading.Thread(target=sweeper) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count(True) == 1 and messages(context) == 1


def test_a_zero_bound_turns_the_lost_message_sweep_off(context):
    queued_in_queue(context, age_s=10 * LOST_MESSAGE_S, send=False)
    context = dataclasses.replace(context, settings=dataclasses.replace(context.settings, lost_message_s=0))
    sweep = LostMessageSweep()
    assert sweep(context) == [] and sweep(context) == [] and messages(context) == 0


# -- lost messages with a real worker -----------------------------------------------------------

E2E_LOST_MESSAGE_S = 8
"""The bound of the real worker below: its sweep looks every 2 s."""


@contextlib.contextmanager
def demix_worker(queue: str, data_dir: Path, log: Path) -> tp.Iterator[subprocess.Popen]:
    """A real `demix worker` serving `queue`, with a short lost-message bound."""
    env = {**os.environ, "DEMIX_QUEUE": queue, "DEMIX_DATA_DIR": str(data_dir), "DEMIX_TORCH_THREADS": "1",
           "DEMIX_LOST_MESSAGE_S": str(E2E_LOST_MESSAGE_S)}
    with open(log, "wb") as output:
        process = popen_child([DEMIX, "worker"], env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: " ready." in log.read_text(errors="replace"), "the worker to be ready", log=log)
        yield process
    finally:
        stop_process(process, timeout=60)


@pytest.fixture
def lost_message_service(settings, tiny_model_repo, redis_client, tmp_path) -> tp.Iterator[tp.Any]:
    """The API on a queue of its own, which no worker serves until the test starts one."""
    from demix.api import create_app

    queue = f"demix-tests-lost-{new_job_id()[:8]}"
    service_settings = dataclasses.replace(settings, queue=queue, data_dir=tmp_path / "data")
    with LiveServer(create_app({"SETTINGS": service_settings})) as server:
        server.settings = service_settings
        yield server
    redis_client.delete(*keys.queue_keys(queue))


def submit_short_job(url: str, tmp_path: Path) -> str:
    path = write_wav(tmp_path / "short.wav", 44100, 1, seconds=1.0)
    with open(path, "rb") as file:
        response = requests.post(f"{url}/v1/jobs", files={"file": file}, data={"stems": "vocals"}, timeout=60)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def requeued_for_lost_message(url: str) -> float:
    for family in text_string_to_metric_families(requests.get(f"{url}/metrics", timeout=30).text):
        if family.name == "demix_jobs_requeued":
            return sum(s.value for s in family.samples if s.labels.get("reason") == "lost_message")
    return 0.0


def test_a_job_whose_message_was_deleted_by_hand_runs_and_succeeds(lost_message_service, redis_client, tmp_path):
    url, queue = lost_message_service.url, lost_message_service.settings.queue
    job_id = submit_short_job(url, tmp_path)
    assert redis_client.llen(queue) == 1
    resends = requeued_for_lost_message(url)
    assert redis_client.delete(queue) == 1  # the message is gone; the job is still queued
    assert requests.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()["status"] == "queued"
    log = tmp_path / "worker.log"
    with demix_worker(queue, lost_message_service.settings.data_dir, log):
        job = wait_for_job(url, job_id, timeout=300)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1
    # Once, unless a slow warm-up held the new message past the bound: then a harmless duplicate.
    assert requeued_for_lost_message(url) >= resends + 1
    assert f"job {job_id}: queued since" in log.read_text() and "sent again" in log.read_text()
    waited = (datetime.fromisoformat(job["started_at"]) - datetime.fromisoformat(job["created_at"]))
    print(f"\nlost message: job started {waited.total_seconds():.1f}s after it was queued "
          f"(bound {E2E_LOST_MESSAGE_S}s, plus the worker's start)")


def test_duplicate_messages_for_one_job_never_run_it_twice(lost_message_service, redis_client, tmp_path):
    """The sweep racing a worker that was taking the message: the job gets several
    messages; it runs once, and the other deliveries are skipped."""
    url, queue = lost_message_service.url, lost_message_service.settings.queue
    storage = JobStorage(lost_message_service.settings.data_dir)
    succeeded_before = int(redis_client.hget(keys.metrics_counters_key(), "succeeded") or 0)
    log = tmp_path / "worker.log"
    with demix_worker(queue, lost_message_service.settings.data_dir, log):
        job_id = submit_short_job(url, tmp_path)
        for _ in range(3):
            enqueue_job(celery_app, job_id, queue)
        job = wait_for_job(url, job_id, timeout=300)
        assert job["status"] == "succeeded", job["error"]
        stems = {p.name: p.stat().st_mtime_ns for p in storage.stems_dir(job_id, 1).iterdir()}
        # Every message delivered and acknowledged: none left in the queue or with the worker.
        wait_for(lambda: redis_client.llen(queue) == 0 and not any(
            job_id in entry.decode() for entry in redis_client.hvals(keys.broker_unacked_key())),
            "every duplicate to be delivered", log=log)
        wait_for(lambda: skipped_deliveries(log.read_text(), job_id) == 3, "the duplicates to be skipped", log=log)
    job = requests.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
    assert job["status"] == "succeeded" and job["attempts"] == 1
    assert storage.attempts_on_disk(job_id) == [1]
    assert {p.name: p.stat().st_mtime_ns for p in storage.stems_dir(job_id, 1).iterdir()} == stems
    assert int(redis_client.hget(keys.metrics_counters_key(), "succeeded")) == succeeded_before + 1
    text = log.read_text()
    assert text.count(f"job {job_id} succeeded on attempt 1") == 1, text
    assert skipped_deliveries(text, job_id) == 3, text


def skipped_deliveries(log: str, job_id: str) -> int:
    """Deliveries of the job a worker skipped (`demix.worker.runner._claim`), from its log."""
    return (log.count(f"job {job_id} is already succeeded; skipping")
            + log.count(f"job {job_id} runs under a live lease") + log.count(f"job {job_id}: not starting it"))
