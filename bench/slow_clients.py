"""Slow clients against the API: does `/healthz` stay fast and a job go through while N
connections trickle their headers or bodies? And what does a 500 MB upload cost?

Starts `demix up` (tiny HT-Demucs, no Flower, no gRPC), whose API runs behind its front
(`demix.api.front`), and beside it, on the same Redis, data folder and worker, the API under
the server it had before (gunicorn, gthread, 2 processes x 8 threads) as the baseline. For
each server and each N (default 0, 50, 500), for `--seconds`:
  * N slow connections on loopback, half sending a request's headers a byte every
    `--byte-every-s`, half a POST body that way; one the server closes is opened again;
  * a normal client polls `/healthz` (5 s timeout, counted as 5 s) and submits a small job;
  * the API's resident memory (all its processes) is sampled every second.
It prints healthz p50/p99/max and failures, the job's time and status, the peak RSS, and
for the front what its closing of slow connections looked like. Then, with no slow clients,
it times the upload of one `--upload-mb` WAV to each server (the job is cancelled right
after) and prints the ratio.

    python bench/slow_clients.py                          # N = 0, 50, 500; 60 s each; 500 MB upload
    python bench/slow_clients.py --connections 500 --seconds 20 --servers front
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._live_service import running_service  # noqa: E402
from demix.cli.redis_server import free_port  # noqa: E402

HEALTHZ_TIMEOUT_S = 5.0
JOB_TIMEOUT_S = 120.0
GUNICORN_BASELINE = ["-m", "gunicorn", "--workers", "2", "--worker-class", "gthread", "--threads", "8",
                     "--timeout", "600", "--graceful-timeout", "10", "--no-control-socket"]
"""The API's server before `demix.api.front`: its command as `demix api` ran it."""


@dataclasses.dataclass
class Trial:
    server: str
    connections: int
    healthz_s: list[float] = dataclasses.field(default_factory=list)
    healthz_failures: int = 0
    job_s: tp.Optional[float] = None
    job_status: str = "not submitted"
    peak_rss_mb: float = 0.0
    reopened: int = 0
    """Slow connections the server closed (and the bench opened again)."""
    answers: dict[str, int] = dataclasses.field(default_factory=dict)
    """What those closed connections were answered, by status line."""


# -- slow connections -------------------------------------------------------------------------

