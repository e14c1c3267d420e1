"""A workflow job's runs as child jobs, against a real Redis and folder: which units are sent
when, exactly once; failures, cancel and delete reaching every run; the steps' view.

Celery is a recorder here (what was sent, to which queue); the workers running these
units for real are in tests/workflows/test_workflow_jobs.py.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import typing as tp
from pathlib import Path

import numpy as np
import pytest

from demix import redis_keys as keys
from demix.audio.io import AudioWriter, read_info
from demix.config import Settings
from demix.errors import SeparationFailed
from demix.intake.inspection import inspect_upload
from demix.jobs.lifecycle import cancel_job, delete_job
from demix.jobs.records import JobStatus, JobStore
from demix.audio.output_formats import default_output
from demix.storage.local import JobStorage
from demix.workflows.runs import (MODEL, OUTPUTS, STEP, advance, child_job, in_flight, new_workflow_job,
                                  on_child_finished, start_workflow, unit_id, units, workflow_view)
from demix.workflows.spec import parse_workflow
from testkit.synthetic_audio import write_wav
from tests.support.workflows import QueueRecorder

SOURCES4 = ["drums", "bass", "other", "vocals"]


@dataclasses.dataclass
class Context:
    settings: Settings
    jobs: JobStore
    storage: JobStorage
    celery: QueueRecorder


@pytest.fixture
def context(redis_client, tmp_path) -> Context:
    settings = Settings(models="tiny,tiny_vocals,tiny_vocals2", queue="wf", data_dir=tmp_path / "data")
    context = Context(settings, JobStore(redis_client), JobStorage(tmp_path / "data"), QueueRecorder())
    context.jobs.on_finished.append(lambda job: on_child_finished(job, context))
    return context


REPORTED = {"tiny": {"sources": SOURCES4}, "tiny_vocals": {"sources": ["vocals"]},
            "tiny_vocals2": {"sources": ["vocals"]}}

CHAIN = {"steps": [{"name": "voc", "models": ["tiny_vocals", "tiny_vocals2"], "ensemble": "median_wave"},
                   {"name": "band", "input": "voc/no_vocals", "models": ["tiny"]}],
         "outputs": {"vocals": "voc/vocals", "drums": "band/drums", "rest": "band/no_drums"}}


def submit(context: Context, tmp_path: Path, workflow: dict = CHAIN):
    upload = tmp_path / "upload.wav"
    write_wav(upload, 44100, 2, 1.0)
    info = inspect_upload(upload, context.settings)
    job = new_workflow_job(parse_workflow(workflow, context.settings, REPORTED), info, default_output(info))
    context.storage.accept_upload(upload, job.id)
    context.jobs.create(job)
    start_workflow(job, context)
    return job


def sent_units(context: Context, parent_id: str) -> list[str]:
    return [context.jobs.get(job_id).workflow_unit["unit"] for job_id, _queue in context.celery.sent
            if context.jobs.get(job_id).workflow_unit["parent"] == parent_id]


def run(context: Context, job_id: str, stems: tp.Sequence[str] = ()) -> None:
    """What a worker does with a unit, without the model: claim it, write its stems, succeed."""
    job = context.jobs.mark_running(job_id, 60)
    for name in stems:
        pending = context.storage.pending_stem(job_id, name, "wav", job.attempts)
        with AudioWriter(pending.temporary, job.samplerate, job.channels, "FLOAT", job.frames) as writer:
            writer.write(np.zeros((job.frames, job.channels), np.float32))
        pending.commit()
    context.jobs.mark_succeeded(job_id, list(stems), job.attempts)


def test_a_new_workflow_sends_its_first_runs_each_to_its_models_queue(context, tmp_path):
    parent = submit(context, tmp_path)
    voc_a, voc_b = unit_id(parent.id, "voc/tiny_vocals"), unit_id(parent.id, "voc/tiny_vocals2")
    assert context.celery.sent == [(voc_a, "wf.tiny_vocals"), (voc_b, "wf.tiny_vocals2")]
    assert parent.id in in_flight(context.jobs)
    run_job = context.jobs.get(voc_a)
    assert (run_job.status, run_job.model, run_job.stems, run_job.queue) == (JobStatus.QUEUED, "tiny_vocals", "all",
                                                                             "wf.tiny_vocals")
    assert (run_job.output["format"], run_job.output["sample_format"]) == ("wav", "float32")
    assert run_job.workflow_unit == {"parent": parent.id, "unit": "voc/tiny_vocals", "kind": MODEL,
                                     "input": {"job": parent.id, "stem": None}}
    # Its input is the job's, as its own file (a hard link: no copy of the samples).
    assert os.path.samefile(context.storage.input_path(voc_a), context.storage.input_path(parent.id))
    # Not a job of the index (listing, retention): it lives and dies with its workflow.
    assert context.jobs.redis.zscore(keys.jobs_index_key(), voc_a) is None
    assert context.jobs.children(parent.id) == sorted([voc_a, voc_b])


def test_moving_on_again_or_at_once_sends_nothing_twice(context, tmp_path):
    parent = submit(context, tmp_path)
    threads = [threading.Thread(target=advance, args=(parent.id, context)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(context.celery.sent) == 2


def test_each_unit_is_sent_when_what_it_reads_exists_and_the_outputs_unit_comes_last(context, tmp_path):
    parent = submit(context, tmp_path)
    run(context, unit_id(parent.id, "voc/tiny_vocals"), ["vocals", "no_vocals"])
    assert sent_units(context, parent.id) == ["voc/tiny_vocals", "voc/tiny_vocals2"]  # the ensemble waits
    run(context, unit_id(parent.id, "voc/tiny_vocals2"), ["vocals", "no_vocals"])
    assert sent_units(context, parent.id)[2:] == ["voc"]
    step = context.jobs.get(unit_id(parent.id, "voc"))
    assert step.workflow_unit["kind"] == STEP and step.workflow_unit["ensemble"] == "median_wave"
    assert step.workflow_unit["stems"] == ["vocals", "no_vocals"]
    run(context, step.id, ["vocals", "no_vocals"])
    band = unit_id(parent.id, "band/tiny")
    assert sent_units(context, parent.id)[3:] == ["band/tiny", ] and context.celery.sent[3] == (band, "wf")
    # The chained run's input is the step's stem, at the step's attempt.
    assert os.path.samefile(context.storage.input_path(band), context.storage.stem_path(step.id, "no_vocals", "wav", 1))
    run(context, band, SOURCES4)
    # `band/no_drums` is a complement its one model does not write: the step has a unit of its own.
    assert sent_units(context, parent.id)[4:] == ["band"]
    run(context, unit_id(parent.id, "band"), ["drums", "no_drums"])
    assert sent_units(context, parent.id)[5:] == ["outputs"]
    outputs = context.jobs.get(unit_id(parent.id, "outputs")).workflow_unit
    assert outputs["kind"] == OUTPUTS and outputs["outputs"] == {
        "vocals": {"job": step.id, "stem": "vocals"}, "drums": {"job": unit_id(parent.id, "band"), "stem": "drums"},
        "rest": {"job": unit_id(parent.id, "band"), "stem": "no_drums"}}


def test_a_single_models_step_passes_its_runs_stems_on_directly(context, tmp_path):
    parent = submit(context, tmp_path, {"steps": [{"name": "v", "models": ["tiny_vocals"]},
                                                  {"name": "b", "input": "v/no_vocals", "models": ["tiny"]}]})
    run(context, unit_id(parent.id, "v/tiny_vocals"), ["vocals", "no_vocals"])
    assert sent_units(context, parent.id) == ["v/tiny_vocals", "b/tiny"]
    run(context, unit_id(parent.id, "b/tiny"), SOURCES4)
    assert sent_units(context, parent.id)[2:] == ["outputs"]


def test_a_failed_run_fails_the_job_saying_which_and_why_and_stops_the_others(context, tmp_path):
    parent = submit(context, tmp_path)
    failing, other = unit_id(parent.id, "voc/tiny_vocals"), unit_id(parent.id, "voc/tiny_vocals2")
    attempt = context.jobs.mark_running(failing, 60).attempts
    context.jobs.mark_failed(failing, SeparationFailed("out of memory", code="out_of_memory"), attempt)
    job = context.jobs.get(parent.id)
    assert job.status is JobStatus.FAILED and job.error == {
        "code": "out_of_memory", "message": "step 'voc', model 'tiny_vocals', failed: out of memory"}
    assert context.jobs.get(other).status is JobStatus.CANCELLED
    assert parent.id not in in_flight(context.jobs)


def test_cancelling_the_job_cancels_its_runs_and_deleting_it_removes_them(context, tmp_path):
    parent = submit(context, tmp_path)
    running = unit_id(parent.id, "voc/tiny_vocals")
    context.jobs.mark_running(running, 60)
    cancel_job(context.jobs, context.storage, parent.id)
    children = [context.jobs.get(child) for child in context.jobs.children(parent.id)]
    assert [child.status for child in children] == [JobStatus.CANCELLED] * 2
    assert not any(context.storage.job_dir(child.id).exists() for child in children)
    assert advance(parent.id, context) == [] and parent.id not in in_flight(context.jobs)
    delete_job(context.jobs, context.storage, parent.id)
    assert not context.jobs.redis.exists(keys.job_key(running), keys.job_children_key(parent.id))


def test_the_steps_view_gives_each_runs_state_and_the_jobs_progress(context, tmp_path):
    parent = submit(context, tmp_path)
    first = unit_id(parent.id, "voc/tiny_vocals")
    attempt = context.jobs.mark_running(first, 60).attempts
    context.jobs.heartbeat(first, attempt, 60, progress=0.5)
    view = workflow_view(context.jobs.get(parent.id), context.jobs)
    voc, band = view["steps"]
    assert (voc["status"], voc["runs"][0]["status"], voc["runs"][0]["progress"], voc["runs"][1]["status"]) == \
        ("running", "running", 0.5, "queued")
    assert (band["status"], band["runs"]) == ("waiting", [{"model": "tiny", "status": "waiting", "progress": 0.0,
                                                           "cached": False, "attempts": 0}])
    # Model runs weigh 1, a step's own unit and the outputs 0.1: 0.5 of 3 runs + 2 units + outputs.
    assert view["progress"] == pytest.approx(0.5 / 3.3, abs=1e-4)
    assert view["outputs"] == CHAIN["outputs"]


def test_a_workflow_with_cache_false_gives_it_to_its_runs(context, tmp_path):
    upload = write_wav(tmp_path / "upload.wav", 44100, 2, 1.0)
    info = inspect_upload(upload, context.settings)
    job = new_workflow_job(parse_workflow(CHAIN, context.settings, REPORTED), info, default_output(info),
                           cache=False)
    context.storage.accept_upload(upload, job.id)
    context.jobs.create(job)
    start_workflow(job, context)
    runs = [context.jobs.get(child) for child in context.jobs.children(job.id)]
    assert runs and not job.use_cache and all(not run.use_cache for run in runs)
    assert all(context.jobs.get(child).use_cache for child in context.jobs.children(submit(context, tmp_path).id))


def test_runs_are_not_counted_as_jobs_in_the_metrics(context, tmp_path):
    counters = keys.metrics_counters_key()
    before = {name.decode(): int(value) for name, value in context.jobs.redis.hgetall(counters).items()}
    parent = submit(context, tmp_path)
    run(context, unit_id(parent.id, "voc/tiny_vocals"), ["vocals", "no_vocals"])
    cancel_job(context.jobs, context.storage, parent.id)
    after = {name.decode(): int(value) for name, value in context.jobs.redis.hgetall(counters).items()}
    changed = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
    assert changed == {"submitted": 1, "cancelled": 1}  # the job; its run's success and cancel are not


def test_no_run_is_made_for_a_job_that_is_no_longer_running(context, tmp_path):
    parent = submit(context, tmp_path)
    first = unit_id(parent.id, "voc/tiny_vocals")
    context.jobs.redis.delete(keys.job_key(first))  # as if it had not been made yet
    context.jobs.mark_cancelled(parent.id)
    unit = next(unit for unit in units(parse_workflow(CHAIN, context.settings, REPORTED), parent, context.settings)
                if unit.name == "voc/tiny_vocals")
    assert not context.jobs.create_child(child_job(parent, unit), parent.id)
    assert not context.jobs.redis.exists(keys.job_key(first))
