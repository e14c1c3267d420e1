"""One attempt of a job (`demix.worker.attempt`): which model and options it runs with, what
becomes of its files when its outcome cannot be recorded, riding out a Redis outage, and
its lease learning why it must stop (deleted, cancelled, superseded, its worker stopping).

Whole runs through the runner are in tests/worker/test_runner.py."""
from __future__ import annotations

import dataclasses
import logging
import os
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from demix.cli.redis_server import free_port
from demix import redis_keys as keys
from demix.errors import IllegalTransition, JobNotFound, ModelUnavailable, StaleAttempt
from demix.jobs.records import Job, JobStatus, JobStore, new_job_id
from demix.storage.local import JobStorage
from tests.support.environment import UNCONSUMED_QUEUE
from tests.support.waiting import wait_for
from demix.worker import attempt as attempt_module
from demix.worker.attempt import (AttemptLease, JobInterrupted, WorkerContext, job_model_spec, lease_holder,
                                  model_spec, record_outcome, retry_while_redis_is_down, separation_options)
from demix.separation.models import ModelCache, ModelSpec


def job(model: str = "", queue: str = UNCONSUMED_QUEUE) -> Job:
    return Job(id=new_job_id(), status=JobStatus.QUEUED, stems="vocals", model=model, samplerate=44100,
               channels=2, frames=44100, created_at=time.time(), queue=queue)


@pytest.fixture
def storage(tmp_path) -> JobStorage:
    return JobStorage(tmp_path / "data")


def with_two_attempts(storage: JobStorage, job_id: str) -> None:
    """The job's input and stems written by attempts 1 and 2."""
    storage.job_dir(job_id).mkdir(parents=True)
    storage.input_path(job_id).write_bytes(b"mix")
    for attempt in (1, 2):
        pending = storage.pending_stem(job_id, "vocals", attempt=attempt)
        pending.temporary.write_bytes(b"stem")
        pending.commit()


# -- the model and options of a run ------------------------------------------------------------

def test_a_job_runs_its_own_model_or_the_default_for_a_record_without_one(settings):
    served = dataclasses.replace(settings, models="htdemucs,htdemucs_6s", worker_models="")
    assert job_model_spec(job("htdemucs_6s"), served, "cpu") == \
        ModelSpec("htdemucs_6s", served.model_repo, "cpu", cache=str(served.models_dir))
    assert job_model_spec(job(""), served, "cuda:1").name == "htdemucs"
    assert model_spec(served, "cpu") == job_model_spec(job(""), served, "cpu")


def test_a_job_of_a_model_this_worker_does_not_serve_fails_saying_why(settings):
    worker = dataclasses.replace(settings, models="htdemucs,htdemucs_6s", worker_models="htdemucs")
    with pytest.raises(ModelUnavailable) as refused:
        job_model_spec(job("htdemucs_6s", queue="demix.htdemucs_6s"), worker, "cpu")
    assert "'htdemucs_6s'" in refused.value.message and "'demix.htdemucs_6s'" in refused.value.message
    assert "DEMIX_MODELS must be the same" in refused.value.message


def test_the_settings_decide_how_the_model_runs(settings):
    tuned = dataclasses.replace(settings, shifts=2, overlap=0.5, precision="bf16", batch_segments=3)
    options = separation_options(tuned, "cpu")
    assert (options.shifts, options.overlap, options.device, options.precision, options.batch_segments) == \
        (2, 0.5, "cpu", "bf16", 3)


def test_a_lease_names_the_worker_and_the_process_holding_it():
    assert lease_holder("celery@box") == f"celery@box process {os.getpid()}"
    assert lease_holder("").endswith(f" process {os.getpid()}") and not lease_holder("").startswith(" ")


# -- recording the outcome --------------------------------------------------------------------

def context_with(settings, storage: JobStorage, jobs=None) -> WorkerContext:
    return WorkerContext(settings=settings, jobs=jobs, storage=storage, models=ModelCache(), celery=None)


def refused_by(error: Exception):
    def write():
        raise error
    return write


