"""The local files of machines sharing only Redis and an S3 bucket stay bounded: each
process's scratch folder (`scratch/<host>-<pid>/`) is emptied around every attempt, a
killed worker's is removed by the next worker started on that folder (a live process's
is kept), a job's input is fetched only when it fits above `DEMIX_MIN_FREE_MB` (else the
job fails with `disk_full`), and uploads a killed API left in `incoming/` are swept by the
API itself. Against a real S3 server (SeaweedFS), a real Redis and real `demix worker`s."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import pytest
import requests

from demix.cli.argv import worker_argv
from demix.cli.processes import popen_child, stop_process
from demix import redis_keys as keys
from demix.audio.io import read_info
from demix.config import Settings
from demix.host_processes import this_host
from demix.jobs.records import Job, JobStatus, JobStore, new_job_id
from demix.storage.s3 import ObjectStorage
from demix.audio.output_formats import resolve_output
from demix.jobs.retention import ORPHAN_AGE_S, sweep_dead_scratch
from demix.services import make_storage
from testkit.synthetic_audio import write_wav
from tests.support import waiting
from tests.support.environment import S3_CREDENTIALS, UNCONSUMED_QUEUE
from tests.support.live import LiveServer
from tests.support.small_disk import mounted_tmpfs
from demix.worker.attempt import WorkerContext
from demix.separation.models import ModelCache
from demix.worker.runner import run_job

pytestmark = pytest.mark.processes

QUEUE = "demix-tests-scratch"
LEASE_S = 3


def object_storage(settings: Settings, data_dir: Path) -> ObjectStorage:
    """The settings' bucket, seen from a machine whose data folder is `data_dir`."""
    storage = make_storage(dataclasses.replace(settings, data_dir=data_dir))
    assert isinstance(storage, ObjectStorage)
    return storage


def submit(storage: ObjectStorage, store: JobStore, source: Path, settings: Settings) -> str:
    """Store `source` as a new queued job's input, as the API does (no task sent)."""
    job_id = new_job_id()
    with storage.open_upload() as upload:
        upload.write(source.read_bytes())
    info = read_info(Path(upload.name))
    storage.accept_upload(Path(upload.name), job_id)
    store.create(Job(id=job_id, status=JobStatus.QUEUED, stems="all", model=settings.model,
                     samplerate=info.samplerate, channels=info.channels, frames=info.frames,
                     created_at=time.time(), output=resolve_output({}, info).to_dict(), queue=settings.queue))
    return job_id


@pytest.fixture
def context(s3_settings, redis_client, tiny_model_repo) -> WorkerContext:
    """A worker's context over the bucket (tasks it sends go to a queue nobody consumes)."""
    settings = dataclasses.replace(s3_settings, queue=UNCONSUMED_QUEUE, split_s=0)
    return WorkerContext(settings=settings, jobs=JobStore(redis_client),
                         storage=object_storage(settings, settings.data_dir), models=ModelCache())


def test_an_attempt_empties_its_scratch_before_and_after_it_runs(context, tmp_path):
    storage = context.storage
    job_id = submit(object_storage(context.settings, tmp_path / "api"), context.jobs,
                    write_wav(tmp_path / "song.wav", 44100, 2, 2.0), context.settings)
    left_by_an_earlier_attempt = storage.scratch_file("input.wav")
    left_by_an_earlier_attempt.write_bytes(b"\0" * 4096)
    assert storage.scratch_dir.name == f"{this_host()}-{os.getpid()}"

    run_job(job_id, context)
    assert context.jobs.get(job_id).status is JobStatus.SUCCEEDED
    assert list(storage.scratch_root.iterdir()) == []


def test_a_job_whose_input_does_not_fit_above_min_free_fails_with_disk_full(context, tmp_path):
    # A 4 MiB disk keeping 2 MiB free: the guard alone passes, the 2.4 MiB input does not fit
    # above it (though it would fit on the disk: the guard refuses it, not ENOSPC).
    with mounted_tmpfs(tmp_path / "small-disk", "4m", "no other test (a guard needs a small real disk)") as disk:
        context.settings = dataclasses.replace(context.settings, data_dir=disk, min_free_mb=2)
        context.storage = object_storage(context.settings, disk)
        job_id = submit(object_storage(context.settings, tmp_path / "api"), context.jobs,
                        write_wav(tmp_path / "song.wav", 44100, 2, 7.0, subtype="FLOAT"), context.settings)

        run_job(job_id, context)
        job = context.jobs.get(job_id)
        assert job.status is JobStatus.FAILED and job.outputs == []
        assert job.error["code"] == "disk_full", job.error
        message = job.error["message"]
        assert str(context.storage.scratch_dir) in message and "DEMIX_MIN_FREE_MB" in message, message
        assert "the job's input (2.4 MiB)" in message, message  # its size, which did not fit
        assert list(context.storage.scratch_root.iterdir()) == []


