"""Soak under fire: N jobs from C clients against `demix up` while its workers are killed.

Starts `demix up` with a tiny HT-Demucs (the real class, small width) and two worker
processes (DEMIX_WORKER_CONCURRENCY=2) in a scratch folder. C client threads submit N
copies of one short WAV between them (each submit with its own Idempotency-Key, retried
while the service answers 503 or not at all, as a client should) and poll their jobs until
each is finished. Meanwhile a chaos loop `kill -9`s a random worker every K seconds: one
of the two pool processes running jobs, or the whole Celery worker (main process and pool,
which `demix up` restarts), and Redis once (`demix up` restarts it; its append-only file
keeps the queue).

Before the storm one job of the same input runs alone: its stems' digest is the reference
every job's stems are compared with. Prints, from this run:
  * submitted, succeeded, failed, lost (accepted but never `succeeded`/`failed`, or gone);
  * run twice: jobs whose stems differ from the reference (two runs' writes mixed), whose
    success was recorded twice, or that left stems of two attempts;
  * retried: jobs redone after a kill took their run (attempts > 1; expected, not an error);
  * submit latency p50/p95 (first try to 202, retries included) and jobs/s.
Exit code 1 unless every job succeeded: 0 lost, 0 run twice, 0 failed.

Usage: python bench/soak.py [--jobs 1000] [--clients 20] [--seconds 1.0] [--kill-every 20]
                            [--redis-kills 1] [--chaos-for SECONDS] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
import typing as tp
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._clients import FINISHED, Clients, Submission  # noqa: E402
from bench._live_service import LiveService, running_service  # noqa: E402
from bench.load import wav_upload  # noqa: E402
from demix.storage.local import JobStorage  # noqa: E402
# The tiny model is a test helper (tests/tiny_models.py), as in bench/load.py.
from testkit.tiny_models import TINY_MODEL, write_tiny_repo  # noqa: E402

POLL_INTERVAL_S = 2.0
"""Pause between two passes of a client over its unfinished jobs."""
RETRY_S = 0.5
"""Pause before a client tries a refused or unanswered submit again."""
SUBMIT_PATIENCE_S = 600.0
"""Longest a client keeps trying one submit."""
FINISH_TIMEOUT_S = 3600.0

SERVICE_SETTINGS = {
    "DEMIX_WORKER_CONCURRENCY": "2",
    "DEMIX_TORCH_THREADS": "1",
    # A killed run's job is requeued within seconds (a lease plus two sweeps), and a lost
    # message found within half a minute, so the storm ends in minutes.
    "DEMIX_LEASE_S": "6",
    "DEMIX_LOST_MESSAGE_S": "30",
    # Kills strike whichever job runs: on a slow machine (long runs, long warm-ups) one job may
    # be hit three times, which the default DEMIX_MAX_ATTEMPTS fails as a poison input would
    # be. The soak measures loss and duplication, so it allows more lost runs per job.
    "DEMIX_MAX_ATTEMPTS": "10",
}


# -- clients ------------------------------------------------------------------------------------

def submit(session: requests.Session, url: str, upload: bytes, submission: Submission) -> None:
    """Submit until accepted; the Idempotency-Key makes a retried submit whose first answer
    was lost return the same job instead of a second one."""
    started = time.perf_counter()
    deadline = time.monotonic() + SUBMIT_PATIENCE_S
    while time.monotonic() < deadline:
        submission.tries += 1
        try:
            response = session.post(f"{url}/v1/jobs", files={"file": (f"soak-{submission.number}.wav", upload)},
                                    data={"stems": "vocals"}, timeout=60,
                                    headers={"Idempotency-Key": f"soak-{submission.number}"})
            if response.status_code in (200, 202):
                submission.job_id = response.json()["id"]
                break
            if response.status_code < 500:  # refused for good: a bug of this script or the service
                raise SystemExit(f"submit refused: {response.status_code} {response.text}")
        except requests.RequestException:
            pass  # no answer (the API or Redis restarting): try again
        time.sleep(RETRY_S)
    submission.latency_s = time.perf_counter() - started


# -- chaos --------------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def worker_processes(service: LiveService) -> tuple[tp.Optional[int], list[int]]:
    """(the Celery worker's main process, its pool processes) under `demix up`."""
    main = next((pid for pid in _children(service.pid) if "celery" in _cmdline(pid)
                 and " worker" in _cmdline(pid)), None)
    return main, (_children(main) if main else [])


def redis_process(service: LiveService) -> tp.Optional[int]:
    return next((pid for pid in _children(service.pid) if "redis-server" in _cmdline(pid)), None)


class Chaos:
    """Kills a random worker every `period_s` seconds, and Redis `redis_kills` times (half a
    period after the 2nd, 5th, ... worker kill), until stopped or for `for_s` seconds.

    Only warm processes are struck (a pool process that has loaded and warmed its model; the
    whole worker once all its pool processes are): one restarted a moment ago is left to start,
    or a loaded machine, on which a start takes longer than a period, never gets its workers
    back.
    """

    def __init__(self, service: LiveService, period_s: float, redis_kills: int, seed: int = 0,
                 for_s: tp.Optional[float] = None, every_jobs: int = 0,
                 finished: tp.Callable[[], int] = lambda: 0):
        self.service, self.period_s, self.redis_kills, self.for_s = service, period_s, redis_kills, for_s
        # every_jobs > 0: strike after every that many finished jobs instead of every period_s,
        # so a short run meets its kills however fast the machine is.
        self.every_jobs, self.finished = every_jobs, finished
        self.random = random.Random(seed)
        self.kills: collections.Counter = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="chaos", daemon=True)

    def __enter__(self) -> "Chaos":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _next_strike(self, strike: int) -> bool:
        """Wait for the next strike's time (or job count); False once stopped."""
        if not self.every_jobs:
            return not self._stop.wait(self.period_s)
        while self.finished() < (strike + 1) * self.every_jobs:
            if self._stop.wait(0.1):
                return False
        return True

    def _loop(self) -> None:
        strike, started = 0, time.monotonic()
        while self._next_strike(strike):
            if self.for_s is not None and time.monotonic() - started > self.for_s:
                print("  chaos: over; the backlog drains", flush=True)
                return
            strike += 1
            self._kill_a_worker()
            if strike % 3 == 2 and self.kills["redis"] < self.redis_kills and \
                    not self._stop.wait(0 if self.every_jobs else self.period_s / 2):
                self._kill(redis_process(self.service), "redis")

    def _kill_a_worker(self) -> None:
        main, pool = worker_processes(self.service)
        warm = {int(pid) for pid in re.findall(r"worker [^ ]+:(\d+): model \S+ warm on", self.service.output_text())}
        choices = [(pid, "pool process") for pid in pool if pid in warm]
        if main and pool and set(pool) <= warm:
            choices.append((main, "whole worker"))
        if not choices:
            self.kills["skipped (none warm)"] += 1
            return
        self._kill(*self.random.choice(choices))

    def _kill(self, pid: tp.Optional[int], what: str) -> None:
        if pid is None:
            return
        try:
            if what == "whole worker":  # the leader of its process group: its pool goes too
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.kills[what] += 1
        print(f"  chaos: kill -9 {what} (pid {pid})", flush=True)


