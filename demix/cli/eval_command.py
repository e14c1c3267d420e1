"""`demix eval`: score a model on a folder of songs with reference stems (`demix.evaluation`),
separated by the engine in this process or, with `--url`, by a running service."""
from __future__ import annotations

import argparse
import json
import sys
import typing as tp
from pathlib import Path

from tqdm import tqdm

from demix.config import Settings
from demix.errors import DemixError
from demix.evaluation import EngineSeparator, Report, Separator, Track, evaluate, evaluation_job, find_tracks

from demix.cli.client import Client, ClientError


def add_parser(commands: tp.Any) -> None:
    evaluation = commands.add_parser(
        "eval", help="separate a folder of songs that have reference stems (MUSDB18's layout: "
                     "<track>/mixture.wav, <track>/vocals.wav, ...) and print each stem's SDR")
    evaluation.add_argument("folder", type=Path, help="a folder of tracks (searched recursively), or one track")
    evaluation.add_argument("--model", help="the model to score (default: DEMIX_MODEL, or the service's default)")
    evaluation.add_argument("--stems", type=lambda value: [stem.strip() for stem in value.split(",") if stem.strip()],
                            metavar="STEM,...", help="score only these stems, comma-separated (default: every "
                                                     "stem with a reference that the model produces)")
    evaluation.add_argument("--url", "--server", dest="url",
                            help="separate through the service at this URL (default: the engine, in this process)")
    evaluation.add_argument("--api-key", help="API key for --url, sent as `Authorization: Bearer` "
                                              "(default: DEMIX_API_KEY)")
    evaluation.add_argument("--json", type=Path, metavar="PATH", help="also write the scores as JSON here")
    chosen = evaluation.add_mutually_exclusive_group()
    chosen.add_argument("--workflow", type=Path, metavar="FILE",
                        help="score a workflow (JSON file, docs/workflows.md) instead of a model; needs --url")
    chosen.add_argument("--preset", help="score a named workflow (GET /v1/workflows) instead of a model; needs --url")


class ServiceSeparator:
    """Separation by a running service: upload the mixture, follow the job, download its
    stems, then delete the job (the estimates are kept only as long as they are scored)."""

    def __init__(self, client: Client, job: tp.Mapping[str, str]):
        self.client, self.job = client, dict(job)

    def __call__(self, mixture: Path, folder: Path, progress: tp.Callable[[float], None]) -> dict[str, Path]:
        fields = dict(self.job)
        stems, model = fields.pop("stems", "all"), fields.pop("model", None)
        workflow, preset = fields.pop("workflow", None), fields.pop("preset", None)
        try:
            job = self.client.submit(mixture, stems, model=model, workflow=workflow, preset=preset, **fields)
            try:
                done = self.client.wait(job["id"], progress=lambda polled: progress(polled["progress"]))
                return self.client.download(job["id"], folder, job=done)
            finally:
                self.client.delete(job["id"])
        except ClientError as exc:
            raise DemixError(exc.message, code=exc.code) from exc


def run(args: argparse.Namespace, settings: Settings) -> int:
    """`demix eval`: returns the exit code (1 if a track failed or none was found)."""
    if not args.folder.is_dir():
        print(f"demix eval: {args.folder} is not a folder", file=sys.stderr)
        return 1
    try:
        tracks = find_tracks(args.folder)
    except DemixError as exc:
        print(f"demix eval: {exc.message}", file=sys.stderr)
        return 1
    if not tracks:
        print(f"demix eval: no track in {args.folder}: a track is a folder holding mixture.<ext> and "
              "<stem>.<ext> for each reference stem", file=sys.stderr)
        return 1
    if (args.workflow or args.preset) and not args.url:
        print("demix eval: a workflow runs on the service, its runs spread over the workers: give --url "
              "(e.g. http://127.0.0.1:8000 under `demix up`)", file=sys.stderr)
        return 2
    try:
        job = evaluation_job(args.model, args.workflow.read_text() if args.workflow else None, args.preset)
    except OSError as exc:
        print(f"demix eval: {exc}", file=sys.stderr)
        return 1
    try:
        if args.url:
            with Client(args.url, api_key=args.api_key or settings.api_key or None) as client:
                _check_service_model(client, args.model)
                report = _run_with_progress(tracks, ServiceSeparator(client, job), settings, args.stems)
        else:
            report = _run_with_progress(tracks, EngineSeparator(settings, job), settings, args.stems)
    except (DemixError, ClientError) as exc:  # no model, no service: nothing could be scored
        print(f"demix eval: {exc.message}", file=sys.stderr)
        return 1
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    failed = [track for track in report.tracks if track.error]
    for track in failed:
        print(f"demix eval: {track.name}: {track.error}", file=sys.stderr)
    for stem in [stem for stem in args.stems or () if stem not in report.stems]:
        print(f"demix eval: no track has a score for {stem!r}: the model has no such source, or no "
              "track a reference of it", file=sys.stderr)
    return 1 if failed else 0


def _check_service_model(client: Client, model: tp.Optional[str]) -> None:
    """Fail at once, not once per track, when the service is unreachable or lacks `model`."""
    served = [entry["name"] for entry in client.models()]
    if model and model not in served:
        raise ClientError("unknown_model", f"the service has no model {model!r}; it serves {', '.join(served)}")


def _run_with_progress(tracks: list[Track], separate: Separator, settings: Settings,
                       stems: tp.Optional[list[str]]) -> Report:
    with tqdm(total=len(tracks), unit="track", bar_format="{desc}: {n:.2f}/{total} tracks|{bar}| {elapsed}") as bar:
        def on_progress(index: int, track: Track, fraction: float) -> None:
            bar.set_description_str(track.name, refresh=False)
            bar.n = round(index + fraction, 2)
            bar.refresh()

        return evaluate(tracks, separate, settings, stems, on_progress)
