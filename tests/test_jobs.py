"""Job records against a real Redis."""
from __future__ import annotations

import time

import pytest

from shared.errors import InvalidAudio, JobNotFound
from shared.jobs import Job, JobStatus, JobStore, new_job_id


def make_job() -> Job:
    return Job(id=new_job_id(), status=JobStatus.QUEUED, stems="vocals", model="htdemucs",
               samplerate=48000, channels=1, frames=96000, created_at=time.time())


def test_a_job_moves_through_its_states(redis_client):
    store = JobStore(redis_client)
    job = make_job()
    store.create(job)
    assert store.get(job.id) == job
    store.mark_running(job.id)
    store.set_progress(job.id, 0.4)
    running = store.get(job.id)
    assert running.status is JobStatus.RUNNING and running.progress == 0.4 and running.started_at
    store.mark_succeeded(job.id, ["vocals", "no_vocals"])
    done = store.get(job.id)
    assert done.status is JobStatus.SUCCEEDED and done.progress == 1.0
    assert done.outputs == ["vocals", "no_vocals"] and done.status.is_finished


def test_a_failed_job_keeps_its_error(redis_client):
    store = JobStore(redis_client)
    job = make_job()
    store.create(job)
    store.mark_failed(job.id, InvalidAudio("bad", code="empty_audio"))
    failed = store.get(job.id)
    assert failed.status is JobStatus.FAILED and failed.error == {"code": "empty_audio", "message": "bad"}
    assert failed.to_public()["duration"] == 2.0


def test_unknown_or_deleted_jobs_are_not_found(redis_client):
    store = JobStore(redis_client)
    with pytest.raises(JobNotFound):
        store.get(new_job_id())
    with pytest.raises(JobNotFound):
        store.get("../../etc/passwd")
    job = make_job()
    store.create(job)
    store.delete(job.id)
    with pytest.raises(JobNotFound):
        store.set_progress(job.id, 0.5)  # a late report must not resurrect it
    assert not redis_client.exists(f"demix:job:{job.id}")
