"""One long track on one worker against two workers sharing it (a split job).

Starts a private Redis and `demix worker` processes (one prefork child, one torch
thread each) in a scratch folder, then separates the same WAV twice, in this run:
  * one worker, `DEMIX_SPLIT_S=0` (the job runs whole);
  * two workers, `DEMIX_SPLIT_S` set so the job splits into one part per worker (a
    chord of parts, then the merge);
timing each from enqueueing to `succeeded` (the workers are warmed first by a short
job each, so model loading is not timed), and prints both times, their ratio and the
max |Δ| between the two runs' stems (float32 WAV). Usage:
  python bench/scale.py [--seconds 600] [--model tiny | --model htdemucs --model-repo DIR]
                        [--precision fp32 | bf16]
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.argv import worker_argv  # noqa: E402
from cli.processes import popen_child, stop_process  # noqa: E402
from cli.redis_server import RedisServer  # noqa: E402
from testkit.synthetic_audio import write_wav  # noqa: E402
from testkit.tiny_models import write_tiny_repo  # noqa: E402


def run(scratch: Path, env: dict[str, str], workers: int, wav: Path, label: str) -> tuple[float, Path]:
    """Time one job of `wav` on `workers` workers; returns the time and its stem folder."""
    import redis

    from shared.audio import read_info
    from shared.config import Settings
    from shared.jobs import Job, JobStatus, JobStore, new_job_id
    from shared.lifecycle import enqueue_job
    from shared.output import resolve_output
    from shared.storage import JobStorage
    from celery import Celery

    settings = Settings.from_env(env)
    client = redis.Redis.from_url(settings.effective_redis_url)
    store, storage = JobStore(client), JobStorage(settings.data_dir)
    celery = Celery("bench", broker=settings.effective_redis_url)
    logs = []
    processes = []

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
            log = open(scratch / f"{label}-worker-{index}.log", "ab")
            logs.append(log)
            processes.append(popen_child(worker_argv(settings, concurrency=1, loglevel="WARNING"),
                                         env=env, stdout=log, stderr=log))
        warm = scratch / "warm.wav"
        write_wav(warm, 44100, 2, 1.0)
        wait([submit(warm) for _ in range(workers)])
        started = time.perf_counter()
        job_id = submit(wav)
        wait([job_id])
        elapsed = time.perf_counter() - started
        return elapsed, storage.stems_dir(job_id, store.get(job_id).attempts)
    finally:
        for process in processes:
            stop_process(process, timeout=60, sig=signal.SIGINT)
        for log in logs:
            log.close()
        client.close()


def max_difference(a: Path, b: Path) -> float:
    import soundfile as sf

    worst = 0.0
    for stem in sorted(a.glob("*.wav")):
        worst = max(worst, float(np.abs(sf.read(str(stem), dtype="float32")[0]
                                        - sf.read(str(b / stem.name), dtype="float32")[0]).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="length of the generated track")
    parser.add_argument("--model", default="tiny", help="tiny (the tests' HT-Demucs) or a demucs model name")
    parser.add_argument("--model-repo", type=Path, help="demucs-format folder holding --model")
    parser.add_argument("--workers", type=int, default=2, help="workers of the split run")
    parser.add_argument("--precision", default="fp32", help="DEMIX_PRECISION of both runs (fp32, bf16)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="demix-scale-") as tmp:
        scratch = Path(tmp)
        repo = write_tiny_repo(scratch / "models") if args.model == "tiny" else args.model_repo
        if repo is None:
            parser.error("--model-repo is needed for a model other than tiny")
        wav = write_wav(scratch / "track.wav", 44100, 2, args.seconds)
        with RedisServer(scratch / "redis", persist=False) as server:
            env = {k: v for k, v in os.environ.items() if not k.startswith("DEMIX_")}
            env.update({"DEMIX_REDIS_URL": server.url, "DEMIX_DATA_DIR": str(scratch / "data"),
                        "DEMIX_MODEL": args.model, "DEMIX_MODEL_REPO": str(repo), "DEMIX_DEVICE": "cpu",
                        "DEMIX_TORCH_THREADS": "1", "DEMIX_PRECISION": args.precision})
            one, one_stems = run(scratch, dict(env, DEMIX_SPLIT_S="0"), 1, wav, "one")
            split_s = str(max(1, math.ceil(args.seconds / args.workers)))
            many, many_stems = run(scratch, dict(env, DEMIX_SPLIT_S=split_s), args.workers, wav, "split")
            difference = max_difference(one_stems, many_stems)
    print(f"input: {args.seconds:.0f} s stereo 44.1 kHz, stems=all, model {args.model} in {args.precision}, "
          f"{os.cpu_count()} cores, one torch thread per worker")
    print(f"  one worker, unsplit:               {one:8.2f} s")
    print(f"  {args.workers} workers, split (DEMIX_SPLIT_S={split_s}): {many:8.2f} s")
    print(f"  ratio split / one: {many / one:.3f} (target <= 0.6 with 2 workers on 2 free cores)")
    print(f"  max |delta| between their stems: {difference:.2e}")


if __name__ == "__main__":
    main()
