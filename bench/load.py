"""Load: N jobs from C concurrent clients, none lost, none done twice.

Starts `demix up` with a tiny HT-Demucs (the real class, small width) in a scratch folder
(or uses a running service with `--url`), then C client threads submit N short WAVs
between them and poll their jobs until each is finished. Prints, from this run:
  * submit latency (POST /v1/jobs -> 202) p50/p95/max and submits/s;
  * jobs/s from the first submit to the last job finished, against the worker's own rate
    (worker concurrency / mean run time of a job, from the job records) as the baseline;
  * how many jobs were lost (accepted but never `succeeded`, or gone) or duplicated (run
    more than once, or more job records in Redis than accepted submits): both must be 0.

Usage: python bench/load.py [--jobs 500] [--clients 20] [--seconds 1.0] [--stems all]
                            [--url http://host:port [--redis-url redis://...]]
Exit code 1 when a job was lost or duplicated.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import typing as tp
from datetime import datetime
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._clients import Clients, Submission  # noqa: E402
from demix.cli.redis_server import free_port  # noqa: E402
from testkit.synthetic_audio import music_like  # noqa: E402
from testkit.tiny_models import TINY_MODEL, write_tiny_repo  # noqa: E402

POLL_INTERVAL_S = 0.5
"""Pause between two passes of a client over its unfinished jobs."""

READY_TIMEOUT_S = 300.0
FINISH_TIMEOUT_S = 3600.0
@contextlib.contextmanager
def demix_up(scratch: Path) -> tp.Iterator[tuple[str, str, int]]:
    """`demix up` with the tiny model in `scratch`; yields (API URL, private Redis URL,
    worker concurrency), and stops it with Ctrl-C's signal at the end."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DEMIX_REDIS_URL"}
    env.update({"DEMIX_PORT": str(port), "DEMIX_FLOWER_PORT": str(free_port()),
                "DEMIX_DATA_DIR": str(scratch / "data"), "DEMIX_MODEL": TINY_MODEL,
                "DEMIX_MODEL_REPO": str(write_tiny_repo(scratch / "models"))})
    log_path = scratch / "demix-up.log"
    with open(log_path, "wb") as log:
        up = subprocess.Popen([str(Path(sys.executable).parent / "demix"), "up"], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "demix is ready" not in (text := log_path.read_text(errors="replace")):
            if up.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"demix up did not start:\n{text[-3000:]}")
            time.sleep(0.2)
        redis_port = re.search(r"started private Redis \(.*\) on port (\d+)", text).group(1)
        concurrency = int(env.get("DEMIX_WORKER_CONCURRENCY") or 1)
        print(f"demix up is ready (its output: {log_path})", flush=True)
        yield f"http://127.0.0.1:{port}", f"redis://127.0.0.1:{redis_port}/0", concurrency
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(180)


def wav_upload(seconds: float) -> bytes:
    """One short stereo 16-bit WAV, the same bytes for every job."""
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, music_like(44100, 2, seconds), 44100, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


def submit_once(url: str, upload: bytes, stems: str, session: requests.Session, submission: Submission) -> None:
    """One try: the answer (or its absence) is what the bench measures."""
    started = time.perf_counter()
    submission.tries = 1
    try:
        response = session.post(f"{url}/v1/jobs", files={"file": (f"load-{submission.number}.wav", upload)},
                                data={"stems": stems}, timeout=120)
        submission.http_status = response.status_code
        submission.job_id = response.json()["id"] if response.status_code == 202 else None
    except requests.RequestException:
        pass  # no answer at all: http_status stays 0
    submission.answered_at = time.perf_counter()
    submission.latency_s = submission.answered_at - started


def _seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def count_records(redis_url: str) -> tuple[int, tp.Optional[int]]:
    """(job records in Redis, the store's `succeeded` counter if it keeps one)."""
    import redis

    from demix import redis_keys as keys

    client = redis.Redis.from_url(redis_url)
    try:
        records = sum(1 for _ in client.scan_iter(match=keys.job_key("*"), count=1000))
        counter_key = getattr(keys, "metrics_counters_key", None)
        succeeded = client.hget(counter_key(), "succeeded") if counter_key else None
        return records, int(succeeded) if succeeded is not None else None
    finally:
        client.close()