def test_a_recorded_outcome_keeps_the_files(settings, storage):
    with_two_attempts(storage, "j")
    assert record_outcome("j", 2, context_with(settings, storage), lambda: job()) is True
    assert storage.attempts_stored("j") == [1, 2]


def test_an_outcome_for_a_deleted_or_cancelled_job_removes_all_its_files(settings, storage):
    for error in (JobNotFound("no job with id 'j'"),
                  IllegalTransition("job j is cancelled", details={"status": "cancelled", "attempts": 2})):
        with_two_attempts(storage, "j")
        assert record_outcome("j", 2, context_with(settings, storage), refused_by(error)) is False
        assert not storage.job_dir("j").exists()


def test_an_outcome_of_a_superseded_attempt_removes_only_that_attempts_stems(settings, storage):
    for error in (StaleAttempt("job j is at attempt 2, not 1", details={"status": "running", "attempts": 2}),
                  IllegalTransition("job j is queued", details={"status": "queued", "attempts": 1})):
        with_two_attempts(storage, "j")
        assert record_outcome("j", 1, context_with(settings, storage), refused_by(error)) is False
        assert storage.attempts_stored("j") == [2] and storage.input_path("j").exists()
        storage.delete_job("j")


def test_a_stale_attempt_of_a_cancelled_job_leaves_the_current_attempts_files(settings, storage):
    """Stale wins over the status: the job's files belong to whoever handles its cancel."""
    with_two_attempts(storage, "j")
    stale = StaleAttempt("job j is at attempt 2, not 1", details={"status": "cancelled", "attempts": 2})
    assert record_outcome("j", 1, context_with(settings, storage), refused_by(stale)) is False
    assert storage.attempts_stored("j") == [2]


def test_other_errors_of_the_write_are_not_swallowed(settings, storage):
    with_two_attempts(storage, "j")
    with pytest.raises(ValueError):
        record_outcome("j", 2, context_with(settings, storage), refused_by(ValueError("a bug")))
    assert storage.attempts_stored("j") == [1, 2]


# -- Redis outages ----------------------------------------------------------------------------

def test_a_write_is_tried_again_while_redis_is_unreachable_then_returns(monkeypatch, caplog):
    monkeypatch.setattr(attempt_module, "REDIS_RETRY_S", 0.0)
    outcomes = [redis.exceptions.ConnectionError("refused"), redis.exceptions.TimeoutError("slow"), "written"]
    calls = []

    def write():
        calls.append(1)
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    with caplog.at_level(logging.WARNING, logger="demix.worker.attempt"):
        assert retry_while_redis_is_down(write) == "written"
    assert len(calls) == 3 and caplog.text.count("Redis unreachable") == 2


def test_a_write_gives_up_after_its_patience_with_redis_error(monkeypatch):
    monkeypatch.setattr(attempt_module, "REDIS_RETRY_S", 0.01)
    calls = []

    def down():
        calls.append(1)
        raise redis.exceptions.ConnectionError("refused")

    started = time.monotonic()
    with pytest.raises(redis.exceptions.ConnectionError):
        retry_while_redis_is_down(down, patience=0.1)
    assert time.monotonic() - started >= 0.1 and len(calls) >= 2


def test_a_write_refused_for_another_reason_is_not_tried_again():
    calls = []

    def refused():
        calls.append(1)
        raise JobNotFound("no job")

    with pytest.raises(JobNotFound):
        retry_while_redis_is_down(refused)
    assert calls == [1]


def test_a_lease_rides_out_an_unreachable_redis_without_stopping_the_run(settings, storage, caplog):
    down = redis.Redis(port=free_port(), socket_connect_timeout=1, socket_timeout=1,
                       retry=Retry(NoBackoff(), 0))  # refused at once, not after redis-py's backoff
    context = context_with(settings, storage, jobs=JobStore(down))
    lease = AttemptLease(context, new_job_id(), attempt=1, worker="celery@box", interval=0)
    with caplog.at_level(logging.WARNING, logger="demix.worker.attempt"):
        lease.report_progress(0.5)
        lease.confirm()
    assert "lease not renewed" in caplog.text


