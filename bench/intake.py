"""What accepting a long MP3, M4A or FLAC costs the API, against separating the same track.

Writes a music-like 44.1 kHz stereo track (60 minutes by default), encodes it with the
real encoders (lame -V2, ffmpeg's AAC-LC at 192 kbit/s in M4A, flac), and runs intake
(`demix.intake.inspection.inspect_upload`, which decodes the whole upload into the job's WAV) on
each in a fresh subprocess that first imports the API (`demix.api.create_app`), as the API's
process has. It prints the seconds and the peak RSS of each, the WAV intake of the same
track for reference, and as ratios: intake time / separation time, and peak RSS / the
process's RSS before the probe.

The separation time of the track is estimated: the streaming engine (`bench/memory.py`'s
child) separates the first `--separation-minutes` of it and that time is scaled to the
full length (separation time is linear in length). With the default tiny HT-Demucs the
estimate is far below a real model's, so the printed time ratios are upper bounds.

    python bench/intake.py                       # 60 minutes, tiny model, 2-minute separation run
    python bench/intake.py --minutes 10 --model htdemucs --model-repo ~/models
"""
from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.memory import TINY, write_long_wav  # noqa: E402

ENCODINGS = {
    "mp3": lambda source, target: ["lame", "--quiet", "-V", "2", str(source), str(target)],
    "m4a": lambda source, target: ["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(source),
                                   "-c:a", "aac", "-b:a", "192k", str(target)],
    "flac": lambda source, target: ["flac", "-s", "-f", str(source), "-o", str(target)],
}
"""How each format is made from the WAV: the encoders users' files come from."""


def memory_status(field: str) -> int:
    """A field of this process's /proc status in bytes: VmRSS (resident now), VmHWM (its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def run_child(upload: Path) -> None:
    """In the subprocess: the API's imports, then one intake; print times and RSS as JSON."""
    importlib.import_module("demix.api")  # the API process's footprint: Flask, Redis client, Celery app
    from demix.config import Settings
    from demix.intake.inspection import inspect_upload

    # The imports' own transient peak is not the probe's: start the peak count afresh.
    Path("/proc/self/clear_refs").write_text("5")
    before = memory_status("VmRSS")
    started = time.monotonic()
    info = inspect_upload(upload, Settings())
    print(json.dumps({"wall_s": time.monotonic() - started, "rss_before": before, "frames": info.frames,
                      "peak_rss": memory_status("VmHWM"), "input_format": info.input_format}))


def measure_intake(upload: Path) -> dict:
    """One intake of a copy of `upload` (intake replaces what it decodes) in a fresh
    subprocess: its JSON, with the peak RSS while probing (VmHWM, reset after the imports)."""
    copy = upload.with_name("upload")
    shutil.copyfile(upload, copy)
    try:
        done = subprocess.run([sys.executable, __file__, "--child-intake", str(copy)], stdout=subprocess.PIPE,
                              text=True)
    finally:
        copy.unlink(missing_ok=True)
    if done.returncode != 0:
        raise SystemExit(f"intake of {upload.name} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_separation(track: Path, args: argparse.Namespace) -> float:
    """Seconds the streaming engine takes to separate `track` (bench/memory.py's child)."""
    with tempfile.TemporaryDirectory(dir=args.workdir) as out_dir:
        command = [sys.executable, str(ROOT / "bench" / "memory.py"), "--child", "streaming",
                   "--input", str(track), "--out", out_dir, "--model", args.model,
                   "--model-repo", args.model_repo]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["wall_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--separation-minutes", type=float, default=2,
                        help="length actually separated; its time is scaled to --minutes")
    parser.add_argument("--formats", nargs="+", choices=list(ENCODINGS), default=list(ENCODINGS))
    parser.add_argument("--model", default=TINY, help="a model name, or 'tiny' (default)")
    parser.add_argument("--model-repo", default="", help="demucs-format folder holding --model")
    parser.add_argument("--workdir", default=None, help="where the files go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the track and its encodings in --workdir, and reuse those found there")
    parser.add_argument("--child-intake", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_intake:
        run_child(args.child_intake)
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        folder = Path(args.workdir) if args.keep and args.workdir else Path(scratch)
        args.workdir = scratch
        track = folder / f"track-{args.minutes:g}min.wav"
        if not track.exists():
            write_long_wav(track, args.minutes)
        excerpt = folder / f"excerpt-{args.separation_minutes:g}min.wav"
        if not excerpt.exists():
            write_long_wav(excerpt, min(args.minutes, args.separation_minutes))
        print(f"track: {args.minutes:g} min, 44.1 kHz stereo, music-like; model {args.model}", flush=True)

        separation = measure_separation(excerpt, args) * args.minutes / min(args.minutes,
                                                                            args.separation_minutes)
        print(f"separation of the track: {separation:.1f} s (estimated: a {args.separation_minutes:g}-min "
              f"run scaled x{args.minutes / min(args.minutes, args.separation_minutes):g})", flush=True)

        rows = {}
        for name in args.formats:
            encoded = track.with_suffix(f".{name}")
            if not encoded.exists():
                started = time.monotonic()
                subprocess.run(ENCODINGS[name](track, encoded), check=True)
                print(f"encoded {name} in {time.monotonic() - started:.0f} s", flush=True)
            rows[name] = measure_intake(encoded) | {"size": encoded.stat().st_size}
        rows["wav (reference)"] = measure_intake(track) | {"size": track.stat().st_size}

        print(f"\n{'input':<16}{'format':<22}{'MiB':>8}{'intake s':>10}{'peak RSS MiB':>14}"
              f"{'RSS before':>12}{'peak/before':>13}{'intake/separation':>19}")
        # peak RSS: the API process's while probing; RSS before: after its imports, at rest.
        for name, row in rows.items():
            print(f"{name:<16}{row['input_format']:<22}{row['size'] / 2 ** 20:8.1f}{row['wall_s']:10.2f}"
                  f"{row['peak_rss'] / 2 ** 20:14.0f}{row['rss_before'] / 2 ** 20:12.0f}"
                  f"{row['peak_rss'] / row['rss_before']:13.2f}{row['wall_s'] / separation:19.4f}")


if __name__ == "__main__":
    main()
