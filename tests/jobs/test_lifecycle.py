"""demix.jobs.lifecycle: enqueueing, cancelling, deleting, and recovering or handing back the
jobs of lost or stopping workers, over a real Redis and the service's real Celery app
(its messages land on a queue no worker consumes, where they are counted)."""
from __future__ import annotations

import base64
import json
import time

import pytest

from demix import redis_keys as keys
from demix.celery_app import SEPARATE_TASK
from demix.errors import IllegalTransition, JobNotFound
from demix.jobs.records import Job, JobStatus, JobStore, new_job_id
from demix.jobs.lifecycle import (cancel_job, delete_job, enqueue_job, hand_back_job, hand_back_worker_jobs,
                                  recover_lost_job)
from demix.storage.local import JobStorage
from tests.support.waiting import wait_for

QUEUE = "demix-tests-lifecycle"


@pytest.fixture
def celery(redis_server):
    from demix.celery_app import celery_app
    return celery_app


@pytest.fixture
def jobs(redis_client) -> JobStore:
    """The job store; jobs a test leaves running are deleted after it, so no test worker's
    lost-job sweep finds them, and the test queue is emptied."""
    store = JobStore(redis_client)
    before = set(store.running_job_ids())
    yield store
    for job_id in set(store.running_job_ids()) - before:
        store.delete(job_id)
    redis_client.delete(*keys.queue_keys(QUEUE))


def sent(redis_client) -> list[list]:
    """The arguments of the messages waiting on the test queue, oldest first (kombu pushes
    on the left), each checked to be a separation task whose task id is the job's."""
    messages = [json.loads(message) for key in keys.queue_keys(QUEUE)
                for message in reversed(redis_client.lrange(key, 0, -1))]
    arguments = []
    for message in messages:
        args = json.loads(base64.b64decode(message["body"]))[0]
        assert message["headers"]["task"] == SEPARATE_TASK and message["headers"]["id"] == args[0]
        arguments.append(args)
    return arguments


def created(jobs: JobStore) -> Job:
    job = Job(id=new_job_id(), status=JobStatus.QUEUED, stems="vocals", model="htdemucs",
              samplerate=44100, channels=2, frames=44100, created_at=time.time())
    jobs.create(job)
    return job


def with_files(storage: JobStorage, job_id: str):
    folder = storage.job_dir(job_id)
    folder.mkdir(parents=True)
    (folder / "input.wav").write_bytes(b"RIFF")
    return folder


def test_enqueueing_sends_only_the_id_to_the_queue(jobs, celery, redis_client):
    job = created(jobs)
    enqueue_job(celery, job.id, QUEUE)
    assert wait_for(lambda: sent(redis_client), "the message on the queue") == [[job.id]]


def test_cancelling_a_queued_job_removes_its_files_and_a_finished_one_refuses(jobs, tmp_path):
    storage = JobStorage(tmp_path)
    job = created(jobs)
    folder = with_files(storage, job.id)
    assert cancel_job(jobs, storage, job.id).status is JobStatus.CANCELLED
    assert jobs.get(job.id).status is JobStatus.CANCELLED and not folder.exists()
    with pytest.raises(IllegalTransition):
        cancel_job(jobs, storage, job.id)
    with pytest.raises(JobNotFound):
        cancel_job(jobs, storage, new_job_id())


@pytest.mark.parametrize("finish", ["queued", "running", "succeeded"])
def test_deleting_removes_the_record_and_files_whatever_the_state(jobs, tmp_path, finish):
    storage = JobStorage(tmp_path)
    job = created(jobs)
    if finish != "queued":
        running = jobs.mark_running(job.id, lease_s=60, holder="w process 1")
        if finish == "succeeded":
            jobs.mark_succeeded(job.id, ["vocals", "no_vocals"], attempt=running.attempts)
    folder = with_files(storage, job.id)
    delete_job(jobs, storage, job.id)
    assert not folder.exists()
    with pytest.raises(JobNotFound):
        jobs.get(job.id)
    with pytest.raises(JobNotFound):
        delete_job(jobs, storage, job.id)


def test_a_lost_job_is_requeued_once_however_many_notice(jobs, celery, redis_client):
    job = created(jobs)
    attempt = jobs.mark_running(job.id, lease_s=0.001, holder="w process 1").attempts
    wait_for(lambda: jobs.lease_holder(job.id) is None, "the lease expired")
    assert recover_lost_job(jobs, celery, QUEUE, job.id, attempt, max_attempts=3) is JobStatus.QUEUED
    assert recover_lost_job(jobs, celery, QUEUE, job.id, attempt, max_attempts=3) is None  # a second sweeper
    assert jobs.get(job.id).status is JobStatus.QUEUED
    assert wait_for(lambda: sent(redis_client), "the message sent again") == [[job.id]]


def test_a_job_under_a_live_lease_or_another_attempt_is_left_alone(jobs, celery, redis_client):
    job = created(jobs)
    attempt = jobs.mark_running(job.id, lease_s=60, holder="w process 1").attempts
    assert recover_lost_job(jobs, celery, QUEUE, job.id, attempt + 1, max_attempts=3) is None
    assert jobs.get(job.id).status is JobStatus.RUNNING and sent(redis_client) == []


def test_a_job_lost_on_every_attempt_fails_saying_why(jobs, celery, redis_client):
    job = created(jobs)
    attempt = jobs.mark_running(job.id, lease_s=0.001, holder="w process 1").attempts
    wait_for(lambda: jobs.lease_holder(job.id) is None, "the lease expired")
    assert recover_lost_job(jobs, celery, QUEUE, job.id, attempt, max_attempts=1) is JobStatus.FAILED
    failed = jobs.get(job.id)
    assert failed.status is JobStatus.FAILED and failed.error["code"] == "worker_lost"
    assert "DEMIX_MAX_ATTEMPTS=1" in failed.error["message"] and sent(redis_client) == []


def test_a_handed_back_job_does_not_count_towards_the_attempt_limit(jobs, celery, redis_client):
    job = created(jobs)
    attempt = jobs.mark_running(job.id, lease_s=60, holder="w process 1").attempts
    assert hand_back_job(jobs, celery, QUEUE, job.id, attempt)
    assert not hand_back_job(jobs, celery, QUEUE, job.id, attempt)  # no longer ours
    requeued = jobs.get(job.id)
    assert requeued.status is JobStatus.QUEUED and requeued.counted_attempts == 0
    assert wait_for(lambda: sent(redis_client), "the message sent again") == [[job.id]]


def test_a_stopping_worker_hands_back_its_own_jobs_only(jobs, celery, redis_client):
    mine, theirs = created(jobs), created(jobs)
    jobs.mark_running(mine.id, lease_s=60, holder="worker-a process 11")
    jobs.mark_running(theirs.id, lease_s=60, holder="worker-b process 12")
    assert hand_back_worker_jobs(jobs, celery, QUEUE, "worker-a") == [mine.id]
    assert jobs.get(mine.id).status is JobStatus.QUEUED
    assert jobs.get(theirs.id).status is JobStatus.RUNNING
    assert wait_for(lambda: sent(redis_client), "the message sent again") == [[mine.id]]