def a_dead_pid() -> int:
    """The pid of a process of this machine that has exited (and been reaped)."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    return int(finished.stdout)


def test_the_sweep_removes_only_the_scratch_of_this_machines_dead_processes(s3_settings, tmp_path):
    storage = object_storage(s3_settings, tmp_path / "worker")
    mine = storage.scratch_file("input.wav")
    mine.write_bytes(b"live")
    dead = a_dead_pid()
    for name in (f"{this_host()}-{dead}", f"another-host-{dead}"):
        (storage.scratch_root / name / "0123").mkdir(parents=True)
        (storage.scratch_root / name / "0123" / "input.wav").write_bytes(b"left")

    assert sweep_dead_scratch(storage) == [f"{this_host()}-{dead}"]
    assert sorted(p.name for p in storage.scratch_root.iterdir()) == sorted(
        [storage.scratch_dir.name, f"another-host-{dead}"])
    assert mine.read_bytes() == b"live"


@contextlib.contextmanager
def s3_worker(settings: Settings, data_dir: Path, log: Path) -> tp.Iterator[subprocess.Popen]:
    """A `demix worker` process on `QUEUE` over the bucket, with its own process group."""
    env = dict(os.environ, **S3_CREDENTIALS, DEMIX_QUEUE=QUEUE, DEMIX_LEASE_S=str(LEASE_S), DEMIX_SPLIT_S="0",
               DEMIX_TORCH_THREADS="1", DEMIX_DATA_DIR=str(data_dir), DEMIX_STORAGE=settings.storage,
               DEMIX_S3_ENDPOINT_URL=settings.s3_endpoint_url)
    with open(log, "ab") as output:
        process = popen_child(worker_argv(Settings.from_env(env), concurrency=1), env=env, stdout=output,
                              stderr=output)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            stop_process(process, timeout=30, sig=signal.SIGKILL)


def lease_pid(store: JobStore, job_id: str) -> tp.Optional[int]:
    """The pid of the process holding the job's lease (`... process <pid>`), if any."""
    holder = store.lease_holder(job_id)
    if not holder:
        return None
    text = holder.decode() if isinstance(holder, bytes) else holder
    return int(text.rsplit(" ", 1)[-1])


def test_a_killed_workers_scratch_is_removed_by_the_next_worker_and_a_live_ones_kept(
        s3_settings, redis_client, tiny_model_repo, tmp_path):
    settings = dataclasses.replace(s3_settings, queue=QUEUE)
    redis_client.delete(*keys.queue_keys(QUEUE))
    store, data_dir = JobStore(redis_client), tmp_path / "worker"
    from demix.celery_app import SEPARATE_TASK, celery_app

    # Long enough (tens of seconds on one thread) to be killed mid-separation.
    job_id = submit(object_storage(settings, tmp_path / "api"), store,
                    write_wav(tmp_path / "song.wav", 44100, 2, 60.0), settings)
    with s3_worker(settings, data_dir, tmp_path / "worker-1.log") as first:
        celery_app.send_task(SEPARATE_TASK, args=[job_id], queue=QUEUE)

        def input_fetched_into_the_runners_scratch() -> tp.Optional[Path]:
            pid = lease_pid(store, job_id)
            folder = data_dir / "scratch" / f"{this_host()}-{pid}"
            return folder if pid and store.get(job_id).status is JobStatus.RUNNING and \
                any(folder.glob("*/input.wav")) else None

        killed_scratch = waiting.wait_for(input_fetched_into_the_runners_scratch, "the job's input in scratch",
                                          timeout=300, log=tmp_path)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert store.get(job_id).status is JobStatus.RUNNING  # killed mid-job, not after it
    assert any(killed_scratch.glob("*/input.wav"))  # nobody removed what it left

    # A live process's scratch on the same folder (this test's own): never taken.
    live = object_storage(settings, data_dir).scratch_file("part-0.sum.f32")
    live.write_bytes(b"in use")
    with s3_worker(settings, data_dir, tmp_path / "worker-2.log"):
        waiting.wait_for(lambda: not killed_scratch.exists(), "the next worker to remove the killed one's scratch",
                         timeout=300, log=tmp_path)
        assert live.read_bytes() == b"in use"
        # The job is recovered (its lease expired) and runs again on this worker; its
        # attempt leaves nothing in scratch.
        job = waiting.wait_for(lambda: (j := store.get(job_id)).status.is_finished and j,
                               "the job to finish on the next worker", timeout=600, log=tmp_path)
        assert job.status is JobStatus.SUCCEEDED and job.attempts == 2, job.error
        waiting.wait_for(lambda: [p.name for p in (data_dir / "scratch").iterdir()] == [live.parent.parent.name],
                         "only the live process's scratch left", timeout=60, log=tmp_path)


def test_the_api_sweeps_uploads_a_killed_api_process_left_in_incoming(s3_settings, redis_client, tmp_path):
    from demix.api import create_app

    settings = dataclasses.replace(s3_settings, queue=UNCONSUMED_QUEUE, data_dir=tmp_path / "api")
    incoming = settings.data_dir / "incoming"
    incoming.mkdir(parents=True)
    orphan, streaming = incoming / "upload-orphan.part", incoming / "upload-streaming.part"
    for path in (orphan, streaming):
        path.write_bytes(b"RIFF")
    an_hour_ago = time.time() - ORPHAN_AGE_S - 60
    os.utime(orphan, (an_hour_ago, an_hour_ago))

    source = write_wav(tmp_path / "song.wav", 44100, 2, 1.0)
    with LiveServer(create_app({"SETTINGS": settings})) as api, open(source, "rb") as file:
        answer = requests.post(f"{api.url}/v1/jobs", files={"file": ("song.wav", file, "audio/wav")}, timeout=60)
    assert answer.status_code == 202, answer.text
    assert sorted(p.name for p in incoming.iterdir()) == ["upload-streaming.part"]  # a young one may be live
