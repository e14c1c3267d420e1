"""What the service costs on top of the model: one 3-minute stereo WAV end to end.

Starts `demix up` with a tiny HT-Demucs (the real class, small width) in a scratch
folder, then for the same WAV measures, in this run:
  * end to end: POST /v1/jobs -> poll until succeeded -> download every stem (the
    first and the second job of a worker that warmed up when it started);
  * the model alone: demucs' normalise + apply_model + de-normalise on the same audio,
    in this process, with the same thread count as the worker;
and prints both and their ratio. Usage: python bench/service_overhead.py [--seconds 180]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._live_service import running_service, time_job  # noqa: E402
from testkit.synthetic_audio import write_wav  # noqa: E402
from testkit.tiny_models import make_tiny_htdemucs, write_tiny_repo  # noqa: E402


def model_alone(path: Path) -> float:
    import soundfile as sf
    import torch
    from demucs.apply import apply_model

    model = make_tiny_htdemucs()
    wav = torch.from_numpy(sf.read(str(path), dtype="float32")[0].T.copy())
    started = time.perf_counter()
    ref = wav.mean(0)
    with torch.inference_mode():
        out = apply_model(model, ((wav - ref.mean()) / ref.std())[None], shifts=0, overlap=0.25)
    (out * ref.std() + ref.mean()).numpy()
    return time.perf_counter() - started


def end_to_end(path: Path, scratch: Path, stems: str) -> dict[str, float]:
    settings = {"DEMIX_MODEL": "tiny", "DEMIX_MODEL_REPO": str(write_tiny_repo(scratch / "models"))}
    with running_service(scratch, settings) as service:
        return {"ready": service.ready_s,
                "first job": time_job(service.url, path, stems, scratch / "first"),
                "second job": time_job(service.url, path, stems, scratch / "second")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--stems", default="all")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as scratch:
        path = write_wav(Path(scratch) / "song.wav", 44100, 2, args.seconds, subtype="PCM_16")
        timings = end_to_end(path, Path(scratch), args.stems)
        alone = model_alone(path)
    warm = timings["second job"]
    print(f"input: {args.seconds:.0f} s stereo 44.1 kHz PCM16, stems={args.stems}, tiny HT-Demucs, "
          f"{os.cpu_count()} cores")
    print(f"  demix up ready (model loaded and warmed) after {timings['ready']:.2f} s")
    for name in ("first job", "second job"):
        print(f"  end to end, {name}: {timings[name]:.2f} s")
    print(f"  model alone (normalise + apply_model), same audio: {alone:.2f} s")
    print(f"  service overhead (second job): {warm - alone:+.2f} s = {warm / alone:.2f}x the model alone")

if __name__ == "__main__":
    main()
