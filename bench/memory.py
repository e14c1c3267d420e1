"""Peak memory of the streaming engine on long tracks, unsplit and split, against the
whole-track approach.

Generates 44.1 kHz stereo 16-bit WAVs of the given lengths on disk (block by block),
separates each in a fresh subprocess and prints that process's peak RSS (VmHWM: file
pages mapped into it count too), its peak anonymous RSS (RssAnon, sampled), wall time
and real-time factor (wall time / audio time), then the ratio of the longest track's
peaks to the shortest's (flat memory: about 1). Each track runs twice: `streaming`
(never split) and `split` (as a worker with `DEMIX_SPLIT_S=--split-s`: a track longer
than that is prepared, run part by part and merged in the one process, so its peak is
the highest of all those steps; a shorter one runs unsplit). For comparison it also
runs the whole-track approach (`apply_model` on the entire mix, as the engine did
before streaming) on the shortest track.

    python bench/memory.py                         # tiny HT-Demucs, 10 and 60 minutes
    python bench/memory.py --minutes 5 40          # the split path's 40 min against 5
    python bench/memory.py --model-repo ~/models --model htdemucs --minutes 10
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SAMPLERATE = 44100
GENERATE_BLOCK_FRAMES = 1 << 20  # ~24 s of audio generated at a time
TINY = "tiny"  # --model value meaning the test suite's tiny HT-Demucs, random weights
SAMPLE_INTERVAL_S = 0.02  # how often the child's anonymous RSS is read


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
    from demix.separation.models import ModelSpec, load_model
    return load_model(ModelSpec(model_name, repo=model_repo))


def run_child(approach: str, input_path: Path, out_dir: Path, model_name: str, model_repo: str,
              split_s: float) -> None:
    """In the subprocess: separate `input_path` one way and print the wall time as JSON."""
    import torch

    model = load(model_name, model_repo)
    started = time.monotonic()
    if approach == "split":
        from demix.audio.io import read_info
        from demix.audio.output_formats import default_output
        from demix.storage.local import JobStorage
        from demix.separation.engine import SeparationOptions, separate_file, stem_layout
        from demix.separation.split import merge_split, prepare_split, run_part, single_pass
        from demix.separation.stem_files import JobStemSink

        info = read_info(input_path)
        output = default_output(info)
        storage = JobStorage(out_dir)
        storage.job_dir("bench").mkdir(parents=True, exist_ok=True)
        sink = JobStemSink(storage, "bench", output)
        if model.__class__.__name__ != "BagOfModels":
            from demucs.apply import BagOfModels
            model = BagOfModels([model])
        layout = stem_layout(model, input_path, "all", output)
        if split_s <= 0 or info.duration <= split_s or single_pass(model, layout.sources) is None:
            separate_file(model, input_path, "all", sink, output=output)
        else:
            files = storage.begin_split("bench", 1)
            plan = prepare_split(model, input_path, layout, 0.25, int(split_s * model.samplerate), files)
            for index in range(len(plan.parts)):
                run_part(model, layout, plan, index, files, SeparationOptions())
            merge_split(model, input_path, layout, plan, files, sink)
    elif approach == "streaming":
        from demix.audio.io import read_info
        from demix.audio.output_formats import default_output
        from demix.storage.local import JobStorage
        from demix.separation.engine import separate_file
        from demix.separation.stem_files import JobStemSink

        output = default_output(read_info(input_path))  # the input's own format, as by default
        storage = JobStorage(out_dir)
        storage.job_dir("bench").mkdir(parents=True, exist_ok=True)  # as an accepted upload makes it
        separate_file(model, input_path, "all", JobStemSink(storage, "bench", output), output=output)
    else:
        from demucs.apply import apply_model

        from demix.audio.io import quantize, read_audio, write_audio

        wav, _ = read_audio(input_path)
        mix = torch.from_numpy(np.ascontiguousarray(wav.T))
        ref = mix.mean(0)
        mean, std = ref.mean(), ref.std() + 1e-8
        with torch.inference_mode():
            out = apply_model(model, ((mix - mean) / std)[None], split=True, overlap=0.25)[0] * std + mean
        for name, stem in zip(model.sources, out):
            write_audio(out_dir / f"{name}.wav", quantize(stem.T.numpy(), "PCM_16"), SAMPLERATE, "PCM_16")
    print(json.dumps({"wall_s": time.monotonic() - started}))


def anonymous_rss(pid: int) -> int:
    """A process's anonymous resident memory in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def measure(approach: str, input_path: Path, minutes: float, args: argparse.Namespace) -> tuple[int, int]:
    """Run one separation in a fresh subprocess; print and return its peak RSS and peak
    anonymous RSS in bytes."""
    with tempfile.TemporaryDirectory(dir=args.workdir) as out_dir:
        command = [sys.executable, __file__, "--child", approach, "--input", str(input_path),
                   "--out", out_dir, "--model", args.model, "--model-repo", args.model_repo,
                   "--split-s", str(args.split_s)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        peak_anonymous = 0
        finished = threading.Event()

        def sample() -> None:
            nonlocal peak_anonymous
            while not finished.wait(SAMPLE_INTERVAL_S):
                peak_anonymous = max(peak_anonymous, anonymous_rss(process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        output = process.stdout.read()
        finished.set()
        sampler.join()
        # wait4 gives this child's own rusage (RUSAGE_CHILDREN would mix all children).
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{approach} on {input_path.name} failed with exit code {process.returncode}")
    wall = json.loads(output.strip().splitlines()[-1])["wall_s"]
    peak = usage.ru_maxrss * 1024  # Linux reports kilobytes
    print(f"{approach:>11}  {minutes:5g} min  peak RSS {peak / 2 ** 20:8.0f} MiB  "
          f"anonymous {peak_anonymous / 2 ** 20:8.0f} MiB  "
          f"wall {wall:8.1f} s  real-time factor {wall / (minutes * 60):.3f}", flush=True)
    return peak, peak_anonymous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[10, 60])
    parser.add_argument("--model", default=TINY, help="a model name, or 'tiny' (default)")
    parser.add_argument("--model-repo", default="", help="demucs-format folder holding --model")
    parser.add_argument("--workdir", default=None, help="where the WAVs go (default: a temp dir)")
    parser.add_argument("--skip-whole-track", action="store_true",
                        help="do not run the whole-track comparison")
    parser.add_argument("--split-s", type=float, default=600.0,
                        help="DEMIX_SPLIT_S of the split runs (default: 600, the setting's default)")
    parser.add_argument("--skip-split", action="store_true", help="do not run the split path")
    parser.add_argument("--skip-unsplit", action="store_true", help="run only the split path")
    parser.add_argument("--child", choices=["streaming", "split", "whole-track"], help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.input, args.out, args.model, args.model_repo, args.split_s)
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        args.workdir = workdir
        print(f"model {args.model}; tracks {', '.join(f'{m:g}' for m in args.minutes)} min, "
              f"44.1 kHz stereo PCM_16", flush=True)
        approaches = ([] if args.skip_unsplit else ["streaming"]) + ([] if args.skip_split else ["split"])
        peaks: dict[str, dict[float, tuple[int, int]]] = {approach: {} for approach in approaches}
        for minutes in sorted(args.minutes):
            path = Path(workdir) / f"track-{minutes:g}min.wav"
            write_long_wav(path, minutes)
            for approach in approaches:
                peaks[approach][minutes] = measure(approach, path, minutes, args)
            if minutes == min(args.minutes) and not args.skip_whole_track and "streaming" in peaks:
                whole, _ = measure("whole-track", path, minutes, args)
                print(f"whole-track / streaming peak at {minutes:g} min: "
                      f"{whole / peaks['streaming'][minutes][0]:.2f}")
            path.unlink()
        if len(args.minutes) > 1:
            longest, shortest = max(args.minutes), min(args.minutes)
            for approach in approaches:
                (long_rss, long_anonymous), (short_rss, short_anonymous) = (
                    peaks[approach][longest], peaks[approach][shortest])
                print(f"{approach} peak {longest:g} min / {shortest:g} min: RSS {long_rss / short_rss:.3f}, "
                      f"anonymous {long_anonymous / short_anonymous:.3f} (target <= 1.1)")

if __name__ == "__main__":
    main()