# -- the lease learning why to stop (a real Redis) --------------------------------------------

@pytest.fixture
def running(settings, redis_client, storage):
    """A running job (attempt 1) and a context whose leases are 1 s."""
    context = context_with(dataclasses.replace(settings, lease_s=1), storage, jobs=JobStore(redis_client))
    record = job()
    context.jobs.create(record)
    context.jobs.mark_running(record.id, lease_s=1)
    yield context, record.id
    context.jobs.delete(record.id)


def interrupted(lease: AttemptLease) -> JobInterrupted:
    with pytest.raises(JobInterrupted) as stopped:
        lease.report_progress(0.5)
    with pytest.raises(JobInterrupted):
        lease.check()  # and it stays stopped
    return stopped.value


def test_a_lease_records_progress_and_renews_itself(running):
    context, job_id = running
    lease = AttemptLease(context, job_id, attempt=1, worker="celery@box", interval=0)
    lease.report_progress(0.4)
    assert context.jobs.get(job_id).progress == 0.4
    assert context.jobs.lease_holder(job_id) == f"1 {lease_holder('celery@box')}"


def test_the_heartbeat_renews_the_lease_between_progress_reports(running):
    context, job_id = running
    context.jobs.redis.pexpire(keys.lease_key(job_id), 600_000)  # far longer than a renewal sets
    with AttemptLease(context, job_id, attempt=1, worker="celery@box"):
        wait_for(lambda: 0 < context.jobs.redis.pttl(keys.lease_key(job_id)) <= 1000, "a renewal of the lease",
                 timeout=30)
        assert context.jobs.lease_holder(job_id) == f"1 {lease_holder('celery@box')}"


def test_a_deleted_job_stops_its_run(running):
    context, job_id = running
    lease = AttemptLease(context, job_id, attempt=1, worker="", interval=0)
    context.jobs.delete(job_id)
    assert interrupted(lease).reason == "deleted"


def test_a_cancelled_job_stops_its_run(running):
    context, job_id = running
    lease = AttemptLease(context, job_id, attempt=1, worker="", interval=0)
    context.jobs.mark_cancelled(job_id)
    stopped = interrupted(lease)
    assert stopped.reason == "cancelled" and "cancelled" in str(stopped)


def test_a_job_taken_over_by_a_later_attempt_stops_the_earlier_run(running):
    context, job_id = running
    lease = AttemptLease(context, job_id, attempt=1, worker="", interval=0)
    context.jobs.requeue(job_id, 1, handed_back=True)
    assert interrupted(lease).reason == "superseded"  # queued again: not this run's
    assert context.jobs.mark_running(job_id, lease_s=1).attempts == 2
    late = AttemptLease(context, job_id, attempt=1, worker="", interval=0)
    assert interrupted(late).reason == "superseded"  # running, but as attempt 2


def test_a_run_stops_when_its_worker_shuts_down(running):
    context, job_id = running
    context.jobs.redis.set(keys.worker_stopping_key("celery@box"), 1, ex=60)
    try:
        lease = AttemptLease(context, job_id, attempt=1, worker="celery@box", interval=3600)
        with pytest.raises(JobInterrupted) as stopped:
            lease.confirm()
        assert stopped.value.reason == "stopping" and "celery@box" in str(stopped.value)
        AttemptLease(context, job_id, attempt=1, worker="celery@other", interval=0).confirm()  # not its worker
    finally:
        context.jobs.redis.delete(keys.worker_stopping_key("celery@box"))


def test_the_heartbeat_alone_notices_a_cancel(running):
    context, job_id = running
    with AttemptLease(context, job_id, attempt=1, worker="", interval=3600) as lease:
        context.jobs.mark_cancelled(job_id)
        reason = wait_for(lambda: stop_reason(lease), "the heartbeat to notice the cancel", timeout=30)
    assert reason == "cancelled"


def stop_reason(lease: AttemptLease):
    """Why the lease says its run must stop, or None (asked without reporting progress)."""
    try:
        lease.check()
    except JobInterrupted as stopped:
        return stopped.reason
    return None
