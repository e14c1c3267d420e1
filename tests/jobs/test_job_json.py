"""The job JSON (`demix.jobs.job_json`), the one body both `GET /v1/jobs/<id>` and webhooks
carry: links only for a succeeded job, in the format its stems were written in, and a
`waiting_for` only when it is known that no worker serves a queued job's model."""
from __future__ import annotations

import dataclasses

import pytest

from demix.jobs.job_json import job_json, waiting_for
from demix.jobs.records import Job, JobStatus

URL = "http://demix.example/v1/jobs/abc"
CREATED = 1_700_000_000.0


def job(status: JobStatus, **fields) -> Job:
    return Job(id="abc", status=status, stems="vocals", model="htdemucs", samplerate=44100, channels=2,
               frames=441000, created_at=CREATED, queue="demix.htdemucs", **fields)


def test_a_succeeded_job_links_each_stem_in_its_output_format_under_its_own_url():
    done = job(JobStatus.SUCCEEDED, started_at=CREATED + 1, finished_at=CREATED + 11,
               outputs=["vocals", "no_vocals"], output={"format": "flac", "sample_format": "pcm24"})
    body = job_json(done, URL, retention_s=3600, queue_position=None, now=CREATED + 20)
    assert body["outputs"] == {"vocals": f"{URL}/stems/vocals.flac", "no_vocals": f"{URL}/stems/no_vocals.flac"}
    assert (body["result_url"], body["zip_url"], body["url"]) == (f"{URL}/result", f"{URL}/stems.zip", URL)
    assert body["expires_at"] == "2023-11-14T23:13:31.000+00:00"  # finished + 1 h
    assert body["eta_s"] is None and body["waiting_for"] is None
    assert body["id"] == "abc" and body["status"] == "succeeded"  # the record's own fields too


def test_a_job_recorded_before_output_options_existed_links_wav_stems():
    body = job_json(job(JobStatus.SUCCEEDED, finished_at=CREATED, outputs=["drums"]), URL,
                    retention_s=0, queue_position=None, now=CREATED)
    assert body["outputs"] == {"drums": f"{URL}/stems/drums.wav"}
    assert body["expires_at"] is None  # kept forever


@pytest.mark.parametrize("status", [JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELLED])
def test_a_job_without_stems_has_no_links(status):
    body = job_json(job(status, outputs=["vocals"]), URL, retention_s=60, queue_position=None, now=CREATED)
    assert body["outputs"] is None
    assert "result_url" not in body and "zip_url" not in body


def test_a_running_job_has_an_eta_from_its_progress_and_a_queued_one_its_position():
    running = job(JobStatus.RUNNING, started_at=CREATED, progress=0.25)
    assert job_json(running, URL, retention_s=60, queue_position=None, now=CREATED + 10)["eta_s"] == 30.0
    queued = job_json(job(JobStatus.QUEUED), URL, retention_s=60, queue_position=4, now=CREATED)
    assert (queued["queue_position"], queued["eta_s"], queued["expires_at"]) == (4, None, None)


def test_only_a_queued_job_whose_model_no_worker_serves_says_what_it_waits_for():
    queued = job(JobStatus.QUEUED)
    said = waiting_for(queued, model_served=False)
    assert "'htdemucs'" in said and "'demix.htdemucs'" in said and "demix worker --models htdemucs" in said
    assert job_json(queued, URL, retention_s=60, queue_position=1, now=CREATED, model_served=False)["waiting_for"] == said
    assert waiting_for(queued, model_served=True) is None
    assert waiting_for(queued, model_served=None) is None  # not asked: not claimed
    assert waiting_for(dataclasses.replace(queued, status=JobStatus.RUNNING), model_served=False) is None
