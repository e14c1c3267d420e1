"""Peak memory of the streamed ensemble (`demix.separation.ensemble.ensemble_files`) on long
tracks: flat memory means the longest track's peak is about the shortest's.

Writes three different 44.1 kHz stereo 16-bit WAVs per length (a shared tune at
different levels plus each its own noise: three models' takes on one source), block
by block, then ensembles them once per algorithm in a fresh subprocess and prints that
process's peak RSS (VmHWM, from wait4), the peak of Python's traced allocations
(tracemalloc: NumPy's arrays included) during the ensemble alone, wall time and
real-time factor, then each algorithm's ratio of the longest track's peaks to the
shortest's (target <= 1.1).

    python bench/ensemble_memory.py                                   # 5 and 40 minutes
    python bench/ensemble_memory.py --minutes 1 10 --algorithms max_wave avg_fft
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SAMPLERATE = 44100
INPUTS = 3  # models ensembled
GENERATE_BLOCK_FRAMES = 1 << 20  # ~24 s of audio generated at a time


def write_take(path: Path, minutes: float, take: int) -> None:
    """One model's take on a source: a tune shared by all takes, at this take's level, and
    noise of its own, written block by block."""
    import soundfile as sf

    frames = int(minutes * 60 * SAMPLERATE)
    rng = np.random.default_rng(take)
    with sf.SoundFile(str(path), "w", SAMPLERATE, 2, "PCM_16", format="WAV") as out:
        for start in range(0, frames, GENERATE_BLOCK_FRAMES):
            t = np.arange(start, min(frames, start + GENERATE_BLOCK_FRAMES)) / SAMPLERATE
            tune = 0.2 * np.sin(2 * np.pi * 110 * t) + 0.1 * np.sin(2 * np.pi * 660 * t)
            noise = 0.05 * rng.standard_normal((len(t), 2))
            out.write((0.6 + 0.2 * take) * np.stack([tune, 0.9 * tune], axis=1) + noise)


def run_child(algorithm: str, inputs: list[Path], output: Path, block_frames: int) -> None:
    """In the subprocess: ensemble `inputs` once and print the traced peak and wall time as JSON."""
    import tracemalloc

    from demix.separation.ensemble import ensemble_files

    tracemalloc.start()
    started = time.monotonic()
    ensemble_files(inputs, output, algorithm, block_frames=block_frames)
    wall = time.monotonic() - started
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({"wall_s": wall, "traced_peak": traced_peak}))


def measure(algorithm: str, inputs: list[Path], minutes: float, workdir: str,
            block_frames: int) -> tuple[int, int]:
    """Ensemble in a fresh subprocess; print and return its peak RSS and traced peak in bytes."""
    with tempfile.TemporaryDirectory(dir=workdir) as out_dir:
        command = [sys.executable, __file__, "--child", algorithm, "--output", str(Path(out_dir) / "out.wav"),
                   "--block-frames", str(block_frames), "--inputs", *map(str, inputs)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        output = process.stdout.read()
        # wait4 gives this child's own rusage (RUSAGE_CHILDREN would mix all children).
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{algorithm} on {minutes:g} min failed")
    result = json.loads(output.strip().splitlines()[-1])
    peak = usage.ru_maxrss * 1024  # Linux reports kilobytes
    print(f"{algorithm:>11}  {minutes:5g} min  peak RSS {peak / 2 ** 20:7.1f} MiB  "
          f"traced {result['traced_peak'] / 2 ** 20:6.1f} MiB  wall {result['wall_s']:7.1f} s  "
          f"real-time factor {result['wall_s'] / (minutes * 60):.4f}", flush=True)
    return peak, result["traced_peak"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[5, 40])
    parser.add_argument("--algorithms", nargs="+", default=["avg_fft", "median_fft"])
    parser.add_argument("--block-frames", type=int, default=None,
                        help="samples per block (default: the module's BLOCK_FRAMES)")
    parser.add_argument("--workdir", default=None, help="where the WAVs go (default: a temp dir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from demix.separation.ensemble import BLOCK_FRAMES, check_algorithm

    block_frames = args.block_frames or BLOCK_FRAMES
    if args.child:
        run_child(args.child, args.inputs, args.output, block_frames)
        return
    for algorithm in args.algorithms:
        check_algorithm(algorithm)

    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        print(f"{INPUTS} inputs per ensemble; tracks {', '.join(f'{m:g}' for m in args.minutes)} min, "
              f"44.1 kHz stereo PCM_16; blocks of {block_frames} samples", flush=True)
        peaks: dict[str, dict[float, tuple[int, int]]] = {algorithm: {} for algorithm in args.algorithms}
        for minutes in sorted(args.minutes):
            inputs = [Path(workdir) / f"take{take}-{minutes:g}min.wav" for take in range(INPUTS)]
            for take, path in enumerate(inputs):
                write_take(path, minutes, take)
            for algorithm in args.algorithms:
                peaks[algorithm][minutes] = measure(algorithm, inputs, minutes, workdir, block_frames)
            for path in inputs:
                path.unlink()
        if len(args.minutes) > 1:
            longest, shortest = max(args.minutes), min(args.minutes)
            for algorithm in args.algorithms:
                (long_rss, long_traced), (short_rss, short_traced) = peaks[algorithm][longest], peaks[algorithm][shortest]
                print(f"{algorithm} peak {longest:g} min / {shortest:g} min: RSS {long_rss / short_rss:.3f}, "
                      f"traced {long_traced / short_traced:.3f} (target <= 1.1)")


if __name__ == "__main__":
    main()
