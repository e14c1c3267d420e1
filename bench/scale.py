"""One long track on one worker against two workers sharing it (a split job).

Starts a private Redis and `demix worker` processes (one prefork child, one torch
thread each) in a scratch folder, then separates the same WAV twice, in this run:
  * one worker, `DEMIX_SPLIT_S=0` (the job runs whole);
  * two workers, `DEMIX_SPLIT_S` set so the job splits into one part per worker (a
    chord of parts, then the merge);
timing each from enqueueing to `succeeded` (the workers are warmed first by a short
job each, so model loading is not timed), and prints both times, their ratio and the
max |Δ| between the two runs' stems (float32 WAV). Usage:
  python bench/scale.py [--seconds 600] [--model tiny | --model htdemucs --model-repo DIR]
                        [--precision fp32 | bf16]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._live_service import (add_track_and_model_arguments, max_stem_difference, model_repo,  # noqa: E402
                                  time_job_on_workers, worker_environment)
from demix.cli.redis_server import RedisServer  # noqa: E402
from testkit.synthetic_audio import write_wav  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_track_and_model_arguments(parser)
    parser.add_argument("--workers", type=int, default=2, help="workers of the split run")
    parser.add_argument("--precision", default="fp32", help="DEMIX_PRECISION of both runs (fp32, bf16)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="demix-scale-") as tmp:
        scratch = Path(tmp)
        repo = model_repo(parser, args, scratch)
        wav = write_wav(scratch / "track.wav", 44100, 2, args.seconds)
        with RedisServer(scratch / "redis", persist=False) as server:
            env = worker_environment(server.url, scratch / "data", args.model, repo,
                                     DEMIX_PRECISION=args.precision)
            one = time_job_on_workers(scratch, dict(env, DEMIX_SPLIT_S="0"), 1, wav, "one")
            split_s = str(max(1, math.ceil(args.seconds / args.workers)))
            many = time_job_on_workers(scratch, dict(env, DEMIX_SPLIT_S=split_s), args.workers, wav, "split")
            difference = max_stem_difference(one, many)
    print(f"input: {args.seconds:.0f} s stereo 44.1 kHz, stems=all, model {args.model} in {args.precision}, "
          f"{os.cpu_count()} cores, one torch thread per worker")
    print(f"  one worker, unsplit:               {one.seconds:8.2f} s")
    print(f"  {args.workers} workers, split (DEMIX_SPLIT_S={split_s}): {many.seconds:8.2f} s")
    print(f"  ratio split / one: {many.seconds / one.seconds:.3f} (target <= 0.6 with 2 workers on 2 free cores)")
    print(f"  max |delta| between their stems: {difference:.2e}")


if __name__ == "__main__":
    main()
