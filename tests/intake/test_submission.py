"""Submitting a job (`demix.intake.submission`) against a real Redis: all or nothing when the
broker or the per-key limit refuses it (no record, no files, no slot, the idempotency
key free again), what a `url` job's record holds before its input is known, and the
models the warm workers reported.

The doors' views of submitting (HTTP status codes, idempotent repeats, refused URLs)
are in tests/test_api_*.py, tests/jobs/test_idempotency.py and tests/intake/test_url_jobs.py."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from demix.cli.redis_server import free_port
from demix import redis_keys as keys
from demix.celery_app import make_celery
from demix.errors import ServiceUnavailable, TooManyActiveJobs
from demix.jobs.records import JobStatus
from demix.readiness import mark_ready
from demix.services import Services, build_services
from demix.intake.submission import IdempotentSubmit, reported_models, submit_upload, submit_url
from testkit.synthetic_audio import write_wav
from tests.support.environment import UNCONSUMED_QUEUE
from tests.support.service_state import files_under, queue_length


@pytest.fixture
def services(settings, redis_client, tmp_path) -> Services:
    # Its Celery app is left open: kombu shares producer pools between apps of one broker.
    return build_services(dataclasses.replace(settings, queue=UNCONSUMED_QUEUE, data_dir=tmp_path / "data",
                                              max_active_jobs_per_key=1))


def staged(services: Services, name: str = "upload.wav") -> Path:
    services.storage.incoming_dir.mkdir(parents=True, exist_ok=True)
    return write_wav(services.storage.incoming_dir / name, 44100, 2, 0.5)


def owners_active(redis_client, owner: str) -> set:
    return redis_client.smembers(keys.owner_active_jobs_key(owner))


def index(redis_client) -> set:
    return set(redis_client.zrange(keys.jobs_index_key(), 0, -1))


def test_an_unreachable_broker_keeps_nothing_and_frees_the_key_for_a_retry(services, redis_client, tmp_path):
    owner, key = f"owner-{tmp_path.name}", IdempotentSubmit(f"owner-{tmp_path.name}", "retry-me")
    dead_broker = make_celery(dataclasses.replace(services.settings, redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    broken = dataclasses.replace(services, celery=dead_broker)
    jobs_before, queued_before = index(redis_client), queue_length(redis_client)
    upload = staged(services)
    with pytest.raises(ServiceUnavailable, match="nothing was kept"):
        submit_upload(upload, {"stems": "vocals"}, broken, owner=owner, idempotent=key)
    broken.celery.pool.force_close_all()
    assert index(redis_client) == jobs_before and queue_length(redis_client) == queued_before
    assert files_under(services.storage.root / "jobs") == set()  # the accepted input went again

    # The owner's one slot is free (the gone job is pruned) and the key claims no job.
    job, created = submit_upload(staged(services), {"stems": "vocals"}, services, owner=owner, idempotent=key)
    assert created and services.jobs.get(job.id).status is JobStatus.QUEUED
    assert queue_length(redis_client) == queued_before + 1
    services.jobs.delete(job.id)


def test_a_submit_over_the_limit_removes_its_record_and_input_and_keeps_the_others(services, redis_client, tmp_path):
    owner = f"owner-{tmp_path.name}"
    first, _ = submit_upload(staged(services, "first.wav"), {"stems": "vocals"}, services, owner=owner)
    jobs_before, queued_before = index(redis_client), queue_length(redis_client)
    with pytest.raises(TooManyActiveJobs):
        submit_upload(staged(services, "second.wav"), {"stems": "drums"}, services, owner=owner)
    assert index(redis_client) == jobs_before and queue_length(redis_client) == queued_before
    assert {path.relative_to(services.storage.root / "jobs").parts[0]
            for path in files_under(services.storage.root / "jobs")} == {first.id}
    assert owners_active(redis_client, owner) == {first.id.encode()}
    services.jobs.delete(first.id)


def test_a_url_job_is_queued_with_its_fields_before_its_input_is_known(services, redis_client):
    job, created = submit_url("http://127.0.0.1:9/song.flac", {"stems": "drums", "url": "ignored here",
                                                               "format": "flac"}, services)
    record = services.jobs.get(job.id)
    assert created and record.status is JobStatus.QUEUED and record.source_url == "http://127.0.0.1:9/song.flac"
    assert (record.samplerate, record.frames, record.stems) == (0, 0, "drums")
    assert record.request_fields == {"stems": "drums", "format": "flac"}  # parsed again once fetched
    assert record.queue == UNCONSUMED_QUEUE and record.model == services.settings.default_model
    assert files_under(services.storage.root / "jobs") == set()  # a worker fetches the input
    services.jobs.delete(job.id)


def test_the_models_reported_are_the_first_warm_note_of_each(services, redis_client):
    workers = ["reporting-host:1", "reporting-host:2"]
    try:
        mark_ready(redis_client, {"models": {"tiny_a": {"sources": ["vocals", "other"]}}}, worker=workers[0])
        mark_ready(redis_client, {"models": {"tiny_a": {"sources": ["vocals", "other"]},
                                             "tiny_b": {"error": "no weights"}}}, worker=workers[1])
        reported = reported_models(services)
        assert reported["tiny_a"] == {"sources": ["vocals", "other"]}
        assert "tiny_b" not in reported  # a failed load reports nothing
    finally:
        redis_client.hdel(keys.warm_workers_key(), *workers)


def test_no_models_are_reported_while_redis_is_down(settings, tmp_path):
    down = build_services(dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0",
                                              data_dir=tmp_path / "data"))
    assert reported_models(down) == {}  # the submit then fails at the record, with the right error


def test_a_submit_needs_the_broker_but_never_the_result_backend(services, redis_client, tmp_path):
    """The separation task's outcome is in the job record: sending it must not subscribe
    to a Celery result (a subscription per job kept for the API process's life, and a
    submit blocked for ~20 s retrying the result backend when it is unreachable)."""
    no_results = make_celery(services.settings)
    no_results.conf.result_backend = f"redis://127.0.0.1:{free_port()}/0"
    queued_before = queue_length(redis_client)
    job, created = submit_upload(staged(services), {"stems": "vocals"},
                                 dataclasses.replace(services, celery=no_results))
    assert created and queue_length(redis_client) == queued_before + 1
    services.jobs.delete(job.id)
