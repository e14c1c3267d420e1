"""The per-key limit on active jobs (`demix.jobs.limits.ActiveJobLimit`) against a real Redis:
what counts as active, what frees a slot, and the `Retry-After` it estimates.

The HTTP view of it (429, concurrent submits) is in tests/api/test_auth.py."""
from __future__ import annotations

import time

import pytest

from demix import redis_keys as keys
from demix.errors import TooManyActiveJobs
from demix.jobs.records import Job, JobStatus, JobStore, new_job_id
from demix.jobs.limits import DEFAULT_RETRY_AFTER_S, MAX_RETRY_AFTER_S, ActiveJobLimit
from tests.support.environment import UNCONSUMED_QUEUE


@pytest.fixture
def store(redis_client) -> JobStore:
    return JobStore(redis_client)


@pytest.fixture
def owner(redis_client) -> str:
    name = f"owner-{new_job_id()[:8]}"
    yield name
    redis_client.delete(keys.owner_active_jobs_key(name))


def recorded(store: JobStore, owner: str) -> str:
    job_id = new_job_id()
    store.create(Job(id=job_id, status=JobStatus.QUEUED, stems="vocals", model="m", samplerate=44100,
                     channels=2, frames=44100, created_at=time.time(), queue=UNCONSUMED_QUEUE, owner=owner))
    return job_id


def running(store: JobStore, owner: str, progress: float, ran_for_s: float) -> str:
    """A running job of `owner` that started `ran_for_s` ago and reached `progress`."""
    job_id = recorded(store, owner)
    attempt = store.mark_running(job_id, lease_s=60).attempts
    store.heartbeat(job_id, attempt, lease_s=60, progress=progress)
    store.redis.hset(keys.job_key(job_id), "started_at", repr(time.time() - ran_for_s))
    return job_id


def refusal(limit: ActiveJobLimit, owner: str, job_id: str = "") -> TooManyActiveJobs:
    with pytest.raises(TooManyActiveJobs) as refused:
        limit.reserve(owner, job_id or new_job_id())
    return refused.value


def test_an_owner_at_the_limit_is_refused_and_other_owners_are_not(store, owner):
    limit = ActiveJobLimit(store.redis, 2)
    for _ in range(2):
        limit.check(owner)
        limit.reserve(owner, recorded(store, owner))
    with pytest.raises(TooManyActiveJobs) as early:
        limit.check(owner)
    assert early.value.details == {"limit": 2} and "2 jobs queued or running" in early.value.message
    refusal(limit, owner, recorded(store, owner))
    assert store.redis.scard(keys.owner_active_jobs_key(owner)) == 2  # the refused one is not counted
    limit.check(f"{owner}-other")


def test_finished_and_deleted_jobs_free_their_slot_and_leave_the_set(store, owner):
    limit = ActiveJobLimit(store.redis, 2)
    first, second = recorded(store, owner), recorded(store, owner)
    limit.reserve(owner, first)
    limit.reserve(owner, second)
    store.mark_cancelled(first)
    replacement = recorded(store, owner)
    limit.reserve(owner, replacement)  # the cancelled one's slot
    store.delete(second)
    third = recorded(store, owner)
    limit.reserve(owner, third)  # the deleted one's slot
    assert store.redis.smembers(keys.owner_active_jobs_key(owner)) == {replacement.encode(), third.encode()}
    refusal(limit, owner)


def test_no_limit_and_no_owner_count_nothing(store, owner):
    unlimited = ActiveJobLimit(store.redis, 0)
    for _ in range(3):
        unlimited.check(owner)
        unlimited.reserve(owner, recorded(store, owner))
    assert store.redis.scard(keys.owner_active_jobs_key(owner)) == 0
    ActiveJobLimit(store.redis, 1).check("")  # an open API (no keys) has no owner to limit


def test_retry_after_is_the_soonest_end_of_a_running_job_by_its_progress(store, owner):
    limit = ActiveJobLimit(store.redis, 3)
    limit.reserve(owner, running(store, owner, progress=0.5, ran_for_s=40))  # ~40 s left
    limit.reserve(owner, running(store, owner, progress=0.8, ran_for_s=40))  # ~10 s left
    limit.reserve(owner, recorded(store, owner))  # queued: no estimate
    retry_after = int(refusal(limit, owner).headers["Retry-After"])
    assert 9 <= retry_after <= 11


def test_retry_after_is_the_default_without_an_estimate_and_capped_at_an_hour(store, owner):
    limit = ActiveJobLimit(store.redis, 1)
    barely_started = running(store, owner, progress=0.0, ran_for_s=10)  # too early to estimate
    limit.reserve(owner, barely_started)
    assert refusal(limit, owner).headers["Retry-After"] == str(DEFAULT_RETRY_AFTER_S)

    store.redis.delete(keys.owner_active_jobs_key(owner))
    limit.reserve(owner, running(store, owner, progress=0.05, ran_for_s=3600))  # ~19 h left
    assert refusal(limit, owner).headers["Retry-After"] == str(MAX_RETRY_AFTER_S)

    store.redis.delete(keys.owner_active_jobs_key(owner))
    limit.reserve(owner, running(store, owner, progress=0.999, ran_for_s=1))  # about to end
    assert refusal(limit, owner).headers["Retry-After"] == "1"  # never 0
