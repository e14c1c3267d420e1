"""A real `demix up` for the benches: started in a scratch folder, timed through its HTTP API.

Not a bench itself (the leading underscore keeps `tests/test_bench.py` from running it
as one); `compare_demucs.py`, `service_overhead.py` and `soak.py` use it. Below,
the same for benches that time the workers alone, without the API: `scale.py` and `storage.py`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demix.cli.client import Client  # noqa: E402
from demix.cli.redis_server import free_port  # noqa: E402

READY_LINE = "demix is ready"


@dataclasses.dataclass
class LiveService:
    url: str
    ready_s: float
    """From starting `demix up` to its ready line: Redis, the API, and a worker that has
    loaded and warmed the model."""
    pid: int = 0
    """`demix up`'s process (its parts are its children)."""
    output: tp.Optional[Path] = None
    """Everything `demix up` prints (its events and its parts' logs), written as it comes."""

    def output_text(self) -> str:
        return self.output.read_text(errors="replace") if self.output else ""

    @property
    def redis_url(self) -> tp.Optional[str]:
        """The URL of the private Redis `demix up` started (None with DEMIX_REDIS_URL set)."""
        found = re.search(r"started private Redis \(.*\) on port (\d+)", self.output_text())
        return f"redis://127.0.0.1:{found.group(1)}/0" if found else None


@contextlib.contextmanager
def running_service(scratch: Path, settings: dict[str, str],
                    ready_timeout_s: float = 600.0) -> tp.Iterator[LiveService]:
    """`demix up` with `settings` (DEMIX_* variables) over a clean environment, its data
    under `scratch`; stopped (SIGINT, as Ctrl-C) on leaving. Its output is drained into
    `scratch/demix-up-<port>.out` all along (a full pipe would stall the service)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMIX_")}
    env.update({"DEMIX_PORT": str(port), "DEMIX_DATA_DIR": str(scratch / "data"),
                # Only the service's own path is measured: no Flower, no gRPC (nor their ports).
                "DEMIX_FLOWER_PORT": "0", "DEMIX_GRPC_PORT": "0", **settings})
    started = time.perf_counter()
    scratch.mkdir(parents=True, exist_ok=True)
    log, output = scratch / f"demix-up-{port}.log", scratch / f"demix-up-{port}.out"
    ready = threading.Event()
    with open(log, "w") as log_file:
        up = subprocess.Popen([str(Path(sys.executable).parent / "demix"), "up"], env=env,
                              stdout=subprocess.PIPE, stderr=log_file, text=True)

    def drain() -> None:
        assert up.stdout is not None
        with open(output, "w") as out:
            for line in up.stdout:
                out.write(line)
                out.flush()
                if READY_LINE in line:
                    ready.set()

    drainer = threading.Thread(target=drain, name="demix-up-output", daemon=True)
    drainer.start()
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not ready.wait(0.2):
            if up.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"demix up did not get ready: {log.read_text()[-2000:]}"
                                   f"{output.read_text(errors='replace')[-2000:]}")
        yield LiveService(f"http://127.0.0.1:{port}", time.perf_counter() - started, up.pid, output)
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(120)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        drainer.join(10)


def time_job(url: str, path: Path, stems: str, out: Path, **output_options: tp.Any) -> float:
    """Seconds from uploading `path` to having every stem downloaded into `out`, the way a
    client of the service does it (`demix.cli.client`: submit, poll, download)."""
    started = time.perf_counter()
    with Client(url) as client:
        job = client.submit(path, stems, **output_options)
        done = client.wait(job["id"], poll_interval_s=0.1)
        client.download(job["id"], out, job=done)
    return time.perf_counter() - started


# -- workers without the API -------------------------------------------------------------------
# `scale.py` and `storage.py` time the workers alone: jobs go straight into Redis and the
# queue (no upload over HTTP), so only the separation and its storage are measured.

def add_track_and_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--seconds (the generated track's length), --model and --model-repo."""
    parser.add_argument("--seconds", type=float, default=600.0, help="length of the generated track")
    parser.add_argument("--model", default="tiny", help="tiny (the tests' HT-Demucs) or a demucs model name")
    parser.add_argument("--model-repo", type=Path, help="demucs-format folder holding --model")


def model_repo(parser: argparse.ArgumentParser, args: argparse.Namespace, scratch: Path) -> Path:
    """The folder holding `--model`: the tiny model written under `scratch`, or `--model-repo`."""
    from testkit.tiny_models import write_tiny_repo

    if args.model == "tiny":
        return write_tiny_repo(scratch / "models")
    if args.model_repo is None:
        parser.error("--model-repo is needed for a model other than tiny")
    return args.model_repo


