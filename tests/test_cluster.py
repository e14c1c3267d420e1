"""Machines that share nothing but Redis and an S3 bucket: the API and two `demix worker`s,
each with its own empty data folder, one real S3 server (SeaweedFS on 127.0.0.1).

A long job split in four parts runs on both workers; one worker is killed with SIGKILL
mid-part; the job still succeeds, its stems (streamed from the bucket, whole, by range,
or through a presigned link) equal a local unsplit run's, and after DELETE the bucket
holds nothing of it."""
from __future__ import annotations

import dataclasses
import io
import os
import signal
import typing as tp
from pathlib import Path

import numpy as np
import requests
import soundfile as sf

from demix import redis_keys as keys
from demix.config import Settings
from demix.jobs.records import JobStore
from demix.audio.output_formats import OutputOptions
from demix.jobs.split_records import SplitStore
from demix.services import make_storage
from tests.support import waiting
from testkit.synthetic_audio import write_wav
from tests.support.environment import S3_CREDENTIALS
from tests.support.live import LiveServer
from testkit.memory_sink import MemorySink
from tests.support.workers import worker_processes

QUEUE = "demix-tests-cluster"
SPLIT_S = 6  # with the tiny model's 10 s segment, 25 s of audio is four parts of one window
LEASE_S = 3
TOLERANCE = 1e-5


def s3_workers(settings: Settings, root: Path, count: int) -> tp.ContextManager[list[tp.Any]]:
    """`count` `demix worker` processes on `QUEUE`, each with its own data folder."""
    return worker_processes(root, count, dict(
        S3_CREDENTIALS, DEMIX_QUEUE=QUEUE, DEMIX_LEASE_S=str(LEASE_S), DEMIX_SPLIT_S=str(SPLIT_S),
        DEMIX_TORCH_THREADS="1", DEMIX_STORAGE=settings.storage, DEMIX_S3_ENDPOINT_URL=settings.s3_endpoint_url),
        own_data_dirs=True)


def holder_group(holder: tp.Optional[bytes | str]) -> tp.Optional[int]:
    """The process group of the process named by a unit lease's holder (`... process <pid>`)."""
    if not holder:
        return None
    text = holder.decode() if isinstance(holder, bytes) else holder
    try:
        return os.getpgid(int(text.rsplit(" ", 1)[-1]))
    except (ValueError, ProcessLookupError):
        return None


def read_wav(data: bytes) -> np.ndarray:
    samples, _ = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return samples


def test_a_split_job_survives_a_killed_worker_across_machines_sharing_only_redis_and_a_bucket(
        s3_settings, redis_client, tmp_path, tiny_model_repo):
    settings = dataclasses.replace(s3_settings, queue=QUEUE, data_dir=tmp_path / "api")
    redis_client.delete(*keys.queue_keys(QUEUE))
    storage, splits, store = make_storage(settings), SplitStore(redis_client), JobStore(redis_client)
    source = write_wav(tmp_path / "song.wav", 44100, 2, 25.0, subtype="FLOAT")
    from demix.api import create_app

    with LiveServer(create_app({"SETTINGS": settings})) as api, \
            LiveServer(create_app({"SETTINGS": dataclasses.replace(settings, s3_presign=1)})) as presigning, \
            s3_workers(settings, tmp_path, 2) as workers:
        with open(source, "rb") as file:
            answer = requests.post(f"{api.url}/v1/jobs", files={"file": ("song.wav", file, "audio/wav")},
                                   timeout=60)
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        groups = {process.pid: process for process in workers}
        seen: dict[str, set[int]] = {}

        def a_part_running_on_each_worker() -> tp.Optional[int]:
            record = splits.get(job_id) or {}
            running = {}
            for index in range(int(record.get("parts", 0))):
                group = holder_group(splits.unit_lease_holder(job_id, f"part:{index}"))
                if group in groups:
                    seen.setdefault(f"part:{index}", set()).add(group)
                    if record.get(f"part:{index}") == "running":
                        running[group] = index
            return next(iter(running)) if len(running) == 2 else None

        victim = waiting.wait_for(a_part_running_on_each_worker, "a part running on each worker",
                                  timeout=600, log=tmp_path)
        os.killpg(victim, signal.SIGKILL)
        groups[victim].wait()
        job = waiting.wait_for(lambda: (j := store.get(job_id)).status.is_finished and j,
                               "the job finished on the surviving worker", timeout=600, log=tmp_path)
        assert job.status.value == "succeeded", job.error
        assert len({group for groups_of_part in seen.values() for group in groups_of_part}) == 2

        # The stems, as a local unsplit run makes them from the same input.
        reference = _unsplit_stems(settings, source, OutputOptions.from_dict(job.output), job.stems)
        for name in job.outputs:
            url = f"{api.url}/v1/jobs/{job_id}/stems/{name}.wav"
            whole = requests.get(url, timeout=60)
            assert whole.status_code == 200 and whole.headers["Accept-Ranges"] == "bytes"
            assert np.abs(read_wav(whole.content) - reference.stem(name)).max() < TOLERANCE, name
            ranged = requests.get(url, headers={"Range": "bytes=100-1099"}, timeout=60)
            assert ranged.status_code == 206 and ranged.content == whole.content[100:1100]
            assert ranged.headers["Content-Range"] == f"bytes 100-1099/{len(whole.content)}"
            link = requests.get(f"{presigning.url}/v1/jobs/{job_id}/stems/{name}.wav", timeout=60,
                                allow_redirects=False)
            assert link.status_code == 302 and link.headers["Location"].startswith(settings.s3_endpoint_url)
            assert requests.get(link.headers["Location"], timeout=60).content == whole.content
        zipped = requests.get(f"{api.url}/v1/jobs/{job_id}/stems.zip", timeout=60)
        assert zipped.status_code == 200 and len(zipped.content) > sum(
            storage.stem(job_id, name, "wav", job.attempts).size() for name in job.outputs)

        # The API and the workers kept nothing of the job in their own folders.
        for folder in [settings.data_dir] + [tmp_path / f"worker-{index}" for index in range(2)]:
            assert not (folder / "jobs").exists()
        survivor = next(index for index, process in enumerate(workers) if process.pid != victim)
        assert not any((tmp_path / f"worker-{survivor}" / "scratch").glob("*/*"))

        assert requests.delete(f"{api.url}/v1/jobs/{job_id}", timeout=60).status_code == 204
        waiting.wait_for(lambda: not list(storage.list_keys(f"jobs/{job_id}/")), "the job's objects deleted",
                         timeout=60)
        listed = storage.client.list_multipart_uploads(Bucket=storage.bucket, Prefix=storage.prefix)
        assert not listed.get("Uploads")


def _unsplit_stems(settings: Settings, source: Path, output: OutputOptions, stems: str) -> MemorySink:
    from demix.separation.engine import SeparationOptions, separate_file
    from demix.separation.models import ModelCache, ModelSpec

    model = ModelCache().get(ModelSpec(settings.model, settings.model_repo, "cpu", cache=str(settings.models_dir)))
    sink = MemorySink()
    separate_file(model, source, stems, sink, SeparationOptions(), output=output)
    return sink
