"""demix.jobs.split_records: the split record of a job whose parts run on many workers, over a real
Redis: units start once under their own lease, finish or go back to the queue, and every
write is fenced by the job's running attempt."""
from __future__ import annotations

import time

import pytest

from demix import redis_keys as keys
from demix.errors import IllegalTransition, JobNotFound, StaleAttempt
from demix.jobs.records import Job, JobStatus, JobStore, new_job_id
from demix.jobs.split_records import MERGE, SPLIT_HOLDER, PartsExhausted, SplitStore, part_unit
from tests.support.waiting import wait_for


@pytest.fixture
def jobs(redis_client) -> JobStore:
    """The job store; what a test leaves running is deleted after it (no test worker's
    sweep may find it)."""
    store, splits = JobStore(redis_client), SplitStore(redis_client)
    before = set(store.running_job_ids())
    yield store
    for job_id in set(store.running_job_ids()) - before:
        splits.drop(job_id)
        store.delete(job_id)


@pytest.fixture
def splits(redis_client) -> SplitStore:
    return SplitStore(redis_client)


def running_job(jobs: JobStore) -> tuple[str, int]:
    job = Job(id=new_job_id(), status=JobStatus.QUEUED, stems="vocals", model="htdemucs",
              samplerate=44100, channels=2, frames=44100 * 600, created_at=time.time())
    jobs.create(job)
    return job.id, jobs.mark_running(job.id, lease_s=60, holder=SPLIT_HOLDER).attempts


def test_a_new_split_has_every_part_queued_and_the_merge_waiting(jobs, splits):
    job_id, attempt = running_job(jobs)
    splits.create(job_id, attempt, parts=3, windows=30)
    record = splits.get(job_id)
    assert [record[part_unit(index)] for index in range(3)] == ["queued"] * 3
    assert record[MERGE] == "waiting" and record["parts"] == "3" and record["windows"] == "30"
    assert job_id in splits.in_flight()


def test_a_unit_starts_once_under_its_lease_and_finishes(jobs, splits):
    job_id, attempt = running_job(jobs)
    splits.create(job_id, attempt, parts=2, windows=20)
    unit = part_unit(0)
    assert splits.start(job_id, attempt, unit, lease_s=60, holder="w process 1", message={"id": "t0"}) == 1
    assert splits.start(job_id, attempt, unit, lease_s=60, holder="w process 2", message={"id": "t0"}) is None
    assert splits.unit_lease_holder(job_id, unit) == f"{attempt} w process 1"
    splits.finish(job_id, attempt, unit)
    assert splits.get(job_id)[unit] == "done" and splits.unit_lease_holder(job_id, unit) is None
    assert splits.start(job_id, attempt, unit, lease_s=60, holder="w process 3", message={}) is None  # done
    with pytest.raises(IllegalTransition):
        splits.finish(job_id, attempt, unit)  # not running any more


def test_a_lost_unit_goes_back_with_its_message_once_its_lease_is_gone(jobs, splits):
    job_id, attempt = running_job(jobs)
    splits.create(job_id, attempt, parts=2, windows=20)
    unit = part_unit(1)
    splits.start(job_id, attempt, unit, lease_s=60, holder="w process 1", message={"id": "t1", "group": "g"})
    with pytest.raises(IllegalTransition):
        splits.requeue(job_id, attempt, unit, lost=True)  # its lease is alive: not lost
    splits.heartbeat(job_id, attempt, unit, lease_s=0.001, holder="w process 1")
    wait_for(lambda: splits.unit_lease_holder(job_id, unit) is None, "the unit's lease expired")
    assert splits.requeue(job_id, attempt, unit, lost=True) == {"id": "t1", "group": "g"}
    assert splits.get(job_id)[unit] == "queued"
    assert splits.start(job_id, attempt, unit, lease_s=60, holder="w process 2", message={"id": "t1"}) == 2


def test_a_unit_lost_on_every_try_is_exhausted(jobs, splits):
    job_id, attempt = running_job(jobs)
    splits.create(job_id, attempt, parts=1, windows=10)
    unit = part_unit(0)
    splits.start(job_id, attempt, unit, lease_s=0.001, holder="w process 1", message={})
    wait_for(lambda: splits.unit_lease_holder(job_id, unit) is None, "the unit's lease expired")
    with pytest.raises(PartsExhausted, match="lost on all 1 tries"):
        splits.requeue(job_id, attempt, unit, lost=True, max_tries=1)


def test_heartbeats_raise_the_jobs_progress_to_the_share_of_windows_done_never_lower(jobs, splits):
    job_id, attempt = running_job(jobs)
    splits.create(job_id, attempt, parts=2, windows=20)
    for index in range(2):
        splits.start(job_id, attempt, part_unit(index), lease_s=60, holder=f"w process {index}", message={})
    splits.heartbeat(job_id, attempt, part_unit(0), lease_s=60, windows=10, base=0.0, share=0.9)
    assert jobs.get(job_id).progress == pytest.approx(0.45)
    splits.heartbeat(job_id, attempt, part_unit(1), lease_s=60, windows=5, base=0.0, share=0.9)
    assert jobs.get(job_id).progress == pytest.approx(0.675)
    splits.heartbeat(job_id, attempt, part_unit(1), lease_s=60, windows=0, base=0.0, share=0.9)
    assert jobs.get(job_id).progress == pytest.approx(0.675)  # never lowered
    assert jobs.lease_holder(job_id) == f"{attempt} {SPLIT_HOLDER}"


def test_every_write_is_refused_once_the_job_is_not_running_at_that_attempt(jobs, splits):
    job_id, attempt = running_job(jobs)
    splits.create(job_id, attempt, parts=2, windows=20)
    with pytest.raises(StaleAttempt):
        splits.start(job_id, attempt + 1, part_unit(0), lease_s=60, holder="w", message={})
    jobs.mark_cancelled(job_id)
    with pytest.raises(IllegalTransition):
        splits.start(job_id, attempt, part_unit(0), lease_s=60, holder="w", message={})
    with pytest.raises(IllegalTransition):
        splits.heartbeat(job_id, attempt, "", lease_s=60)
    with pytest.raises(JobNotFound):
        splits.create(new_job_id(), 1, parts=1, windows=1)


def test_dropping_a_split_removes_its_record_and_unit_leases(jobs, splits, redis_client):
    job_id, attempt = running_job(jobs)
    splits.create(job_id, attempt, parts=2, windows=20)
    splits.start(job_id, attempt, part_unit(0), lease_s=60, holder="w process 1", message={})
    splits.drop(job_id)
    assert splits.get(job_id) == {} and job_id not in splits.in_flight()
    assert redis_client.keys(keys.unit_lease_key(job_id, "*")) == []
