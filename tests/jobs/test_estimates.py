"""`queue_position` and `eta_s`: from the queued index and the job's progress, against a
real Redis and through the real API (the idle server's jobs stay queued)."""
from __future__ import annotations

import time

import pytest
import requests

from demix import redis_keys as keys
from demix.jobs.estimates import MIN_PROGRESS_FOR_ETA, eta_seconds, queue_position, remaining_seconds
from demix.jobs.records import Job, JobStatus, JobStore, new_job_id
from testkit.synthetic_audio import wav_bytes
from tests.support.environment import UNCONSUMED_QUEUE
from tests.support.live import wait_for_job


def make_job(queue: str = "estimates-test", status: JobStatus = JobStatus.QUEUED, **fields) -> Job:
    return Job(id=new_job_id(), status=status, stems="all", model="htdemucs", samplerate=44100,
               channels=2, frames=44100, created_at=time.time(), queue=queue, **fields)


def test_the_time_left_extrapolates_the_average_rate():
    assert remaining_seconds(0.25, 30.0) == 90.0
    assert remaining_seconds(1.0, 30.0) == 0.0
    assert remaining_seconds(MIN_PROGRESS_FOR_ETA / 2, 30.0) is None  # too early to tell


def test_only_a_running_job_has_an_eta():
    now = time.time()
    running = make_job(status=JobStatus.RUNNING, started_at=now - 10, progress=0.5)
    assert eta_seconds(running, now) == 10.0
    assert eta_seconds(make_job(status=JobStatus.RUNNING, started_at=now, progress=0.0), now) is None
    for status in (JobStatus.QUEUED, JobStatus.SUCCEEDED, JobStatus.FAILED):
        assert eta_seconds(make_job(status=status, started_at=now - 10, progress=0.5), now) is None


def test_queue_positions_follow_the_queue_as_jobs_start_and_leave(redis_client):
    store = JobStore(redis_client)
    queue = f"estimates-{new_job_id()}"
    jobs = [make_job(queue) for _ in range(4)]
    for job in jobs:
        store.create(job)
    assert [queue_position(redis_client, store.get(job.id)) for job in jobs] == [1, 2, 3, 4]

    running = store.mark_running(jobs[0].id, lease_s=60)  # the first starts: everyone moves up
    assert queue_position(redis_client, store.get(jobs[0].id)) is None
    assert [queue_position(redis_client, store.get(job.id)) for job in jobs[1:]] == [1, 2, 3]

    store.delete(jobs[2].id)  # one leaves from the middle
    assert [queue_position(redis_client, store.get(job.id)) for job in (jobs[1], jobs[3])] == [1, 2]
    store.requeue(jobs[0].id, running.attempts, handed_back=True)  # back in the queue: at its end
    assert [queue_position(redis_client, store.get(job.id)) for job in (jobs[1], jobs[3], jobs[0])] == [1, 2, 3]
    store.mark_cancelled(jobs[3].id)
    assert queue_position(redis_client, store.get(jobs[0].id)) == 2
    store.mark_failed(jobs[1].id, _error())
    assert queue_position(redis_client, store.get(jobs[0].id)) == 1
    assert redis_client.zcard(keys.queued_jobs_key(queue)) == 1  # the index holds only queued jobs


def test_queues_are_counted_apart(redis_client):
    store = JobStore(redis_client)
    first, other = make_job(f"a-{new_job_id()}"), make_job(f"b-{new_job_id()}")
    store.create(first)
    store.create(other)
    assert queue_position(redis_client, store.get(other.id)) == 1


def _error():
    from demix.errors import SeparationFailed
    return SeparationFailed("boom")


def test_the_job_json_shows_position_while_queued_and_eta_while_running(idle_server, redis_client, tmp_path):
    submitted = [requests.post(f"{idle_server.url}/v1/jobs", files={"file": ("a.wav", wav_bytes(tmp_path))},
                               timeout=30).json() for _ in range(3)]
    positions = [job["queue_position"] for job in submitted]
    # Earlier tests may have left jobs in the idle queue: positions are relative to them.
    assert positions == [positions[0], positions[0] + 1, positions[0] + 2]
    assert redis_client.zcard(keys.queued_jobs_key(UNCONSUMED_QUEUE)) >= positions[2]
    assert all(job["eta_s"] is None for job in submitted)

    store = JobStore(redis_client)
    attempt = store.mark_running(submitted[1]["id"], lease_s=60).attempts
    poll = lambda job: requests.get(f"{idle_server.url}/v1/jobs/{job['id']}", timeout=10).json()  # noqa: E731
    running = poll(submitted[1])
    assert running["queue_position"] is None and running["eta_s"] is None  # no progress yet
    assert poll(submitted[2])["queue_position"] == positions[1]

    store.heartbeat(submitted[1]["id"], attempt, lease_s=60, progress=0.5)
    running = poll(submitted[1])
    started = store.get(submitted[1]["id"]).started_at
    assert running["eta_s"] == pytest.approx(time.time() - started, abs=2.0)

    store.mark_failed(submitted[1]["id"], _error())
    assert poll(submitted[1])["eta_s"] is None and poll(submitted[1])["queue_position"] is None


def test_a_job_run_by_a_real_worker_reports_both_consistently(live_server, redis_client, settings, tmp_path):
    seen = []
    response = requests.post(f"{live_server.url}/v1/jobs",
                             files={"file": ("a.wav", wav_bytes(tmp_path, seconds=4.0))}, timeout=30)
    job = response.json()
    assert job["status"] != "queued" or job["queue_position"] >= 1
    final = wait_for_job(live_server.url, job["id"], on_poll=seen.append)
    assert final["status"] == "succeeded"
    for poll in seen + [job]:
        if poll["status"] == "queued":
            assert poll["queue_position"] >= 1 and poll["eta_s"] is None
        elif poll["status"] == "running":
            assert poll["queue_position"] is None
            assert (poll["eta_s"] is None) == (poll["progress"] < MIN_PROGRESS_FOR_ETA), poll
            assert poll["eta_s"] is None or poll["eta_s"] >= 0
        else:
            assert poll["queue_position"] is None and poll["eta_s"] is None
    # The worker's transitions took the job out of its queue's index.
    assert redis_client.zscore(keys.queued_jobs_key(settings.queue), job["id"]) is None


def test_a_job_taken_between_reading_it_and_its_rank_is_shown_as_it_is_now(idle_server, tmp_path):
    from demix.api.job_views import job_json

    response = requests.post(f"{idle_server.url}/v1/jobs", files={"file": ("a.wav", wav_bytes(tmp_path))},
                             timeout=30)
    assert response.status_code == 202, response.text
    app = idle_server.app
    jobs = app.extensions["demix"].jobs
    job_id = response.json()["id"]
    stale = jobs.get(job_id)  # read while queued ...
    jobs.mark_running(job_id, lease_s=60)  # ... then a worker takes it
    try:
        with app.test_request_context():
            body = job_json(stale)
        assert body["status"] == "running" and body["queue_position"] is None
    finally:
        jobs.delete(job_id)
