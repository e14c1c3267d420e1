"""The engine against `python -m demucs.separate`: speed, memory and identity of output.

For one WAV and one demucs-format model folder, runs, interleaved round by round so that
all see the same machine state (medians over `--rounds` are printed):
  * demucs:  python -m demucs.separate --shifts 0 --overlap 0.25 --float32 --clip-mode none
  * engine:  demix.separation.engine.separate_file, fp32 and each --precision (default: bf16)
each in a fresh subprocess, model load included on both sides;
  * service: the same WAV through a real `demix up` (API, Redis, a Celery worker that
    loaded and warmed the model when it started), fp32 and each --precision: from the
    upload to every stem downloaded, as a client sees it (the start-up, until demix up
    says it is ready, is printed beside it);
and prints wall time,
real-time factor (wall / audio), peak RSS, the speed ratio against demucs, the max |Δ|
between the stems and demucs', and for reduced precisions each stem's SNR against the
engine's fp32 stems. Then, for each precision, the first job of a process that warmed
up (`demix.separation.forward.warm_model`, what a worker does when it starts) against the first
job of one that did not, with the model load and warm-up times.

With --bag-vocals it also builds a 4-model bag of the model with one-hot weights (the
shape of htdemucs_ft: one specialist per source) and compares `stems=vocals` against
`demucs.separate --two-stems vocals` on that bag.

Usage:
  python bench/compare_demucs.py --model-repo DIR --model htdemucs [--seconds 60]
         [--precision bf16] [--bag-vocals] [--rounds 3] [--no-service] [--no-lives]
Without --model-repo a tiny HT-Demucs is used (fast; only the ratios mean anything).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._live_service import running_service, time_job  # noqa: E402


def run_measured(args: list[str]) -> tuple[float, float, dict]:
    """Run a command; returns (wall seconds, peak RSS in MB) of that process alone, and
    the JSON object on its last line of output, if any."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(args, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            stderr.seek(0)
            raise RuntimeError(f"{' '.join(args[:4])} ... failed: {stderr.read().decode()[-2000:]}")
        stdout.seek(0)
        lines = stdout.read().decode().strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return wall, usage.ru_maxrss / 1024, report


def read_stems(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem.replace("minus_", "no_"): sf.read(str(p), dtype="float64", always_2d=True)[0]
            for p in sorted(folder.glob("*.wav"))}


def demucs_command(wav: Path, repo: Path, name: str, out: Path, two_stems: str | None) -> list[str]:
    command = [sys.executable, "-m", "demucs.separate", "--repo", str(repo), "-n", name, "--shifts", "0",
               "--overlap", "0.25", "--float32", "--clip-mode", "none", "-d", "cpu", "-o", str(out)]
    if two_stems:
        command += ["--two-stems", two_stems, "--other-method", "minus"]
    return command + [str(wav)]


def engine_command(wav: Path, repo: Path, name: str, out: Path, stems: str, precision: str,
                   life: str = "job") -> list[str]:
    return [sys.executable, __file__, "--child", life, "--input", str(wav), "--model-repo", str(repo),
            "--model", name, "--out", str(out), "--stems", stems, "--precision", precision]


def child(args: argparse.Namespace) -> None:
    """Separate one file with the engine, as the worker does, into `args.out`; prints the
    phases' times as JSON. `job`: load and separate once (a CLI-like run). `warm`: load,
    warm up, then separate once."""
    started = time.perf_counter()
    import torch
    from demucs.pretrained import get_model

    from demix.audio.io import AudioWriter
    from demix.separation.allocator import keep_freed_memory_for_reuse
    from demix.separation.engine import SeparationOptions, separate_file
    from demix.separation.forward import warm_model

    keep_freed_memory_for_reuse()  # as a worker process does (demix.worker.runner)
    torch.set_num_threads(os.cpu_count() or 1)
    model = get_model(args.model, repo=Path(args.model_repo)).eval()
    report = {"load_s": time.perf_counter() - started}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    class FolderSink:
        def open_stem(self, name, samplerate, channels, subtype, frames):
            return AudioWriter(out / f"{name}.wav", samplerate, channels, subtype, frames)

        def publish(self, name):
            pass

    options = SeparationOptions(precision=args.precision)
    if args.child == "warm":
        started = time.perf_counter()
        warm_model(model, options.device, options.precision)
        report["warmup_s"] = time.perf_counter() - started
    started = time.perf_counter()
    separate_file(model, Path(args.input), args.stems, FolderSink(), options)
    report["first_job_s"] = time.perf_counter() - started
    print(json.dumps(report))


def snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    noise = np.sum((reference - estimate) ** 2)
    return float(10 * np.log10(np.sum(reference ** 2) / max(noise, 1e-20)))


def make_bag(repo: Path, name: str, target: Path) -> str:
    """A 4-model bag of `name`'s model with one-hot weights, like htdemucs_ft."""
    from demucs.apply import BagOfModels
    from demucs.pretrained import get_model

    from demix.separation.model_repo import save_bag

    model = get_model(name, repo=repo)
    single = model.models[0] if hasattr(model, "models") else model
    sources = len(single.sources)
    copies = [copy.deepcopy(single) for _ in range(sources)]
    weights = [[1.0 if s == i else 0.0 for s in range(sources)] for i in range(sources)]
    save_bag(BagOfModels(copies, weights), target, f"{name}_bag")
    return f"{name}_bag"


def through_service(wav: Path, repo: Path, name: str, out: Path, stems: str, precision: str,
                    scratch: Path) -> tuple[float, float, dict]:
    """One job through a fresh `demix up`: (seconds from upload to stems downloaded, NaN for
    the peak RSS it does not measure, {"ready_s": its start-up})."""
    settings = {"DEMIX_MODEL": name, "DEMIX_MODEL_REPO": str(repo), "DEMIX_PRECISION": precision,
                "DEMIX_DEVICE": "cpu"}
    with running_service(scratch, settings) as service:
        seconds = time_job(service.url, wav, stems, out, sample_format="float32")
    return seconds, float("nan"), {"ready_s": service.ready_s}


