"""Split jobs through real `demix worker` processes (Celery prefork) on the test Redis:
the chord of parts and merge, progress over parts, a part whose worker is killed redone
alone, cancelling every part, and splitting switched off.

The workers run with `DEMIX_SPLIT_S` = 6 s on their own queue; the tiny HT-Demucs has
a 10 s segment (7.5 s stride), so a 25 s job becomes four parts of one window each."""
from __future__ import annotations

import dataclasses
import os
import signal
import time
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from demix import redis_keys as keys
from demix.audio.io import read_info
from demix.celery_app import celery_app
from demix.jobs.records import Job, JobStatus, JobStore, new_job_id
from demix.jobs.lifecycle import cancel_job, enqueue_job
from demix.audio.output_formats import resolve_output
from demix.jobs.split_records import SplitStore
from demix.storage.local import JobStorage
from tests.support import waiting
from testkit.synthetic_audio import write_wav
from testkit.memory_sink import MemorySink
from tests.support.workers import worker_processes

pytestmark = pytest.mark.processes

SPLIT_QUEUE = "demix-tests-split"
SPLIT_S = 6
LEASE_S = 3
TOLERANCE = 1e-5


def split_workers(log_dir: Path, count: int) -> tp.ContextManager[list[tp.Any]]:
    """`count` `demix worker` processes (prefork, one child, one torch thread) on `SPLIT_QUEUE`."""
    return worker_processes(log_dir, count, dict(DEMIX_QUEUE=SPLIT_QUEUE, DEMIX_LEASE_S=str(LEASE_S),
                                                 DEMIX_SPLIT_S=str(SPLIT_S), DEMIX_TORCH_THREADS="1"))


def submit(settings, redis_client, tmp_path: Path, seconds: float, stems: str = "all",
           samplerate: int = 44100, channels: int = 2) -> str:
    job_id = new_job_id()
    upload = write_wav(tmp_path / f"{job_id}.wav", samplerate, channels, seconds, subtype="FLOAT")
    info = read_info(upload)
    output = resolve_output({"sample_format": "float32"}, info)
    JobStorage(settings.data_dir).accept_upload(upload, job_id)
    JobStore(redis_client).create(Job(id=job_id, status=JobStatus.QUEUED, stems=stems, model=settings.model,
                                      samplerate=samplerate, channels=channels, frames=info.frames,
                                      created_at=time.time(), output=output.to_dict()))
    enqueue_job(celery_app, job_id, SPLIT_QUEUE)
    return job_id


def wait_for(condition: tp.Callable[[], tp.Any], what: str, **kwargs: tp.Any) -> tp.Any:
    """`tests.waiting.wait_for`, with time for split jobs on a slow machine."""
    return waiting.wait_for(condition, what, **{"timeout": 600.0, **kwargs})


def unsplit_stems(settings, job_id: str) -> MemorySink:
    """The job's stems as one worker computes them without splitting."""
    from demix.separation.engine import SeparationOptions, separate_file
    from demix.separation.models import ModelCache, ModelSpec
    from demix.audio.output_formats import OutputOptions

    storage = JobStorage(settings.data_dir)
    model = ModelCache().get(ModelSpec(settings.model, settings.model_repo, "cpu", cache=str(settings.models_dir)))
    client = _client(settings)
    record = JobStore(client).get(job_id)
    client.close()
    sink = MemorySink()
    separate_file(model, storage.input_path(job_id), record.stems, sink, SeparationOptions(),
                  output=OutputOptions.from_dict(record.output))
    return sink


def _client(settings):
    import redis
    return redis.Redis.from_url(settings.effective_redis_url)


@pytest.fixture
def store(redis_client) -> JobStore:
    return JobStore(redis_client)


@pytest.fixture(autouse=True)
def _empty_queue(redis_client, tiny_model_repo):
    redis_client.delete(*keys.queue_keys(SPLIT_QUEUE))


@pytest.mark.parametrize("seconds, stems, samplerate, channels, parts", [
    (25.0, "all", 44100, 2, 4), (17.37, "vocals", 48000, 1, 3)],
    ids=["all-stems-4-parts", "one-stem-48k-mono-odd-length-3-parts"])
def test_a_long_job_runs_as_parts_on_two_workers_and_equals_the_unsplit_stems(
        settings, redis_client, store, tmp_path, seconds, stems, samplerate, channels, parts):
    storage, splits = JobStorage(settings.data_dir), SplitStore(redis_client)
    with split_workers(tmp_path, 2):
        job_id = submit(settings, redis_client, tmp_path, seconds, stems, samplerate, channels)
        progress, seen_parts, holders = [], set(), set()

        def finished() -> tp.Optional[Job]:
            job = store.get(job_id)
            progress.append(job.progress)
            record = splits.get(job_id)
            if record:
                seen_parts.add(int(record["parts"]))
                for index in range(int(record["parts"])):
                    holder = splits.unit_lease_holder(job_id, f"part:{index}")
                    if holder:
                        holders.add(holder.split(" process ")[-1])
            return job if job.status.is_finished else None

        job = wait_for(finished, "the split job finished", log=tmp_path)
        # The merge removes the parts' files and record just after recording the success
        # (waited for while the workers still run: stopping them could come in between).
        wait_for(lambda: not storage.split_dir(job_id, job.attempts).exists() and not splits.get(job_id),
                 "the split folder and record removed", timeout=60)
    assert job.status is JobStatus.SUCCEEDED, job.error
    assert seen_parts == {parts}
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert len(set(progress)) > parts  # it moved part by part, not in one jump
    assert len(holders) == 2, "both workers ran parts"
    reference = unsplit_stems(settings, job_id)
    assert job.outputs == list(reference.formats)
    for name in job.outputs:
        stem, rate = sf.read(str(storage.stem_path(job_id, name, "wav", job.attempts)), dtype="float32",
                             always_2d=True)
        assert rate == samplerate and stem.shape == (read_info(storage.input_path(job_id)).frames, channels)
        assert np.abs(stem - reference.stem(name)).max() < TOLERANCE, name


