"""Workflow jobs on real workers: runs of different models in parallel, a repeated job, and
memory on a long track.

Starts a private Redis and `demix worker` processes (one prefork child, one torch thread
each) in a scratch folder, with two tiny HT-Demucs models of different weights (`tiny_a`,
`tiny_b`, equally heavy), and submits workflow jobs the way the API does
(`demix.intake.submission.queue_new_job`), timing each from submission to `succeeded`:
  * parallel: one step ensembling both models, on two workers serving one model each,
    against one worker serving both (the same job, the same cores): the ratio is the gain of
    spreading a workflow's runs over the workers (target <= 0.6 on 2 free cores);
  * repeat: a workflow on a song new to the result cache, then the same again, on the same
    workers (cold: the first job runs the models; warm: the cache serves the second's runs);
    every other run here bypasses the cache (`cache=false`), so it times the models;
  * memory: the largest peak RSS (VmHWM) of any worker pool process over a workflow with a
    `median_fft` ensemble, for a short and a long track, each on fresh workers (target: the
    long one within 1.1x of the short one).
Usage:
  python bench/workflows.py [--seconds 120] [--memory-minutes 5 40] [--skip-memory]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demix.cli.redis_server import RedisServer  # noqa: E402
from testkit.synthetic_audio import write_wav  # noqa: E402

MODELS = ("tiny_a", "tiny_b")


def ensemble(algorithm: str) -> dict:
    return {"steps": [{"name": "voc", "models": list(MODELS), "ensemble": algorithm}],
            "outputs": {"vocals": "voc/vocals", "instrumental": "voc/no_vocals"}}


@contextlib.contextmanager
def workers(scratch: Path, env: dict[str, str], served: tp.Sequence[str], label: str) -> tp.Iterator[list[int]]:
    """One `demix worker` per entry of `served` (the models it serves, comma-separated),
    warmed; yields their pids; stopped on leaving."""
    from demix.cli.argv import worker_argv
    from demix.cli.processes import popen_child, stop_process
    from demix.config import Settings

    processes, logs = [], []
    try:
        for index, models in enumerate(served):
            worker_env = dict(env, DEMIX_WORKER_MODELS=models)
            log = open(scratch / f"{label}-worker-{index}.log", "ab")
            logs.append(log)
            processes.append(popen_child(worker_argv(Settings.from_env(worker_env), concurrency=1, loglevel="WARNING"),
                                         env=worker_env, stdout=log, stderr=log))
        wait_warm(env, sum(len(models.split(",")) for models in served))
        yield [process.pid for process in processes]
    finally:
        for process in processes:
            stop_process(process, timeout=60, sig=signal.SIGINT)
        for log in logs:
            log.close()


def wait_warm(env: dict[str, str], expected: int) -> None:
    """Until the warm workers' readiness entries name `expected` (worker, model) pairs."""
    import redis

    from demix.catalogue import warm_model_notes
    from demix.config import Settings
    from demix.readiness import ready_workers

    client = redis.Redis.from_url(Settings.from_env(env).effective_redis_url)
    try:
        deadline = time.monotonic() + 600
        while sum(len(notes) for notes in warm_model_notes(ready_workers(client)).values()) < expected:
            if time.monotonic() > deadline:
                raise SystemExit("the workers did not warm up in 10 minutes (see the logs in the scratch folder)")
            time.sleep(0.2)
    finally:
        client.close()


def run_workflow(env: dict[str, str], wav: Path, workflow: dict, cache: bool = False) -> tuple[float, dict]:
    """Submit a workflow job of `wav` as the API does (with the result cache only if `cache`:
    the other runs time the models); seconds until it succeeded, and its runs as the job
    JSON shows them."""
    import shutil

    from demix.config import Settings
    from demix.intake.inspection import inspect_upload
    from demix.intake.submission import queue_new_job
    from demix.audio.output_formats import resolve_output
    from demix.services import build_services
    from demix.workflows.runs import new_workflow_job, workflow_view
    from demix.workflows.spec import parse_workflow

    settings = Settings.from_env(env)
    services = build_services(settings)
    try:
        with services.storage.open_upload() as upload:
            pass
        shutil.copyfile(wav, upload.name)
        info = inspect_upload(Path(upload.name), settings)
        job = new_workflow_job(parse_workflow(workflow, settings), info,
                               resolve_output({"sample_format": "float32"}, info), cache=cache)
        started = time.perf_counter()
        queue_new_job(job, services, Path(upload.name))
        while not (done := services.jobs.get(job.id)).status.is_finished:
            time.sleep(0.1)
        elapsed = time.perf_counter() - started
        if done.error:
            raise SystemExit(f"the workflow job failed: {done.error}")
        view = workflow_view(done, services.jobs)
        runs = [services.jobs.get(child) for child in services.jobs.children(job.id)]
        models = [run for run in runs if run.workflow_unit["kind"] == "model"]
        # How long the model runs ran at the same time (0: one after the other).
        view["overlap_s"] = max(0.0, min(run.finished_at for run in models) - max(run.started_at for run in models))
        return elapsed, view
    finally:
        services.jobs.redis.close()


