"""The job runner without Celery: failures become job errors, progress is recorded."""
from __future__ import annotations

import dataclasses
import time

import pytest

from shared.jobs import Job, JobStatus, JobStore, new_job_id
from shared.storage import JobStorage
from tests.audio_factory import write_wav
from worker.models import ModelCache
from shared.readiness import process_id, ready_workers
from worker import forward
from worker.runner import ProgressReporter, WorkerContext, run_job, warm_up


def queued_job(context: WorkerContext, tmp_path, stems: str = "all", seconds: float = 0.5) -> str:
    job_id = new_job_id()
    upload = write_wav(tmp_path / "upload.wav", 44100, 2, seconds)
    context.storage.accept_upload(upload, job_id)
    context.jobs.create(Job(id=job_id, status=JobStatus.QUEUED, stems=stems, model=context.settings.model,
                            samplerate=44100, channels=2, frames=int(44100 * seconds),
                            created_at=time.time()))
    return job_id


@pytest.fixture
def context(settings, redis_client, tiny_model_repo, tmp_path) -> WorkerContext:
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
    stem = context.storage.stem_path(job_id, "drums")
    mtime = stem.stat().st_mtime_ns
    run_job(job_id, context)  # a duplicate delivery
    assert context.jobs.get(job_id).finished_at == first.finished_at
    assert stem.stat().st_mtime_ns == mtime and context.models.loads == 1


def test_a_job_interrupted_mid_run_is_redone_from_its_input(context, tmp_path):
    job_id = queued_job(context, tmp_path, stems="vocals")
    context.jobs.mark_running(job_id)  # a worker took it, then died
    leftover = context.storage.temporary_stem_path(job_id, "vocals")
    leftover.write_bytes(b"half a file")
    run_job(job_id, context)
    assert context.jobs.get(job_id).status is JobStatus.SUCCEEDED
    assert not leftover.exists()
    assert sorted(p.name for p in context.storage.stems_dir(job_id).iterdir()) == ["no_vocals.wav", "vocals.wav"]


def test_progress_reports_are_rate_limited_and_recorded(context, tmp_path):
    job_id = queued_job(context, tmp_path)
    reporter = ProgressReporter(context.jobs, job_id, interval=3600)
    reporter(0.25)
    reporter(0.5)  # within the interval: not written
    assert context.jobs.get(job_id).progress == 0.25