def test_a_part_whose_worker_is_killed_is_redone_alone_and_the_job_succeeds(
        settings, redis_client, store, tmp_path):
    storage, splits = JobStorage(settings.data_dir), SplitStore(redis_client)
    tries: dict[str, int] = {}

    def watch() -> dict[str, str]:
        record = splits.get(job_id)
        for field, value in record.items():
            if field.startswith("tries:"):
                tries[field[len("tries:"):]] = max(tries.get(field[len("tries:"):], 0), int(value))
        return record

    with split_workers(tmp_path, 1) as (first,):
        job_id = submit(settings, redis_client, tmp_path, 25.0)
        # Killed while running a later part, after finishing the first one.
        record = wait_for(lambda: (r := watch()) and r.get("part:0") == "done"
                          and any(r.get(f"part:{i}") == "running" and int(r.get(f"windows:{i}", 0)) == 0
                                  for i in range(1, 4)) and r, "part 0 done, another running", log=tmp_path)
        os.killpg(first.pid, signal.SIGKILL)
    lost = next(f"part:{i}" for i in range(1, 4) if record[f"part:{i}"] == "running")
    done_before = [unit for unit in (f"part:{i}" for i in range(4)) if record[unit] == "done"]
    with split_workers(tmp_path, 1):
        job = wait_for(lambda: watch() is not None and (j := store.get(job_id)).status.is_finished and j,
                       "the job finished on the second worker", log=tmp_path)
    assert job.status is JobStatus.SUCCEEDED, job.error
    assert job.attempts == 1  # the job itself was not restarted
    assert tries[lost] == 2
    assert all(tries[unit] == 1 for unit in done_before)
    reference = unsplit_stems(settings, job_id)
    for name in job.outputs:
        stem, _ = sf.read(str(storage.stem_path(job_id, name, "wav", 1)), dtype="float32", always_2d=True)
        assert np.abs(stem - reference.stem(name)).max() < TOLERANCE, name


def test_cancelling_a_split_job_stops_every_part_and_removes_their_files(settings, redis_client, store,
                                                                          tmp_path):
    storage, splits = JobStorage(settings.data_dir), SplitStore(redis_client)
    with split_workers(tmp_path, 2):
        job_id = submit(settings, redis_client, tmp_path, 45.0)
        wait_for(lambda: sum(v == "running" for k, v in splits.get(job_id).items() if k.startswith("part:")) == 2,
                 "two parts running", log=tmp_path)
        cancel_job(store, storage, job_id)
        wait_for(lambda: not splits.get(job_id) and not redis_client.keys(keys.unit_lease_key(job_id, "*")),
                 "every part stopped", timeout=120, log=tmp_path)
        time.sleep(2 * LEASE_S)  # parts still queued are skipped, nothing comes back
        assert not storage.job_dir(job_id).exists()
        assert not splits.get(job_id)
    job = store.get(job_id)
    assert job.status is JobStatus.CANCELLED and job.outputs == []


def test_splitting_applies_to_long_single_pass_jobs_unless_switched_off(settings, tmp_path):
    from demucs.apply import BagOfModels

    from testkit.tiny_models import make_tiny_htdemucs
    from demix.separation.engine import stem_layout
    from demix.worker.split import should_split

    model = BagOfModels([make_tiny_htdemucs()])
    path = write_wav(tmp_path / "in.wav", 8000, 2, 3.0)
    layout = stem_layout(model, path, "vocals")
    job = Job(id=new_job_id(), status=JobStatus.RUNNING, stems="vocals", model="tiny", samplerate=8000,
              channels=2, frames=24000, created_at=0.0)
    assert should_split(job, dataclasses.replace(settings, split_s=2), model, layout)
    assert not should_split(job, dataclasses.replace(settings, split_s=0), model, layout)
    assert not should_split(job, dataclasses.replace(settings, split_s=3), model, layout)
    assert not should_split(job, dataclasses.replace(settings, split_s=2, shifts=1), model, layout)
    eight = write_wav(tmp_path / "eight.wav", 8000, 8, 3.0)
    assert not should_split(job, dataclasses.replace(settings, split_s=2), model, stem_layout(model, eight, "vocals"))


def test_roformer_jobs_run_whole(settings, tmp_path):
    from tests.roformer_fixtures import reference_model
    from demix.separation.engine import stem_layout
    from demix.worker.split import should_split

    model = reference_model("bs_roformer")
    path = write_wav(tmp_path / "in.wav", 8000, 2, 3.0)
    job = Job(id=new_job_id(), status=JobStatus.RUNNING, stems="vocals", model="tiny", samplerate=8000,
              channels=2, frames=24000, created_at=0.0)
    assert not should_split(job, dataclasses.replace(settings, split_s=2), model, stem_layout(model, path, "vocals"))
