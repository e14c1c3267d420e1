"""The job runner without Celery: failures become job errors, progress is recorded."""
from __future__ import annotations

import dataclasses
import errno
import json
import shutil
import time

import pytest

from demix import redis_keys as keys
from demix.atomic_files import is_temporary
from demix.audio.io import AudioWriter, read_info
from demix.jobs.records import Job, JobStatus, JobStore, new_job_id
from demix.jobs.lifecycle import delete_job
from demix.audio.output_formats import resolve_output
from demix.readiness import process_id, ready_workers
from demix.storage.local import JobStorage
from testkit.synthetic_audio import write_wav
from tests.support.environment import UNCONSUMED_QUEUE
from tests.support.small_disk import mounted_tmpfs
from tests.support.waiting import wait_for
from demix.separation import forward
from demix.worker.attempt import AttemptLease, WorkerContext
from demix.separation.models import ModelCache
from demix.worker.runner import run_job, warm_up

pytestmark = pytest.mark.processes


def queued_job(context: WorkerContext, tmp_path, stems: str = "all", seconds: float = 0.5,
               output_form: dict | None = None) -> str:
    job_id = new_job_id()
    context.storage.incoming_dir.mkdir(parents=True, exist_ok=True)  # where uploads arrive
    upload = write_wav(context.storage.incoming_dir / "upload.wav", 44100, 2, seconds)
    output = resolve_output(output_form or {}, read_info(upload)).to_dict()
    context.storage.accept_upload(upload, job_id)
    context.jobs.create(Job(id=job_id, status=JobStatus.QUEUED, stems=stems, model=context.settings.model,
                            samplerate=44100, channels=2, frames=int(44100 * seconds),
                            created_at=time.time(), output=output))
    return job_id


@pytest.fixture
def context(settings, redis_client, tiny_model_repo, tmp_path) -> WorkerContext:
    # Tasks the runner sends (recovering a lost job) go to a queue no worker consumes.
    settings = dataclasses.replace(settings, queue=UNCONSUMED_QUEUE)
    return WorkerContext(settings=settings, jobs=JobStore(redis_client),
                         storage=JobStorage(tmp_path / "data"), models=ModelCache())


def test_a_warmed_worker_runs_its_first_job_without_loading_or_preparing_the_model(
        context, tmp_path, monkeypatch):
    monkeypatch.setattr(forward, "cpu_supports_bf16", lambda: True)  # the tiny model runs anywhere
    context.settings = dataclasses.replace(context.settings, precision="bf16")
    started = time.time()
    note = warm_up(context)
    assert context.models.loads == 1 and "error" not in note
    assert ready_workers(context.jobs.redis, since=started)[process_id()]["precision"] == "bf16"
    copies = len(forward._BF16_COPIES)
    job_id = queued_job(context, tmp_path)
    run_job(job_id, context)
    assert context.jobs.get(job_id).status is JobStatus.SUCCEEDED
    # The first job found the model loaded and its bf16 weights already made.
    assert context.models.loads == 1 and len(forward._BF16_COPIES) == copies


def test_a_worker_whose_model_cannot_load_is_ready_with_the_error(context, tmp_path):
    context.settings = dataclasses.replace(context.settings, model_repo=str(tmp_path / "no-such-folder"))
    note = warm_up(context)
    assert "no-such-folder" in note["error"]
    assert "no-such-folder" in ready_workers(context.jobs.redis)[process_id()]["error"]


def test_missing_weights_fail_the_job_with_a_message_saying_how_to_provide_them(context, tmp_path):
    context.settings = dataclasses.replace(context.settings, model_repo=str(tmp_path / "no-such-folder"))
    job_id = queued_job(context, tmp_path)
    run_job(job_id, context)
    job = context.jobs.get(job_id)
    assert job.status is JobStatus.FAILED and job.finished_at is not None
    assert job.error["code"] == "model_unavailable"
    assert "DEMIX_MODEL_REPO" in job.error["message"] and "no-such-folder" in job.error["message"]


def test_unknown_model_name_in_a_repo_fails_the_job(context, tmp_path):
    context.settings = dataclasses.replace(context.settings, model="htdemucs_ft")
    job_id = queued_job(context, tmp_path)
    run_job(job_id, context)
    job = context.jobs.get(job_id)
    assert job.status is JobStatus.FAILED and job.error["code"] == "model_unavailable"
    assert "htdemucs_ft" in job.error["message"]