def worker_environment(redis_url: str, data_dir: Path, model: str, model_repo: Path,
                       **settings: str) -> dict[str, str]:
    """The DEMIX_* settings of a bench's workers over a clean environment: `model` from
    `model_repo` on the CPU, one torch thread each, then `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMIX_")}
    env.update({"DEMIX_REDIS_URL": redis_url, "DEMIX_DATA_DIR": str(data_dir), "DEMIX_MODEL": model,
                "DEMIX_MODEL_REPO": str(model_repo), "DEMIX_DEVICE": "cpu", "DEMIX_TORCH_THREADS": "1",
                **settings})
    return env


@dataclasses.dataclass
class TimedJob:
    seconds: float
    """From enqueueing the job to its `succeeded`."""
    storage: tp.Any
    """The storage its stems are in (`demix.storage.local.Storage`)."""
    job_id: str
    attempt: int
    stems: list[str]
    """Its stems' names (the job record's outputs)."""


COMPARE_BLOCK_FRAMES = 1 << 18


def max_stem_difference(a: TimedJob, b: TimedJob) -> float:
    """Largest |delta| between two jobs' float stems, read block by block from their storages."""
    import numpy as np
    import soundfile as sf

    worst = 0.0
    for name in a.stems:
        with contextlib.ExitStack() as opened:
            files = [opened.enter_context(sf.SoundFile(opened.enter_context(job.storage.stem(job.job_id, name, "wav",
                                                                                             job.attempt).open())))
                     for job in (a, b)]
            while len(block := files[0].read(COMPARE_BLOCK_FRAMES, dtype="float32")):
                worst = max(worst, float(np.abs(block - files[1].read(len(block), dtype="float32")).max()))
    return worst


def time_job_on_workers(scratch: Path, env: dict[str, str], workers: int, wav: Path, label: str) -> TimedJob:
    """Start `workers` `demix worker` processes (one prefork child each) with `env`, warm
    each with a 1 s job, then time one job of `wav` (all stems, float32 WAV); the workers
    are stopped on return.

    On local disk every process shares `env`'s DEMIX_DATA_DIR; over S3 (DEMIX_STORAGE set)
    each, the submitter too, has its own empty one under `scratch`, as on separate machines.
    """
    import redis
    from celery import Celery

    from demix.cli.argv import worker_argv
    from demix.cli.processes import popen_child, stop_process
    from demix.audio.io import read_info
    from demix.config import Settings
    from demix.jobs.records import Job, JobStatus, JobStore, new_job_id
    from demix.jobs.lifecycle import enqueue_job
    from demix.audio.output_formats import resolve_output
    from demix.services import make_storage
    from testkit.synthetic_audio import write_wav

    shared_nothing = bool(env.get("DEMIX_STORAGE"))
    if shared_nothing:
        env = dict(env, DEMIX_DATA_DIR=str(scratch / f"{label}-submitter"))
    settings = Settings.from_env(env)
    client = redis.Redis.from_url(settings.effective_redis_url)
    store, storage = JobStore(client), make_storage(settings)
    celery = Celery("bench", broker=settings.effective_redis_url)
    logs, processes = [], []

    def submit(path: Path) -> str:
        job_id, info = new_job_id(), read_info(path)
        copy = scratch / f"{job_id}.wav"
        copy.write_bytes(path.read_bytes())
        storage.accept_upload(copy, job_id)
        store.create(Job(id=job_id, status=JobStatus.QUEUED, stems="all", model=settings.model,
                         samplerate=info.samplerate, channels=info.channels, frames=info.frames,
                         created_at=time.time(), queue=settings.queue,
                         output=resolve_output({"sample_format": "float32"}, info).to_dict()))
        enqueue_job(celery, job_id, settings.queue)
        return job_id

    def wait(job_ids: tp.Sequence[str]) -> None:
        while True:
            jobs = [store.get(job_id) for job_id in job_ids]
            failed = [job for job in jobs if job.status.is_finished and job.status is not JobStatus.SUCCEEDED]
            if failed:
                raise SystemExit(f"{label}: job failed: {failed[0].error}")
            if all(job.status is JobStatus.SUCCEEDED for job in jobs):
                return
            time.sleep(0.1)

    try:
        for index in range(workers):
            worker_env = dict(env, DEMIX_DATA_DIR=str(scratch / f"{label}-worker-{index}")) if shared_nothing else env
            log = open(scratch / f"{label}-worker-{index}.log", "ab")
            logs.append(log)
            processes.append(popen_child(worker_argv(Settings.from_env(worker_env), concurrency=1,
                                                     loglevel="WARNING"), env=worker_env, stdout=log, stderr=log))
        warm = scratch / "warm.wav"
        write_wav(warm, 44100, 2, 1.0)
        wait([submit(warm) for _ in range(workers)])
        started = time.perf_counter()
        job_id = submit(wav)
        wait([job_id])
        elapsed = time.perf_counter() - started
        done = store.get(job_id)
        return TimedJob(elapsed, storage, job_id, done.attempts, list(done.outputs))
    finally:
        for process in processes:
            stop_process(process, timeout=60, sig=signal.SIGINT)
        for log in logs:
            log.close()
        client.close()
