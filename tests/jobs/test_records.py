"""Job records and their state machine against a real Redis."""
from __future__ import annotations

import threading
import time

import pytest

from demix import redis_keys as keys
from demix.errors import IllegalTransition, InvalidAudio, JobNotFound, StaleAttempt, WorkerLost
from demix.jobs.records import Job, JobStatus, JobStore, new_job_id


def make_job() -> Job:
    return Job(id=new_job_id(), status=JobStatus.QUEUED, stems="vocals", model="htdemucs",
               samplerate=48000, channels=1, frames=96000, created_at=time.time())


@pytest.fixture(autouse=True)
def _no_running_leftovers(redis_client):
    """Jobs left running here have no input: the test worker's lost-job sweep must not
    find them later."""
    store = JobStore(redis_client)
    before = set(store.running_job_ids())
    yield
    for job_id in set(store.running_job_ids()) - before:
        store.delete(job_id)


@pytest.fixture
def store(redis_client) -> JobStore:
    return JobStore(redis_client)


def created(store: JobStore) -> Job:
    job = make_job()
    store.create(job)
    return job


def test_a_job_moves_through_its_states(store):
    job = created(store)
    assert store.get(job.id) == job and job.attempts == 0
    running = store.mark_running(job.id, lease_s=30, holder="w1")
    assert running.attempts == 1 and running.status is JobStatus.RUNNING and running.started_at
    assert store.lease_holder(job.id) == "1 w1" and job.id in store.running_job_ids()
    store.heartbeat(job.id, 1, lease_s=30, progress=0.4)
    assert store.get(job.id).progress == 0.4
    done = store.mark_succeeded(job.id, ["vocals", "no_vocals"], attempt=1)
    assert done == store.get(job.id)
    assert done.status is JobStatus.SUCCEEDED and done.progress == 1.0 and done.status.is_finished
    assert done.outputs == ["vocals", "no_vocals"] and done.to_public()["attempts"] == 1
    assert store.lease_holder(job.id) is None and job.id not in store.running_job_ids()


def test_a_failed_job_keeps_its_error(store):
    job = created(store)
    store.mark_failed(job.id, InvalidAudio("bad", code="empty_audio"))
    failed = store.get(job.id)
    assert failed.status is JobStatus.FAILED and failed.error == {"code": "empty_audio", "message": "bad"}
    assert failed.to_public()["duration"] == 2.0


@pytest.mark.parametrize("path, move, expected", [
    ([], "succeed", JobStatus.QUEUED),          # queued -> succeeded skips running
    ([], "requeue", JobStatus.QUEUED),          # only a running job goes back to the queue
    (["run", "succeed"], "run", JobStatus.SUCCEEDED),
    (["run", "succeed"], "cancel", JobStatus.SUCCEEDED),
    (["run", "succeed"], "fail", JobStatus.SUCCEEDED),
    (["cancel"], "run", JobStatus.CANCELLED),   # a cancelled job is never started
    (["cancel"], "cancel", JobStatus.CANCELLED),
    (["run", "fail"], "succeed", JobStatus.FAILED),
    (["run"], "run", JobStatus.RUNNING),        # a running job is not started twice
])
def test_illegal_transitions_are_refused_and_change_nothing(store, path, move, expected):
    job = created(store)
    moves = {
        "run": lambda: store.mark_running(job.id, lease_s=30),
        "succeed": lambda: store.mark_succeeded(job.id, ["vocals"], attempt=store.get(job.id).attempts),
        "fail": lambda: store.mark_failed(job.id, InvalidAudio("bad")),
        "cancel": lambda: store.mark_cancelled(job.id),
        "requeue": lambda: store.requeue(job.id, store.get(job.id).attempts, handed_back=True),
    }
    for step in path:
        moves[step]()
    before = store.get(job.id)
    with pytest.raises(IllegalTransition) as raised:
        moves[move]()
    assert raised.value.details["status"] == expected.value
    assert store.get(job.id) == before


def test_cancel_from_queued_and_from_running(store):
    queued = created(store)
    assert store.mark_cancelled(queued.id).status is JobStatus.CANCELLED
    running = created(store)
    store.mark_running(running.id, lease_s=30)
    cancelled = store.mark_cancelled(running.id)
    assert cancelled.status is JobStatus.CANCELLED and cancelled.finished_at is not None
    assert store.lease_holder(running.id) is None
    with pytest.raises(IllegalTransition):  # the running attempt notices at its next heartbeat
        store.heartbeat(running.id, 1, lease_s=30, progress=0.5)