def run(url: str, redis_url: tp.Optional[str], concurrency: int, args: argparse.Namespace) -> bool:
    upload = wav_upload(args.seconds)
    records_before, counter_before = count_records(redis_url) if redis_url else (None, None)
    print(f"{args.jobs} jobs of {args.seconds:g} s (44.1 kHz stereo, {len(upload) / 1e3:.0f} kB, "
          f"stems={args.stems}) from {args.clients} clients against {url}", flush=True)
    clients = Clients(url, args.jobs, args.clients, functools.partial(submit_once, url, upload, args.stems),
                      POLL_INTERVAL_S, FINISH_TIMEOUT_S)
    elapsed = clients.run()
    results, started = clients.results, clients.started

    accepted = [s for s in results if s.job_id]
    latencies = sorted(s.latency_s for s in results)
    submit_span = max(s.answered_at for s in results) - started
    rejected = {}
    for s in results:
        if not s.job_id:
            rejected[s.http_status] = rejected.get(s.http_status, 0) + 1
    print(f"submit latency: p50 {1e3 * _percentile(latencies, 50):.0f} ms, "
          f"p95 {1e3 * _percentile(latencies, 95):.0f} ms, max {1e3 * latencies[-1]:.0f} ms "
          f"({len(results) / submit_span:.1f} submits/s); accepted {len(accepted)}/{args.jobs}"
          + (f", refused {rejected}" if rejected else ""))

    succeeded = [s for s in accepted if s.final and s.final["status"] == "succeeded"]
    failed = [s for s in accepted if s.final and s.final["status"] in ("failed", "cancelled")]
    lost = [s for s in accepted if s not in succeeded and s not in failed]
    ran_twice = [s for s in succeeded if s.final.get("attempts", 1) > 1]
    repeated_ids = len(accepted) - len({s.job_id for s in accepted})
    run_times = [_seconds_between(s.final["started_at"], s.final["finished_at"]) for s in succeeded]
    jobs_per_s = len(succeeded) / elapsed
    print(f"all finished in {elapsed:.1f} s: {jobs_per_s:.2f} jobs/s")
    if run_times:
        own_rate = concurrency / statistics.mean(run_times)
        print(f"worker's own rate: {own_rate:.2f} jobs/s (concurrency {concurrency} / mean run "
              f"{statistics.mean(run_times):.3f} s); service/worker = {jobs_per_s / own_rate:.2f}")
    new_records = new_successes = None
    if redis_url:
        records_after, counter_after = count_records(redis_url)
        new_records = records_after - records_before
        if counter_after is not None:
            new_successes = counter_after - (counter_before or 0)
    extra_records = max(0, new_records - len(accepted)) if new_records is not None else 0
    duplicated = len(ran_twice) + repeated_ids + extra_records
    print(f"succeeded {len(succeeded)}, failed {len(failed)}, lost {len(lost)}, duplicated {duplicated}"
          + (f" (new job records in Redis: {new_records}, successes counted by the store: {new_successes}; "
             f"runs of a job beyond its first: {len(ran_twice)})" if new_records is not None
             else " (no --redis-url: job records not counted)"))
    for s in failed[:5]:
        print(f"  failed {s.job_id}: {s.final.get('error')}")
    for s in lost[:5]:
        print(f"  lost {s.job_id}: last seen {s.final}")
    return not lost and not duplicated and len(accepted) == args.jobs


def _percentile(sorted_values: tp.Sequence[float], percent: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(percent / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each WAV")
    parser.add_argument("--stems", default="all")
    parser.add_argument("--url", help="a running service (default: start `demix up` with the tiny model)")
    parser.add_argument("--redis-url", help="with --url: its Redis, to count the job records")
    parser.add_argument("--worker-concurrency", type=int, default=1,
                        help="with --url: jobs the service runs at once, for the baseline")
    args = parser.parse_args()
    if args.url:
        ok = run(args.url.rstrip("/"), args.redis_url, args.worker_concurrency, args)
    else:
        with tempfile.TemporaryDirectory(prefix="demix-load-") as scratch, \
                demix_up(Path(scratch)) as (url, redis_url, concurrency):
            ok = run(url, redis_url, concurrency, args)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