async def _slow_connection(port: int, kind: str, byte_every_s: float, stop: asyncio.Event, trial: Trial) -> None:
    head = (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" if kind == "headers" else
            b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 10000000\r\n\r\n--x\r\n")
    trickle = b"X-Slow: " + b"a" * 10_000 if kind == "headers" else b"b" * 10_000_000
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(byte_every_s)
            continue
        try:
            writer.write(head)
            for byte in trickle:
                await writer.drain()
                if reader.at_eof() or stop.is_set():
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    answer = await asyncio.wait_for(reader.read(200), byte_every_s)
                    if answer or reader.at_eof():
                        status = answer.split(b"\r\n", 1)[0].decode(errors="replace") or "closed"
                        trial.answers[status] = trial.answers.get(status, 0) + 1
                        break
                writer.write(bytes([byte]))
        except OSError:
            trial.answers["reset"] = trial.answers.get("reset", 0) + 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if not stop.is_set():
            trial.reopened += 1


def hold_slow_connections(port: int, count: int, byte_every_s: float, trial: Trial) -> tp.Callable[[], None]:
    """Start `count` slow connections in a thread of their own; returns the function stopping them."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    started = threading.Event()

    async def run() -> None:
        tasks = []
        for number in range(count):
            tasks.append(asyncio.ensure_future(_slow_connection(
                port, "headers" if number % 2 == 0 else "body", byte_every_s, stop, trial)))
            if number % 50 == 49:
                await asyncio.sleep(0.05)  # not one burst: the listen backlog is finite
        started.set()
        await stop.wait()
        await asyncio.gather(*tasks, return_exceptions=True)

    thread = threading.Thread(target=lambda: loop.run_until_complete(run()), daemon=True)
    thread.start()
    started.wait(60)

    def stop_all() -> None:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()

    return stop_all


# -- the normal client ------------------------------------------------------------------------

def poll_healthz(url: str, until: float, trial: Trial) -> None:
    import requests

    while time.monotonic() < until:
        started = time.perf_counter()
        try:
            with requests.get(f"{url}/healthz", timeout=HEALTHZ_TIMEOUT_S) as answer:
                ok = answer.status_code == 200
        except requests.RequestException:
            ok = False
        elapsed = time.perf_counter() - started
        trial.healthz_s.append(elapsed if ok else max(elapsed, HEALTHZ_TIMEOUT_S))
        trial.healthz_failures += not ok
        time.sleep(0.25)


def run_small_job(url: str, wav: Path, trial: Trial) -> None:
    import requests

    started = time.perf_counter()
    try:
        with open(wav, "rb") as f, requests.post(f"{url}/v1/jobs", files={"file": (wav.name, f, "audio/wav")},
                                                 data={"stems": "vocals"}, timeout=JOB_TIMEOUT_S) as answer:
            if answer.status_code != 202:
                trial.job_status = f"HTTP {answer.status_code}"
                return
            job_id = answer.json()["id"]
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            with requests.get(f"{url}/v1/jobs/{job_id}", timeout=HEALTHZ_TIMEOUT_S * 2) as answer:
                status = answer.json()["status"]
            if status in ("succeeded", "failed", "cancelled"):
                trial.job_status, trial.job_s = status, time.perf_counter() - started
                return
            time.sleep(0.25)
        trial.job_status = "timed out"
    except requests.RequestException as exc:
        trial.job_status = f"error: {type(exc).__name__}"


# -- memory -------------------------------------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in Path(f"/proc/{current}/task/{task}/children").read_text().split()]
    return found


def rss_mb(pids: tp.Iterable[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


def sample_peak_rss(api_pid: int, until: float, trial: Trial) -> None:
    while time.monotonic() < until:
        trial.peak_rss_mb = max(trial.peak_rss_mb, rss_mb(process_tree(api_pid)))
        time.sleep(1.0)


def run_trial(server: str, url: str, api_pid: int, connections: int, seconds: float, byte_every_s: float,
              wav: Path) -> Trial:
    trial = Trial(server, connections)
    port = int(url.rsplit(":", 1)[1])
    stop_slow = hold_slow_connections(port, connections, byte_every_s, trial) if connections else (lambda: None)
    try:
        time.sleep(min(5.0, seconds / 4))  # let the slow connections settle in first
        until = time.monotonic() + seconds
        threads = [threading.Thread(target=poll_healthz, args=(url, until, trial)),
                   threading.Thread(target=sample_peak_rss, args=(api_pid, until, trial)),
                   threading.Thread(target=run_small_job, args=(url, wav, trial))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        stop_slow()
    return trial


# -- uploads ------------------------------------------------------------------------------------

def write_big_wav(path: Path, megabytes: float) -> Path:
    """A stereo 44.1 kHz PCM16 WAV of about `megabytes` MB of noise, written block by block."""
    import numpy as np
    import soundfile as sf

    frames_left = int(megabytes * 1e6 / 4)
    rng = np.random.default_rng(0)
    with sf.SoundFile(str(path), "w", 44100, 2, subtype="PCM_16", format="WAV") as out:
        while frames_left > 0:
            block = min(frames_left, 1 << 20)
            out.write((rng.standard_normal((block, 2)) * 0.1).astype("float32"))
            frames_left -= block
    return path


def time_upload(url: str, wav: Path) -> tp.Tuple[float, int]:
    """Seconds to POST `wav` until the API answers, and its status; the job is cancelled after."""
    import requests

    started = time.perf_counter()
    with open(wav, "rb") as f, requests.post(f"{url}/v1/jobs", files={"file": (wav.name, f, "audio/wav")},
                                             data={"stems": "vocals"}, timeout=600) as answer:
        elapsed = time.perf_counter() - started
        status = answer.status_code
        job_id = answer.json().get("id") if status == 202 else None
    if job_id:
        with contextlib.suppress(requests.RequestException):
            requests.post(f"{url}/v1/jobs/{job_id}/cancel", timeout=30).close()
    return elapsed, status


@contextlib.contextmanager
def gunicorn_beside(service: tp.Any, scratch: Path, settings: dict[str, str]) -> tp.Iterator[tuple[str, int]]:
    """The API under the baseline server, on the same Redis and data folder as `service`."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMIX_")}
    env.update(settings, DEMIX_REDIS_URL=service.redis_url, DEMIX_DATA_DIR=str(scratch / "data"))
    with open(scratch / "gunicorn.log", "w") as log:
        process = subprocess.Popen([sys.executable, *GUNICORN_BASELINE, "--bind", f"127.0.0.1:{port}",
                                    "demix.api:create_app()"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        import requests
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(requests.RequestException), \
                    requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
                if answer.status_code == 200:
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"gunicorn did not start: {(scratch / 'gunicorn.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        process.wait(30)


def front_pid(up_pid: int) -> int:
    for pid in process_tree(up_pid):
        with contextlib.suppress(OSError):
            if b"demix.api.front" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
    raise RuntimeError("no demix.api.front process under demix up")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def report(trial: Trial) -> str:
    answers = ", ".join(f"{count} x {status!r}" for status, count in sorted(trial.answers.items())) or "-"
    job = f"{trial.job_status} in {trial.job_s:.1f} s" if trial.job_s is not None else trial.job_status
    return (f"  {trial.server:8s} N={trial.connections:4d}: healthz p50 {percentile(trial.healthz_s, .5):6.3f} s, "
            f"p99 {percentile(trial.healthz_s, .99):6.3f} s, max {max(trial.healthz_s, default=float('nan')):6.3f} s, "
            f"failed {trial.healthz_failures}/{len(trial.healthz_s)}; job {job}; peak RSS {trial.peak_rss_mb:.0f} MB; "
            f"slow connections closed {trial.reopened} ({answers})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", default="0,50,500", help="comma-separated N")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long each N is held")
    parser.add_argument("--byte-every-s", type=float, default=3.0, help="a slow connection's pace")
    parser.add_argument("--servers", default="front,gunicorn", help="front (demix up's) and/or gunicorn (baseline)")
    parser.add_argument("--upload-mb", type=float, default=500.0, help="size of the timed upload; 0: none")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    counts = [int(n) for n in args.connections.split(",")]
    servers = args.servers.split(",")

    from testkit.synthetic_audio import write_wav
    from testkit.tiny_models import write_tiny_repo

    with contextlib.ExitStack() as stack:
        scratch = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        settings = {"DEMIX_MODEL": "tiny", "DEMIX_MODEL_REPO": str(write_tiny_repo(scratch / "models")),
                    "DEMIX_TORCH_THREADS": "1"}
        small = write_wav(scratch / "small.wav", 44100, 2, 3.0)
        service = stack.enter_context(running_service(scratch, settings))
        targets = {}
        if "front" in servers:
            targets["front"] = (service.url, front_pid(service.pid))
        if "gunicorn" in servers:
            targets["gunicorn"] = stack.enter_context(gunicorn_beside(service, scratch, settings))
        print(f"{os.cpu_count()} cores; slow connections send a byte every {args.byte_every_s:g} s; "
              f"each N held {args.seconds:g} s", flush=True)
        trials = []
        for name, (url, pid) in targets.items():
            for count in counts:
                trials.append(run_trial(name, url, pid, count, args.seconds, args.byte_every_s, small))
                print(report(trials[-1]), flush=True)
        if args.upload_mb:
            big = write_big_wav(scratch / "big.wav", args.upload_mb)
            size_mb = big.stat().st_size / 1e6
            times = {}
            for name, (url, _pid) in targets.items():
                seconds, status = time_upload(url, big)
                times[name] = seconds
                print(f"  upload of {size_mb:.0f} MB to {name}: HTTP {status} in {seconds:.2f} s "
                      f"= {size_mb / seconds:.0f} MB/s", flush=True)
            if len(times) == 2:
                print(f"  upload time front/gunicorn: {times['front'] / times['gunicorn']:.3f}")
        target = [t for t in trials if t.server == "front" and t.connections == max(counts)]
        for trial in target:
            ok = percentile(trial.healthz_s, .99) < 1.0 and trial.job_status == "succeeded"
            print(f"  target (front, N={trial.connections}: healthz p99 < 1 s and the job succeeds): "
                  f"{'met' if ok else 'NOT met'}; mean healthz {statistics.fmean(trial.healthz_s or [0]):.3f} s")


if __name__ == "__main__":
    main()
