"""Retention: finished jobs are deleted `DEMIX_RETENTION_S` after they finish (record and
files), uploads and job folders left by crashes are swept, and the job JSON says when."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from datetime import datetime

import pytest
import requests

from demix import redis_keys as keys
from demix.jobs.records import JobStore
from demix.jobs.retention import ORPHAN_AGE_S, sweep_expired_jobs, sweep_orphaned_job_folders
from demix.storage.local import sweep_orphaned_uploads
from demix.storage.local import JobStorage
from testkit.synthetic_audio import wav_bytes
from tests.support.live import wait_for_job
from tests.support.waiting import wait_for

DAY = 86400


def submit(server, tmp_path) -> dict:
    response = requests.post(f"{server.url}/v1/jobs", timeout=60, data={"stems": "drums"},
                             files={"file": ("song.wav", wav_bytes(tmp_path, seconds=0.3), "audio/wav")})
    assert response.status_code == 202, response.text
    return response.json()


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


@pytest.fixture
def store(redis_client) -> JobStore:
    return JobStore(redis_client)


@pytest.fixture(scope="module")
def finished_jobs(live_server, tmp_path_factory) -> list[dict]:
    """Three jobs that ran to the end through the real worker."""
    tmp_path = tmp_path_factory.mktemp("retention")
    submitted = [submit(live_server, tmp_path) for _ in range(3)]
    return [wait_for_job(live_server.url, job["id"]) for job in submitted]


def test_a_finished_job_shows_when_it_expires_and_a_queued_one_does_not(finished_jobs, idle_server,
                                                                         tmp_path, settings):
    job = finished_jobs[0]
    assert job["status"] == "succeeded"
    assert parse_time(job["expires_at"]) == pytest.approx(parse_time(job["finished_at"]) + settings.retention_s,
                                                          abs=0.002)
    assert settings.retention_s == DAY  # the default
    assert submit(idle_server, tmp_path)["expires_at"] is None


def test_jobs_are_kept_until_their_retention_time_then_deleted_with_their_files(
        live_server, finished_jobs, store, settings):
    storage = JobStorage(settings.data_dir)
    job = finished_jobs[1]
    finished = parse_time(job["finished_at"])
    assert storage.job_dir(job["id"]).is_dir()

    assert job["id"] not in sweep_expired_jobs(store, storage, retention_s=60, now=finished + 59)
    assert requests.get(job["url"], timeout=10).status_code == 200

    assert job["id"] in sweep_expired_jobs(store, storage, retention_s=60, now=finished + 61)
    gone = requests.get(job["url"], timeout=10)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
    assert not storage.job_dir(job["id"]).exists()
    assert store.redis.zscore(keys.jobs_index_key(), job["id"]) is None


def test_retention_zero_keeps_jobs_forever(live_server, store, settings, tmp_path):
    # A job of its own: the test above sweeps every job that finished up to 1 s after its
    # own, which may be all of `finished_jobs`.
    job = wait_for_job(live_server.url, submit(live_server, tmp_path)["id"])
    storage = JobStorage(settings.data_dir)
    assert sweep_expired_jobs(store, storage, retention_s=0, now=time.time() + 100 * 365 * DAY) == []
    assert store.get(job["id"])


def test_unfinished_jobs_are_never_expired(idle_server, store, tmp_path):
    job = submit(idle_server, tmp_path)  # stays queued: no worker consumes the idle queue
    storage = JobStorage(idle_server.settings.data_dir)
    sweep_expired_jobs(store, storage, retention_s=1, now=time.time() + 10 * DAY)
    assert store.get(job["id"]).status.value == "queued"
    assert storage.input_path(job["id"]).is_file()


def test_several_workers_sweeping_at_once_delete_each_job_once_and_fail_nowhere(
        live_server, store, settings, tmp_path):
    storage = JobStorage(settings.data_dir)
    jobs = [wait_for_job(live_server.url, submit(live_server, tmp_path)["id"]) for _ in range(4)]
    later = max(parse_time(job["finished_at"]) for job in jobs) + 11
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        sweeps = list(pool.map(lambda _: sweep_expired_jobs(store, storage, 10, now=later), range(4)))
    assert {job["id"] for job in jobs} <= set().union(*sweeps)
    for job in jobs:
        assert requests.get(job["url"], timeout=10).status_code == 404
        assert not storage.job_dir(job["id"]).exists()


def age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_uploads_orphaned_by_a_crash_are_swept_after_an_hour(tmp_path):
    storage = JobStorage(tmp_path / "data")
    storage.incoming_dir.mkdir(parents=True)
    orphan, fresh = storage.incoming_dir / "upload-old.part", storage.incoming_dir / "upload-new.part"
    orphan.write_bytes(b"RIFF half an upload")
    fresh.write_bytes(b"RIFF still streaming in")
    age(orphan, ORPHAN_AGE_S + 60)
    age(fresh, ORPHAN_AGE_S - 60)
    assert sweep_orphaned_uploads(storage) == ["upload-old.part"]
    assert sorted(p.name for p in storage.incoming_dir.iterdir()) == ["upload-new.part"]


def test_job_folders_without_a_record_are_swept_only_when_idle_for_an_hour(tmp_path, store, settings):
    storage = JobStorage(tmp_path / "data")
    orphan, young, recorded = "a" * 32, "b" * 32, "c" * 32
    for job_id in (orphan, young, recorded):
        storage.input_path(job_id).parent.mkdir(parents=True)
        storage.input_path(job_id).write_bytes(b"RIFF")
    store.redis.hset(keys.job_key(recorded), "status", '"succeeded"')
    try:
        for job_id in (orphan, recorded):
            age(storage.input_path(job_id), ORPHAN_AGE_S + 60)
            age(storage.job_dir(job_id), ORPHAN_AGE_S + 60)
        # `young` may be a submit between moving its upload and writing its record.
        assert sweep_orphaned_job_folders(store, storage) == [orphan]
        assert not storage.job_dir(orphan).exists()
        assert storage.job_dir(young).is_dir() and storage.job_dir(recorded).is_dir()
    finally:
        store.redis.delete(keys.job_key(recorded))


def test_the_worker_maintenance_loop_deletes_jobs_once_their_retention_time_is_over(
        live_server, settings, tmp_path):
    from demix.celery_app import celery_app
    from demix.worker.maintenance import SWEEPS, MaintenanceLoop, maintenance_context

    job = wait_for_job(live_server.url, submit(live_server, tmp_path)["id"])
    assert job["status"] == "succeeded"
    short = dataclasses.replace(settings, retention_s=1, sweep_interval_s=0.2)
    assert {"expired jobs", "orphaned uploads", "orphaned job folders"} <= {sweep.name for sweep in SWEEPS}
    loop = MaintenanceLoop(maintenance_context(celery_app, short), SWEEPS)
    loop.start()
    try:
        wait_for(lambda: requests.get(job["url"], timeout=10).status_code == 404,
                 "the maintenance loop deleting the expired job", timeout=60, every=0.1)
    finally:
        loop.stop()
    assert not JobStorage(settings.data_dir).job_dir(job["id"]).exists()