def pool_peaks_mib(worker_pids: tp.Sequence[int]) -> float:
    """The largest peak RSS (VmHWM) of the workers' pool processes (their children but the
    background one), in MiB."""
    from demix.host_processes import process_ids, process_stat

    peaks = []
    for pid in process_ids():
        stat = process_stat(pid)
        if stat is None or stat.ppid not in worker_pids:
            continue
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"demix.worker.background" in command:
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks, default=float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="track length of the parallel and repeat runs")
    parser.add_argument("--memory-minutes", type=float, nargs=2, default=(5.0, 40.0), metavar=("SHORT", "LONG"),
                        help="track lengths of the memory runs")
    parser.add_argument("--skip-memory", action="store_true", help="only the parallel and repeat runs")
    args = parser.parse_args()
    from testkit.tiny_models import write_tiny_repo

    with tempfile.TemporaryDirectory(prefix="demix-workflows-") as tmp:
        scratch = Path(tmp)
        repo = scratch / "models"
        for seed, name in enumerate(MODELS):
            write_tiny_repo(repo, name, seed=seed)
        wav = write_wav(scratch / "track.wav", 44100, 2, args.seconds)
        with RedisServer(scratch / "redis", persist=False) as server:
            env = {k: v for k, v in os.environ.items() if not k.startswith("DEMIX_")}
            env.update({"DEMIX_REDIS_URL": server.url, "DEMIX_DATA_DIR": str(scratch / "data"),
                        "DEMIX_MODELS": ",".join(MODELS), "DEMIX_MODEL_REPO": str(repo), "DEMIX_DEVICE": "cpu",
                        "DEMIX_TORCH_THREADS": "1"})
            with workers(scratch, env, [",".join(MODELS)], "one"):
                one, one_view = run_workflow(env, wav, ensemble("avg_wave"))
            with workers(scratch, env, list(MODELS), "two"):
                two, two_view = run_workflow(env, wav, ensemble("avg_wave"))
                song = write_wav(scratch / "repeated.wav", 44100, 2, args.seconds, seed=1)  # new to the cache
                cold, _view = run_workflow(env, song, ensemble("avg_fft"), cache=True)
                warm, warm_view = run_workflow(env, song, ensemble("avg_fft"), cache=True)
            cached = [run["cached"] for step in warm_view["steps"] for run in step["runs"]]
            memory = []
            if not args.skip_memory:
                for minutes in args.memory_minutes:
                    track = write_wav(scratch / f"track-{minutes:g}min.wav", 44100, 2, minutes * 60)
                    with workers(scratch, env, list(MODELS), f"memory-{minutes:g}") as pids:
                        seconds, _view = run_workflow(env, track, ensemble("median_fft"))
                        memory.append((minutes, seconds, pool_peaks_mib(pids)))
                    track.unlink()
    print(f"input: {args.seconds:.0f} s stereo 44.1 kHz; models {', '.join(MODELS)} (tiny HT-Demucs); "
          f"{os.cpu_count()} cores, one torch thread and one pool process per worker")
    print("parallel: one step ensembling both models (avg_wave)")
    print(f"  one worker serving both:          {one:8.2f} s   (its two model runs overlapped "
          f"{one_view['overlap_s']:.2f} s)")
    print(f"  two workers, one model each:      {two:8.2f} s   (its two model runs overlapped "
          f"{two_view['overlap_s']:.2f} s)")
    print(f"  ratio two / one: {two / one:.3f} (target <= 0.6 on 2 free cores)")
    print("repeat: an avg_fft workflow on a song new to the result cache, then again, two workers")
    print(f"  first (cold):  {cold:8.2f} s")
    print(f"  second (warm): {warm:8.2f} s   runs cached: {cached}")
    print(f"  ratio warm / cold: {warm / cold:.3f}")
    if memory:
        print("memory: a median_fft ensemble of both models, fresh workers per track")
        for minutes, seconds, peak in memory:
            print(f"  {minutes:5.1f} min track: {seconds:8.2f} s, largest pool process peak RSS {peak:8.1f} MiB")
        print(f"  ratio long / short: {memory[-1][2] / memory[0][2]:.3f} (target <= 1.1)")


if __name__ == "__main__":
    main()
