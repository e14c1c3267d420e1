"""Peak memory of the streaming engine on long tracks, against the whole-track approach.

Generates 44.1 kHz stereo 16-bit WAVs of the given lengths on disk (block by block),
separates each in a fresh subprocess and prints that process's peak RSS, wall time and
real-time factor (wall time / audio time), then the ratio of the longest track's peak
to the shortest's (flat memory: about 1). For comparison it also runs the whole-track
approach (`apply_model` on the entire mix, as the engine did before streaming) on the
shortest track.

    python bench/memory.py                         # tiny HT-Demucs, 10 and 60 minutes
    python bench/memory.py --model-repo ~/models --model htdemucs --minutes 10
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
GENERATE_BLOCK_FRAMES = 1 << 20  # ~24 s of audio generated at a time
TINY = "tiny"  # --model value meaning the test suite's tiny HT-Demucs, random weights


def write_long_wav(path: Path, minutes: float) -> None:
    """A music-like stereo WAV (bass, melody, clicks, noise), written block by block."""
    import soundfile as sf

    frames = int(minutes * 60 * SAMPLERATE)
    rng = np.random.default_rng(0)
    with sf.SoundFile(str(path), "w", SAMPLERATE, 2, "PCM_16", format="WAV") as out:
        for start in range(0, frames, GENERATE_BLOCK_FRAMES):
            t = np.arange(start, min(frames, start + GENERATE_BLOCK_FRAMES)) / SAMPLERATE
            bass = 0.2 * np.sin(2 * np.pi * 55 * t)
            melody = 0.12 * np.sin(2 * np.pi * 440 * t * (1 + 0.01 * np.sin(2 * np.pi * 0.5 * t)))
            clicks = 0.3 * (np.arange(start, start + len(t)) % (SAMPLERATE // 2) == 0)
            noise = 0.03 * rng.standard_normal((len(t), 2))
            out.write(np.stack([bass + melody + clicks, bass + 1.2 * melody + clicks], 1) + noise)


def load(model_name: str, model_repo: str):
    if model_name == TINY:
        import torch
        from demucs.htdemucs import HTDemucs

        torch.manual_seed(0)  # the configuration of tests.conftest.make_tiny_htdemucs
        return HTDemucs(sources=["drums", "bass", "other", "vocals"], channels=8, depth=4,
                        t_layers=1, t_heads=2, bottom_channels=0).eval()
    from worker.models import ModelSpec, load_model
    return load_model(ModelSpec(model_name, repo=model_repo))


def run_child(approach: str, input_path: Path, out_dir: Path, model_name: str, model_repo: str) -> None:
    """In the subprocess: separate `input_path` one way and print the wall time as JSON."""
    import torch

    model = load(model_name, model_repo)
    started = time.monotonic()
    if approach == "streaming":
        from shared.audio import read_info
        from shared.output import resolve_output
        from shared.storage import JobStorage
        from worker.engine import separate_file
        from worker.stem_files import JobStemSink

        output = resolve_output({}, read_info(input_path))  # the input's own format, as by default
        storage = JobStorage(out_dir)
        storage.job_dir("bench").mkdir(parents=True, exist_ok=True)  # as accepting an upload makes it
        separate_file(model, input_path, "all", JobStemSink(storage, "bench", output), output=output)
    else:
        from demucs.apply import apply_model

        from shared.audio import quantize, read_audio, write_audio

        wav, _ = read_audio(input_path)
        mix = torch.from_numpy(np.ascontiguousarray(wav.T))
        ref = mix.mean(0)
        mean, std = ref.mean(), ref.std() + 1e-8
        with torch.inference_mode():
            out = apply_model(model, ((mix - mean) / std)[None], split=True, overlap=0.25)[0] * std + mean
        for name, stem in zip(model.sources, out):
            write_audio(out_dir / f"{name}.wav", quantize(stem.T.numpy(), "PCM_16"), SAMPLERATE, "PCM_16")
    print(json.dumps({"wall_s": time.monotonic() - started}))


def measure(approach: str, input_path: Path, minutes: float, args: argparse.Namespace) -> int:
    """Run one separation in a fresh subprocess; print and return its peak RSS in bytes."""
    with tempfile.TemporaryDirectory(dir=args.workdir) as out_dir:
        command = [sys.executable, __file__, "--child", approach, "--input", str(input_path),
                   "--out", out_dir, "--model", args.model, "--model-repo", args.model_repo]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        output = process.stdout.read()
        # wait4 gives this child's own rusage (RUSAGE_CHILDREN would mix all children).
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{approach} on {input_path.name} failed with exit code {process.returncode}")
    wall = json.loads(output.strip().splitlines()[-1])["wall_s"]
    peak = usage.ru_maxrss * 1024  # Linux reports kilobytes
    print(f"{approach:>10}  {minutes:5g} min  peak RSS {peak / 2 ** 20:8.0f} MiB  "
          f"wall {wall:8.1f} s  real-time factor {wall / (minutes * 60):.3f}", flush=True)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[10, 60])
    parser.add_argument("--model", default=TINY, help="a model name, or 'tiny' (default)")
    parser.add_argument("--model-repo", default="", help="demucs-format folder holding --model")
    parser.add_argument("--workdir", default=None, help="where the WAVs go (default: a temp dir)")
    parser.add_argument("--skip-whole-track", action="store_true",
                        help="do not run the whole-track comparison")
    parser.add_argument("--child", choices=["streaming", "whole-track"], help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.input, args.out, args.model, args.model_repo)
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        args.workdir = workdir
        print(f"model {args.model}; tracks {', '.join(f'{m:g}' for m in args.minutes)} min, "
              f"44.1 kHz stereo PCM_16", flush=True)
        peaks = {}
        for minutes in sorted(args.minutes):
            path = Path(workdir) / f"track-{minutes:g}min.wav"
            write_long_wav(path, minutes)
            peaks[minutes] = measure("streaming", path, minutes, args)
            if minutes == min(args.minutes) and not args.skip_whole_track:
                whole = measure("whole-track", path, minutes, args)
                print(f"whole-track / streaming peak at {minutes:g} min: {whole / peaks[minutes]:.2f}")
            path.unlink()
        if len(peaks) > 1:
            longest, shortest = max(peaks), min(peaks)
            print(f"streaming peak {longest:g} min / {shortest:g} min: "
                  f"{peaks[longest] / peaks[shortest]:.3f} (target <= 1.1)")


if __name__ == "__main__":
    main()
