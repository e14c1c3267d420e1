"""The engine against `python -m demucs.separate`: speed, memory and identity of output.

For one WAV and one demucs-format model folder, runs in this one process's lifetime,
alternating so that both see the same machine state:
  * demucs:  python -m demucs.separate --shifts 0 --overlap 0.25 --float32 --clip-mode none
  * engine:  worker.engine.separate_file (fp32, then each extra --precision)
each in a fresh subprocess, and prints wall time, real-time factor (wall / audio) and
peak RSS for both, their ratio, the max |Δ| between their stems, and for reduced
precisions the SNR against the engine's fp32 stems.

With --bag-vocals it also builds a 4-model bag of the model with one-hot weights (the
shape of htdemucs_ft: one specialist per source) and compares `stems=vocals` against
`demucs.separate --two-stems vocals` on that bag.

Usage:
  python bench/compare_demucs.py --model-repo DIR --model htdemucs [--seconds 60]
         [--precision bf16] [--bag-vocals] [--rounds 2]
Without --model-repo a tiny HT-Demucs is used (fast; only the ratios mean anything).
"""
from __future__ import annotations

import argparse
import copy
import os
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


def run_measured(args: list[str]) -> tuple[float, float]:
    """Run a command; returns (wall seconds, peak RSS in MB) of that process alone."""
    started = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} ... failed: {process.stderr.read().decode()[-2000:]}")
    process.stderr.close()
    return wall, usage.ru_maxrss / 1024


def read_stems(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem.replace("minus_", "no_"): sf.read(str(p), dtype="float64", always_2d=True)[0]
            for p in sorted(folder.glob("*.wav"))}


def demucs_command(wav: Path, repo: Path, name: str, out: Path, two_stems: str | None) -> list[str]:
    command = [sys.executable, "-m", "demucs.separate", "--repo", str(repo), "-n", name, "--shifts", "0",
               "--overlap", "0.25", "--float32", "--clip-mode", "none", "-d", "cpu", "-o", str(out)]
    if two_stems:
        command += ["--two-stems", two_stems, "--other-method", "minus"]
    return command + [str(wav)]


def engine_command(wav: Path, repo: Path, name: str, out: Path, stems: str, precision: str) -> list[str]:
    return [sys.executable, __file__, "--child", "--input", str(wav), "--model-repo", str(repo),
            "--model", name, "--out", str(out), "--stems", stems, "--precision", precision]


def child(args: argparse.Namespace) -> None:
    """Separate one file with the engine, as the worker does, into `args.out`."""
    import torch
    from demucs.pretrained import get_model

    from shared.audio import AudioWriter
    from worker.engine import SeparationOptions, separate_file

    torch.set_num_threads(os.cpu_count() or 1)
    model = get_model(args.model, repo=Path(args.model_repo)).eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    class FolderSink:
        def open_stem(self, name, samplerate, channels, subtype, frames):
            return AudioWriter(out / f"{name}.wav", samplerate, channels, subtype, frames)

        def publish(self, name):
            pass

    separate_file(model, Path(args.input), args.stems, FolderSink(),
                  SeparationOptions(precision=args.precision))


def snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    noise = np.sum((reference - estimate) ** 2)
    return float(10 * np.log10(np.sum(reference ** 2) / max(noise, 1e-20)))


def make_bag(repo: Path, name: str, target: Path) -> str:
    """A 4-model bag of `name`'s model with one-hot weights, like htdemucs_ft."""
    from demucs.apply import BagOfModels
    from demucs.pretrained import get_model

    from worker.model_repo import save_bag

    model = get_model(name, repo=repo)
    single = model.models[0] if hasattr(model, "models") else model
    sources = len(single.sources)
    copies = [copy.deepcopy(single) for _ in range(sources)]
    weights = [[1.0 if s == i else 0.0 for s in range(sources)] for i in range(sources)]
    save_bag(BagOfModels(copies, weights), target, f"{name}_bag")
    return f"{name}_bag"


def compare(wav: Path, repo: Path, name: str, work: Path, rounds: int, stems: str,
            precisions: list[str], label: str) -> None:
    duration = sf.info(str(wav)).duration
    two_stems = None if stems == "all" else stems
    results: dict[str, list[tuple[float, float]]] = {}
    outputs: dict[str, Path] = {}
    for round_index in range(rounds):
        for mode in ["demucs"] + [f"engine-{p}" for p in ["fp32"] + precisions]:
            out = work / f"{mode}-{round_index}"
            shutil.rmtree(out, ignore_errors=True)
            if mode == "demucs":
                command = demucs_command(wav, repo, name, out, two_stems)
            else:
                command = engine_command(wav, repo, name, out, stems, mode.split("-", 1)[1])
            results.setdefault(mode, []).append(run_measured(command))
            outputs[mode] = out / name / wav.stem if mode == "demucs" else out
    print(f"\n== {label}: {duration:.0f} s of 44.1 kHz stereo, model {name}, stems={stems}, "
          f"{os.cpu_count()} cores, best of {rounds}")
    base_wall = min(w for w, _ in results["demucs"])
    reference = read_stems(outputs["demucs"])
    fp32 = read_stems(outputs["engine-fp32"])
    for mode, runs in results.items():
        wall = min(w for w, _ in runs)
        rss = max(r for _, r in runs)
        line = (f"{mode:>14}: {wall:7.1f} s  RTF {wall / duration:5.2f}  peak RSS {rss:7.0f} MB  "
                f"speed vs demucs {base_wall / wall:5.2f}x")
        if mode != "demucs":
            stems_out = read_stems(outputs[mode])
            delta = max(np.abs(stems_out[k] - reference[k]).max() for k in reference)
            line += f"  max|Δ| vs demucs {delta:.2e}"
            if mode != "engine-fp32":
                snr = min(snr_db(fp32[k], stems_out[k]) for k in fp32)
                line += f"  SNR vs fp32 {snr:.1f} dB"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--model-repo")
    parser.add_argument("--model", default="htdemucs")
    parser.add_argument("--stems", default="all")
    parser.add_argument("--precision", action="append", default=[],
                        help="extra precision to measure (bf16, fp16); repeatable")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bag-vocals", action="store_true")
    parser.add_argument("--bag-only", action="store_true", help="skip the full separation")
    args = parser.parse_args()
    if args.child:
        args.precision = args.precision[0] if args.precision else "fp32"
        return child(args)

    from tests.audio_factory import write_wav
    from tests.tiny_models import write_tiny_repo

    with tempfile.TemporaryDirectory(prefix="demix-bench-") as scratch:
        work = Path(scratch)
        repo = Path(args.model_repo) if args.model_repo else write_tiny_repo(work / "tiny-repo")
        name = args.model if args.model_repo else "tiny"
        wav = write_wav(work / "mix.wav", 44100, 2, args.seconds, subtype="FLOAT", seed=1)
        if not args.bag_only:
            compare(wav, repo, name, work, args.rounds, args.stems, args.precision, "full separation")
        if args.bag_vocals or args.bag_only:
            bag_repo = work / "bag-repo"
            bag_name = make_bag(repo, name, bag_repo)
            compare(wav, bag_repo, bag_name, work, args.rounds, "vocals", [], "vocals from a 4-model bag")


if __name__ == "__main__":
    main()