def compare(wav: Path, repo: Path, name: str, work: Path, rounds: int, stems: str,
            precisions: list[str], label: str, lives: bool = True, service: bool = False) -> None:
    duration = sf.info(str(wav)).duration
    two_stems = None if stems == "all" else stems
    modes = ["demucs"] + [f"engine-{p}" for p in ["fp32"] + precisions]
    if service:
        modes += [f"service-{p}" for p in ["fp32"] + precisions]
    if lives:
        modes += [f"warm-{p}" for p in ["fp32"] + precisions]
    results: dict[str, list[tuple[float, float, dict]]] = {}
    outputs: dict[str, Path] = {}
    for round_index in range(rounds):
        for mode in modes:
            out = work / f"{mode}-{round_index}"
            shutil.rmtree(out, ignore_errors=True)
            if mode.startswith("service-"):
                scratch = work / f"{mode}-{round_index}-service"
                results.setdefault(mode, []).append(
                    through_service(wav, repo, name, out, stems, mode.split("-", 1)[1], scratch))
                shutil.rmtree(scratch, ignore_errors=True)
                outputs[mode] = out
                print(f"  round {round_index + 1}/{rounds} {mode}: {results[mode][-1][0]:.1f} s",
                      flush=True)
                continue
            if mode == "demucs":
                command = demucs_command(wav, repo, name, out, two_stems)
            else:
                life, precision = mode.split("-", 1)
                command = engine_command(wav, repo, name, out, stems, precision,
                                         "job" if life == "engine" else life)
            results.setdefault(mode, []).append(run_measured(command))
            outputs[mode] = out / name / wav.stem if mode == "demucs" else out
            print(f"  round {round_index + 1}/{rounds} {mode}: {results[mode][-1][0]:.1f} s", flush=True)
    print(f"\n== {label}: {duration:.0f} s of 44.1 kHz stereo, model {name}, stems={stems}, "
          f"{os.cpu_count()} cores, median of {rounds} interleaved rounds")
    median = {mode: statistics.median(w for w, _, _ in runs) for mode, runs in results.items()}
    reference = read_stems(outputs["demucs"])
    fp32 = read_stems(outputs["engine-fp32"])
    for mode in modes:
        if mode.startswith("warm-"):
            continue
        wall, rss = median[mode], max(r for _, r, _ in results[mode])
        memory = "peak RSS       —  " if math.isnan(rss) else f"peak RSS {rss:7.0f} MB"
        line = (f"{mode:>14}: {wall:7.1f} s  RTF {wall / duration:5.2f}  {memory}  "
                f"speed vs demucs {median['demucs'] / wall:5.2f}x")
        if mode != "demucs":
            stems_out = read_stems(outputs[mode])
            delta = max(np.abs(stems_out[k] - reference[k]).max() for k in reference)
            line += f"  max|Δ| vs demucs {delta:.2e}"
            if mode != "engine-fp32":
                line += "  SNR vs fp32 " + ", ".join(f"{k} {snr_db(fp32[k], stems_out[k]):.1f}"
                                                     for k in fp32) + " dB"
        print(line, flush=True)
    if service:
        ready = {p: statistics.median(r["ready_s"] for _, _, r in results[f"service-{p}"])
                 for p in ["fp32"] + precisions}
        print("   service-*: from the upload to every stem downloaded, through demix up; it was ready after "
              + ", ".join(f"{seconds:.1f} s ({p})" for p, seconds in ready.items())
              + " (Redis, API, worker start, model load and warm-up)", flush=True)
    if not lives:
        return
    print("   first job of a process, model load excluded (medians):")
    for precision in ["fp32"] + precisions:
        def phase(mode: str, key: str) -> float:
            return statistics.median(report[key] for _, _, report in results[mode])

        warm, cold = f"warm-{precision}", f"engine-{precision}"
        print(f"{precision:>14}: load {phase(warm, 'load_s'):5.1f} s, warm-up {phase(warm, 'warmup_s'):5.1f} s,"
              f" then the first job {phase(warm, 'first_job_s'):6.1f} s"
              f" ({median['demucs'] / phase(warm, 'first_job_s'):4.2f}x demucs' whole run);"
              f" without warm-up the first job takes {phase(cold, 'first_job_s'):6.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["job", "warm", "cold"], help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--model-repo")
    parser.add_argument("--model", default="htdemucs")
    parser.add_argument("--stems", default="all")
    parser.add_argument("--precision", action="append", default=[],
                        help="precision to measure besides fp32 (default: bf16); repeatable")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-lives", action="store_true",
                        help="skip the warm-up / first-job measurements")
    parser.add_argument("--no-service", action="store_true", help="skip the runs through demix up")
    parser.add_argument("--bag-vocals", action="store_true")
    parser.add_argument("--bag-only", action="store_true", help="skip the full separation")
    args = parser.parse_args()
    if args.child:
        args.precision = args.precision[0] if args.precision else "fp32"
        return child(args)
    args.precision = args.precision or ["bf16"]

    from testkit.synthetic_audio import write_wav
    from testkit.tiny_models import write_tiny_repo

    with tempfile.TemporaryDirectory(prefix="demix-bench-") as scratch:
        work = Path(scratch)
        repo = Path(args.model_repo) if args.model_repo else write_tiny_repo(work / "tiny-repo")
        name = args.model if args.model_repo else "tiny"
        wav = write_wav(work / "mix.wav", 44100, 2, args.seconds, subtype="FLOAT", seed=1)
        if not args.bag_only:
            compare(wav, repo, name, work, args.rounds, args.stems, args.precision, "full separation",
                    lives=not args.no_lives, service=not args.no_service)
        if args.bag_vocals or args.bag_only:
            bag_repo = work / "bag-repo"
            bag_name = make_bag(repo, name, bag_repo)
            compare(wav, bag_repo, bag_name, work, args.rounds, "vocals", [], "vocals from a 4-model bag",
                    lives=False)


if __name__ == "__main__":
    main()