def test_a_finished_job_delivered_again_is_not_run_again(context, tmp_path):
    job_id = queued_job(context, tmp_path, stems="drums")
    run_job(job_id, context)
    first = context.jobs.get(job_id)
    assert first.status is JobStatus.SUCCEEDED and first.outputs == ["drums", "no_drums"]
    stem = context.storage.stem_path(job_id, "drums", attempt=1)
    mtime = stem.stat().st_mtime_ns
    run_job(job_id, context)  # a duplicate delivery
    assert context.jobs.get(job_id).finished_at == first.finished_at
    assert stem.stat().st_mtime_ns == mtime and context.models.loads == 1


def test_a_delivery_of_a_job_running_under_a_live_lease_is_skipped(context, tmp_path):
    job_id = queued_job(context, tmp_path, stems="vocals")
    running = context.jobs.mark_running(job_id, lease_s=60, holder="another worker")
    run_job(job_id, context)  # a duplicate or late message
    assert context.jobs.get(job_id) == running
    assert context.jobs.lease_holder(job_id) == "1 another worker"
    assert context.storage.attempts_on_disk(job_id) == [] and context.models.loads == 0
    context.jobs.delete(job_id)  # nobody runs it: keep other tests' sweeps from recovering it


def test_a_job_interrupted_mid_run_is_redone_from_its_input(context, tmp_path):
    job_id = queued_job(context, tmp_path, stems="vocals")
    context.jobs.mark_running(job_id, lease_s=0.001)  # a worker took it, then died
    time.sleep(0.05)  # and its lease expired
    leftover = context.storage.pending_stem(job_id, "vocals", attempt=1).temporary
    leftover.write_bytes(b"half a file")
    run_job(job_id, context)  # the redelivered message: recovers the job, sends it again
    requeued = context.jobs.get(job_id)
    assert requeued.status is JobStatus.QUEUED and requeued.attempts == 1
    run_job(job_id, context)  # the message the recovery sent
    job = context.jobs.get(job_id)
    assert job.status is JobStatus.SUCCEEDED and job.attempts == 2
    assert not leftover.exists() and context.storage.attempts_on_disk(job_id) == [2]
    assert sorted(p.name for p in context.storage.stems_dir(job_id, 2).iterdir()) == ["no_vocals.wav", "vocals.wav"]


def test_progress_reports_are_rate_limited_and_recorded(context, tmp_path):
    job_id = queued_job(context, tmp_path)
    context.jobs.mark_running(job_id, lease_s=30)
    lease = AttemptLease(context, job_id, attempt=1, worker="", interval=3600)
    lease.report_progress(0.25)
    lease.report_progress(0.5)  # within the interval: not written
    assert context.jobs.get(job_id).progress == 0.25


def test_a_run_outlives_a_redis_outage_longer_than_its_lease_and_records_its_outcome_after(
        settings, tiny_model_repo, tmp_path):
    import os
    import signal
    import threading

    import redis

    from demix.cli.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis", persist=True).start()
    client = redis.Redis.from_url(server.url, socket_connect_timeout=1, socket_timeout=5)
    context = WorkerContext(settings=dataclasses.replace(settings, lease_s=2, queue=UNCONSUMED_QUEUE),
                            jobs=JobStore(client), storage=JobStorage(tmp_path / "data"),
                            models=ModelCache())
    try:
        # Every write synced at once, so Redis can die as soon as the job runs (with the
        # default once-a-second sync a fast machine finished the job within that second).
        client.config_set("appendfsync", "always")
        job_id = queued_job(context, tmp_path, stems="vocals", seconds=120.0)
        runner = threading.Thread(target=run_job, args=(job_id, context))
        runner.start()
        wait_for(lambda: context.jobs.get(job_id).progress > 0, "the job under way", timeout=300, every=0.02)
        os.killpg(server.process.pid, signal.SIGKILL)  # Redis dies mid-job
        server.process.wait()
        down_since = time.monotonic()
        stems = context.storage.stems_dir(job_id, 1)
        # The run carries on without Redis and finishes its stems; it then waits for Redis
        # to record the outcome. The outage outlasts the lease.
        wait_for(lambda: (stems / "vocals.wav").exists() and (stems / "no_vocals.wav").exists(),
                 "both stems written while Redis is down", timeout=300)
        time.sleep(max(0.0, 2 * context.settings.lease_s - (time.monotonic() - down_since)))
        assert runner.is_alive()
        server = RedisServer(server.data_dir, port=server.port, persist=True).start()
        wait_for(lambda: not runner.is_alive(), "the run recording its outcome once Redis is back",
                 timeout=120, every=0.1)
        job = context.jobs.get(job_id)
        assert job.status is JobStatus.SUCCEEDED and job.attempts == 1
        assert job.outputs == ["vocals", "no_vocals"]
    finally:
        client.close()
        server.stop()