def test_a_race_for_one_transition_has_exactly_one_winner(redis_server):
    import redis

    contenders = 8
    for _ in range(20):
        job = make_job()
        JobStore(redis.Redis.from_url(redis_server.url)).create(job)
        stores = [JobStore(redis.Redis.from_url(redis_server.url)) for _ in range(contenders)]
        barrier = threading.Barrier(contenders)
        winners, losers = [], []

        def contend(store: JobStore) -> None:
            barrier.wait()
            try:
                winners.append(store.mark_running(job.id, lease_s=30).attempts)
            except IllegalTransition:
                losers.append(1)

        threads = [threading.Thread(target=contend, args=(s,)) for s in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert winners == [1] and len(losers) == contenders - 1
        for store in stores:
            store.redis.close()


def test_cancel_racing_success_finishes_the_job_once_and_calls_the_hook_once(redis_server):
    import redis

    for _ in range(20):
        finished: list[Job] = []
        stores = [JobStore(redis.Redis.from_url(redis_server.url), on_finished=[finished.append])
                  for _ in range(2)]
        job = make_job()
        stores[0].create(job)
        stores[0].mark_running(job.id, lease_s=30)
        barrier = threading.Barrier(2)

        def succeed() -> None:
            barrier.wait()
            try:
                stores[0].mark_succeeded(job.id, ["vocals"], attempt=1)
            except IllegalTransition:
                pass

        def cancel() -> None:
            barrier.wait()
            try:
                stores[1].mark_cancelled(job.id)
            except IllegalTransition:
                pass

        threads = [threading.Thread(target=succeed), threading.Thread(target=cancel)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(finished) == 1 and finished[0] == stores[0].get(job.id)
        for store in stores:
            store.redis.close()


def test_a_stale_attempt_cannot_write_the_job(store):
    job = created(store)
    store.mark_running(job.id, lease_s=0.001)
    time.sleep(0.05)  # the first attempt's worker is presumed dead: its lease expired
    store.requeue(job.id, 1, handed_back=False)
    assert store.mark_running(job.id, lease_s=30).attempts == 2
    with pytest.raises(StaleAttempt):
        store.heartbeat(job.id, 1, lease_s=30, progress=0.9)
    with pytest.raises(StaleAttempt):
        store.mark_succeeded(job.id, ["vocals"], attempt=1)
    with pytest.raises(StaleAttempt):
        store.mark_failed(job.id, InvalidAudio("late"), attempt=1)
    assert store.lease_holder(job.id).startswith("2 ")
    assert store.mark_succeeded(job.id, ["vocals"], attempt=2).attempts == 2


def test_a_job_with_a_live_lease_is_not_requeued_as_lost(store):
    job = created(store)
    store.mark_running(job.id, lease_s=30)
    with pytest.raises(IllegalTransition, match="live lease"):
        store.requeue(job.id, 1, handed_back=False)
    with pytest.raises(IllegalTransition, match="live lease"):
        store.mark_failed(job.id, WorkerLost("lost"), attempt=1, lease_must_be_gone=True)
    assert store.get(job.id).status is JobStatus.RUNNING


def test_a_handed_back_run_does_not_count_as_lost(store):
    job = created(store)
    store.mark_running(job.id, lease_s=30)
    requeued = store.requeue(job.id, 1, handed_back=True)
    assert requeued.status is JobStatus.QUEUED and requeued.handed_back == 1
    assert requeued.attempts == 1 and requeued.counted_attempts == 0
    assert store.mark_running(job.id, lease_s=30).attempts == 2


def test_a_failing_hook_is_logged_not_raised(redis_client, caplog):
    calls = []

    def broken(job: Job) -> None:
        raise RuntimeError("hook bug")

    store = JobStore(redis_client, on_finished=[broken, calls.append])
    job = created(store)
    store.mark_cancelled(job.id)
    assert [j.id for j in calls] == [job.id] and "hook bug" in caplog.text


def test_unknown_or_deleted_jobs_are_not_found(store, redis_client):
    with pytest.raises(JobNotFound):
        store.get(new_job_id())
    with pytest.raises(JobNotFound):
        store.get("../../etc/passwd")
    job = created(store)
    store.mark_running(job.id, lease_s=30)
    store.delete(job.id)
    with pytest.raises(JobNotFound):
        store.heartbeat(job.id, 1, lease_s=30, progress=0.5)  # a late report must not resurrect it
    with pytest.raises(JobNotFound):
        store.mark_succeeded(job.id, ["vocals"], attempt=1)
    assert not redis_client.exists(keys.job_key(job.id), keys.lease_key(job.id))
    assert job.id not in store.running_job_ids()