# -- checking -----------------------------------------------------------------------------------

def stems_digest(storage: JobStorage, job_id: str, attempt: int) -> str:
    """One digest over the job's stem files (names and bytes) of `attempt`."""
    digest = hashlib.sha256()
    folder = storage.stems_dir(job_id, attempt)
    for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def reference_digest(url: str, upload: bytes, storage: JobStorage) -> str:
    """Run the input once, alone, and digest its stems."""
    session = requests.Session()
    submission = Submission(-1)
    submit(session, url, upload, submission)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        job = session.get(f"{url}/v1/jobs/{submission.job_id}", timeout=60).json()
        if job["status"] in FINISHED:
            if job["status"] != "succeeded":
                raise SystemExit(f"the reference job did not succeed: {job}")
            return stems_digest(storage, job["id"], job["attempts"])
        time.sleep(0.2)
    raise SystemExit("the reference job did not finish")


def ran_twice(submission: Submission, storage: JobStorage, reference: str,
              successes: collections.Counter) -> tp.Optional[str]:
    """Why a succeeded job looks run more than once, or None."""
    job_id, attempt = submission.job_id, submission.final["attempts"]
    if successes[job_id] > 1:
        return f"its success was recorded {successes[job_id]} times"
    on_disk = storage.attempts_on_disk(job_id)
    if on_disk != [attempt]:
        return f"stems of attempts {on_disk} on disk (served: {attempt})"
    if stems_digest(storage, job_id, attempt) != reference:
        return "its stems differ from the reference run of the same input"
    return None


