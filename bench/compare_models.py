"""HT-Demucs against a viperx-sized BS-RoFormer through the engine: seconds per audio
minute, fp32 and bf16, on the same clip.

Both models have random weights (only the time is measured): htdemucs is the released
architecture (`demix.separation.weights.convert.build_htdemucs`, in a one-model bag as the
service loads it), the BS-RoFormer is built from viperx's ep_317 config (dim 512,
depth 12, 8 s windows overlapping by half; `tests/data/roformer/msst_configs/`). Each
runs `demix.separation.engine.separate_file` on one synthetic stereo 44.1 kHz clip (all stems,
kept in memory for the SNR), in this process, rounds interleaved so that all see
the same machine state; medians are printed, with the ratio to htdemucs fp32 and, for
bf16, each model's stems' SNR against its own fp32 stems.

bf16 on a CPU without bf16 kernels (no AVX-512 BF16 / AMX): the service warns and runs
fp32 (`demix.separation.forward.autocast_dtype`). To show what the bf16 copy would cost there,
this script forces it (`--force-bf16`, the default on such CPUs) and says so.

Usage:
  python bench/compare_models.py [--seconds 30] [--rounds 1] [--threads N] [--models htdemucs,bs_roformer]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testkit.memory_sink import MemorySink, separate, stems_snr_db  # noqa: E402

VIPERX_CONFIG = ROOT / "tests" / "data" / "roformer" / "msst_configs" / "model_bs_roformer_ep_317_sdr_12.9755.yaml"
SAMPLERATE = 44100


def synthetic_clip(path: Path, seconds: float) -> None:
    """A stereo float WAV: a bass line, a melody, clicks and noise."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SAMPLERATE)) / SAMPLERATE
    signal = 0.2 * np.sin(2 * np.pi * 55 * t) + 0.12 * np.sin(2 * np.pi * 440 * t * (1 + 0.01 * np.sin(t)))
    signal[::SAMPLERATE // 2] += 0.3
    clip = np.stack([signal + 0.03 * rng.standard_normal(len(t)) for _ in range(2)], axis=1)
    sf.write(str(path), clip.astype(np.float32), SAMPLERATE, subtype="FLOAT")


def build_models(names: tp.Sequence[str]) -> dict[str, tp.Any]:
    import torch
    from demucs.apply import BagOfModels

    from demix.separation.roformer import build_model, read_config
    from demix.separation.weights.convert import build_htdemucs

    torch.manual_seed(0)
    models: dict[str, tp.Any] = {}
    if "htdemucs" in names:
        models["htdemucs"] = BagOfModels([build_htdemucs().eval()])
    if "bs_roformer" in names:
        models["bs_roformer"] = build_model(read_config(VIPERX_CONFIG))
    return models


def warm(model: tp.Any, precision: str) -> None:
    """Pay the one-time costs (the bf16 copy, oneDNN's kernel choice) outside the timing:
    htdemucs as a worker does at start-up; a RoFormer on one second of silence (its
    full 8-s window costs a minute on a small CPU and teaches oneDNN nothing more)."""
    import torch

    from demix.separation import forward
    from demix.separation.roformer import is_roformer

    if is_roformer(model):
        with torch.inference_mode():
            forward.ModelForward("cpu", precision)(model, torch.zeros(1, 2, SAMPLERATE))
    else:
        forward.warm_model(model, "cpu", precision)


def separate_timed(model: tp.Any, clip: Path, precision: str) -> tuple[float, MemorySink]:
    """Seconds to separate `clip` into all stems (kept in memory, for the SNR), and the stems."""
    started = time.perf_counter()
    sink = separate(model, clip, "all", precision=precision)
    return time.perf_counter() - started, sink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="clip length")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--models", default="htdemucs,bs_roformer")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--force-bf16", choices=("auto", "yes", "no"), default="auto",
                        help="run the CPU bf16 copy even without bf16 kernels (auto: yes, and say so)")
    args = parser.parse_args()

    import torch

    from demix.separation import forward

    if args.threads:
        torch.set_num_threads(args.threads)
    native_bf16 = forward.cpu_supports_bf16()
    forced = args.force_bf16 == "yes" or (args.force_bf16 == "auto" and not native_bf16)
    if forced:
        forward.cpu_supports_bf16 = lambda: True  # measure the bf16 copy, not the fp32 fallback
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    print(f"CPU bf16 kernels (oneDNN): {'yes' if native_bf16 else 'no'}"
          f"{'; bf16 below FORCES the bf16 copy (the service would warn and run fp32 here)' if forced else ''}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, clip {args.seconds:g} s, "
          f"{args.rounds} round(s)")

    models = build_models(names)
    timings: dict[tuple[str, str], list[float]] = {(n, p): [] for n in names for p in precisions}
    sinks: dict[tuple[str, str], MemorySink] = {}
    with tempfile.TemporaryDirectory() as scratch:
        clip = Path(scratch) / "clip.wav"
        synthetic_clip(clip, args.seconds)
        # Precision outermost, so the fp32 figures come first (bf16 can be slow on a CPU
        # without native bf16); each pair warmed just before its first run.
        for round_ in range(args.rounds):
            for precision in precisions:
                for name, model in models.items():
                    if round_ == 0:
                        warm(model, precision)
                    seconds, sink = separate_timed(model, clip, precision)
                    timings[name, precision].append(seconds)
                    sinks[name, precision] = sink
                    print(f"  {name:12s} {precision}: {seconds:8.1f} s", flush=True)

    minutes = args.seconds / 60
    baseline = statistics.median(timings[names[0], precisions[0]]) / minutes
    print(f"\n{'model':12s} {'precision':9s} {'s / audio min':>14s} {'vs ' + names[0] + ' ' + precisions[0]:>20s}"
          f" {'SNR vs fp32 (dB)':>18s}")
    for name in names:
        for precision in precisions:
            per_minute = statistics.median(timings[name, precision]) / minutes
            snr = ""
            if precision != "fp32" and (name, "fp32") in sinks:
                snrs = stems_snr_db(sinks[name, "fp32"], sinks[name, precision])
                snr = ", ".join(f"{stem} {value:.1f}" for stem, value in snrs.items())
            print(f"{name:12s} {precision:9s} {per_minute:14.1f} {per_minute / baseline:19.2f}x {snr:>18s}")


if __name__ == "__main__":
    main()