@pytest.fixture
def small_disk(tmp_path):
    """A real 768 KiB filesystem (tmpfs): room for a 2 s input, not for its four stems."""
    with mounted_tmpfs(tmp_path / "small-disk", "768k", "test_a_disk_full_error_from_the_writer_fails_the_job_"
                       "without_partial_stems (an injected ENOSPC)") as disk:
        yield disk


def assert_failed_with_disk_full_and_no_stems(context: WorkerContext, job_id: str) -> None:
    job = context.jobs.get(job_id)
    assert job.status is JobStatus.FAILED and job.outputs == []
    assert job.error["code"] == "disk_full" and "DEMIX_DATA_DIR" in job.error["message"]
    left = sorted(p.relative_to(context.storage.job_dir(job_id)).as_posix()
                  for p in context.storage.job_dir(job_id).rglob("*"))
    assert left == ["input.wav"]  # no stem, no temporary file, no scratch folder


@pytest.mark.parametrize("output_format", ["wav", "flac"])
def test_a_job_that_fills_the_disk_fails_with_disk_full_and_leaves_no_partial_stems(
        context, tmp_path, small_disk, output_format):
    context.storage = JobStorage(small_disk)
    job_id = queued_job(context, tmp_path, seconds=2.0, output_form={"format": output_format})
    input_bytes = context.storage.input_path(job_id).stat().st_size
    run_job(job_id, context)
    assert_failed_with_disk_full_and_no_stems(context, job_id)
    # The room the stems took is given back.
    assert shutil.disk_usage(small_disk).used <= input_bytes + 64 * 1024


def test_a_disk_full_error_from_the_writer_fails_the_job_without_partial_stems(
        context, tmp_path, monkeypatch):
    real_write = AudioWriter.write
    writes = []

    def write_until_the_disk_is_full(self, samples):
        writes.append(self.path)
        if len(writes) > 2:  # two stems got their samples on disk first
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        real_write(self, samples)

    monkeypatch.setattr(AudioWriter, "write", write_until_the_disk_is_full)
    job_id = queued_job(context, tmp_path, seconds=2.0)
    run_job(job_id, context)
    assert len(writes) == 3 and all(is_temporary(path) for path in writes)
    assert_failed_with_disk_full_and_no_stems(context, job_id)


def test_a_run_whose_job_folder_disappears_mid_write_stops_without_recreating_it(context, tmp_path, monkeypatch):
    job_id = queued_job(context, tmp_path, seconds=2.0)
    real_write = AudioWriter.write

    def delete_the_job_then_write(self, samples):
        if context.storage.job_dir(job_id).exists():
            delete_job(context.jobs, context.storage, job_id)  # DELETE, before the run notices
        real_write(self, samples)

    monkeypatch.setattr(AudioWriter, "write", delete_the_job_then_write)
    run_job(job_id, context)
    assert not context.storage.job_dir(job_id).exists()


def test_a_job_of_a_model_this_worker_does_not_serve_fails_saying_why(context, tmp_path):
    """Only when DEMIX_MODELS differs between the API and the worker can a job reach a
    worker that does not serve its model: it fails at once instead of running another model."""
    job_id = queued_job(context, tmp_path)
    context.jobs.redis.hset(keys.job_key(job_id), "model", json.dumps("htdemucs_6s"))
    run_job(job_id, context)
    job = context.jobs.get(job_id)
    assert job.status is JobStatus.FAILED and job.error["code"] == "model_unavailable"
    assert "model 'htdemucs_6s' is not served by the worker" in job.error["message"]
    assert context.models.loads == 0