def percentile(values: tp.Sequence[float], percent: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1] if len(values) > 1 else values[0]


def soak(service: LiveService, storage: JobStorage, args: argparse.Namespace) -> bool:
    upload = wav_upload(args.seconds)
    reference = reference_digest(service.url, upload, storage)
    print(f"reference run done; {args.jobs} jobs of {args.seconds:g} s from {args.clients} clients, "
          f"kill -9 of a worker every {args.kill_every:g} s and of Redis {args.redis_kills} time(s)"
          + (f" for {args.chaos_for:g} s" if args.chaos_for else ""), flush=True)
    clients = Clients(service.url, args.jobs, args.clients,
                      lambda session, submission: submit(session, service.url, upload, submission),
                      POLL_INTERVAL_S, FINISH_TIMEOUT_S)
    with Chaos(service, args.kill_every, args.redis_kills, seed=args.seed, for_s=args.chaos_for,
               every_jobs=args.kill_every_jobs, finished=clients.finished) as chaos:
        elapsed = clients.run()
    results = clients.results

    output = service.output_text()
    successes = collections.Counter(re.findall(r"job ([0-9a-f]{32}) succeeded on attempt", output))
    accepted = [s for s in results if s.job_id]
    succeeded = [s for s in accepted if s.final and s.final["status"] == "succeeded"]
    failed = [s for s in accepted if s.final and s.final["status"] in ("failed", "cancelled")]
    lost = [s for s in results if s not in succeeded and s not in failed]  # unanswered submits too
    twice = {s.job_id: why for s in succeeded if (why := ran_twice(s, storage, reference, successes))}
    repeated_ids = len(accepted) - len({s.job_id for s in accepted})
    retried = [s for s in succeeded if s.final["attempts"] > 1]
    latencies = [s.latency_s for s in results]
    print(f"kills: {dict(chaos.kills)}")
    print(f"submitted {len(results)}, accepted {len(accepted)}, succeeded {len(succeeded)}, failed {len(failed)}, "
          f"lost {len(lost)}, run twice {len(twice) + repeated_ids}")
    attempts = dict(sorted(collections.Counter(s.final["attempts"] for s in succeeded).items()))
    print(f"redone after a kill took their run: {len(retried)} (jobs by attempts: {attempts}); "
          f"submits retried: {sum(1 for s in results if s.tries > 1)}; lost messages sent again: "
          f"{output.count('with no message in the broker (lost); sent again')}")
    print(f"submit latency: p50 {1e3 * percentile(latencies, 50):.0f} ms, "
          f"p95 {1e3 * percentile(latencies, 95):.0f} ms, max {1e3 * max(latencies):.0f} ms")
    print(f"{len(succeeded) / elapsed:.2f} jobs/s ({len(succeeded)} jobs in {elapsed:.1f} s, "
          f"on {os.cpu_count()} cores)")
    for s in failed[:5]:
        print(f"  failed {s.job_id}: {s.final.get('error')}")
    for s in lost[:5]:
        print(f"  lost #{s.number} {s.job_id}: last seen {s.final}")
    for job_id, why in list(twice.items())[:5]:
        print(f"  run twice {job_id}: {why}")
    return not lost and not failed and not twice and not repeated_ids and len(succeeded) == args.jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each WAV")
    parser.add_argument("--kill-every", type=float, default=20.0, help="seconds between two worker kills")
    parser.add_argument("--kill-every-jobs", type=int, default=0,
                        help="kill a worker after every N finished jobs instead of every --kill-every seconds")
    parser.add_argument("--redis-kills", type=int, default=1)
    parser.add_argument("--chaos-for", type=float, help="seconds of kills, then the backlog drains "
                        "(default: kills until every job finished)")
    parser.add_argument("--seed", type=int, default=0, help="of the chaos loop's choices")
    parser.add_argument("--workdir", type=Path, help="keep the service's data and output here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="demix-soak-") as scratch:
        workdir = args.workdir or Path(scratch)
        settings = {**SERVICE_SETTINGS, "DEMIX_MODEL": TINY_MODEL,
                    "DEMIX_MODEL_REPO": str(write_tiny_repo(workdir / "models"))}
        with running_service(workdir, settings) as service:
            print(f"demix up is ready in {service.ready_s:.1f} s (its output: {service.output})", flush=True)
            ok = soak(service, JobStorage(workdir / "data"), args)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
