"""`demix`: command-line entry point."""
from __future__ import annotations

import argparse
import os
import sys
import typing as tp
from pathlib import Path

from demix.config import Settings

from demix.cli import eval_command, model_commands as models, workflow_commands
from demix.cli.argv import api_argv, check_worker_models, flower_argv, worker_argv


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="demix", description="Music demixing service (Demucs).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("up", help="run Redis (unless DEMIX_REDIS_URL is set), a worker, the API and Flower, "
                                   "restarting any that dies")
    api = commands.add_parser("api", help="serve the HTTP API (behind its front: demix.api.front)")
    api.add_argument("--threads", type=int, help="threads running requests (DEMIX_API_THREADS)")
    worker = commands.add_parser("worker", help="run a Celery worker that separates jobs")
    worker.add_argument("--models", help="comma-separated models to serve, each loaded and warmed once; "
                                         "the worker consumes only their queues (DEMIX_WORKER_MODELS; "
                                         "default: all of DEMIX_MODELS)")
    worker.add_argument("--concurrency", type=int, help="jobs at once (DEMIX_WORKER_CONCURRENCY)")
    worker.add_argument("--loglevel", default="INFO")
    probe = commands.add_parser(
        "worker-probe", help="exit 0 when this machine's workers are live (their event loop turns) or "
                             "ready (a pool process warm): for Kubernetes' exec probes")
    probe.add_argument("check", choices=("live", "ready"))
    commands.add_parser("grpc", help="serve the original gRPC interface (demixing.proto) on DEMIX_GRPC_PORT")
    commands.add_parser("flower", help="serve Flower (Celery monitoring) on DEMIX_FLOWER_PORT, with the login "
                                       "DEMIX_FLOWER_AUTH (without one and with API keys: on 127.0.0.1 only)")
    commands.add_parser("config", help="print every DEMIX_* setting, its value and its meaning")
    models.add_parser(commands)
    workflow_commands.add_parser(commands)
    separate = commands.add_parser("separate", help="upload songs (WAV, FLAC, MP3, M4A, ...), or have the "
                                   "service fetch http(s) URLs, and download their stems")
    separate.add_argument("files", nargs="+", metavar="SONG_OR_URL",
                          help="audio files, or http(s) addresses the service fetches")
    separate.add_argument("--stems", default="all", help="all (default), or one source of the model "
                                                         "(htdemucs: drums, bass, vocals or other)")
    separate.add_argument("--model", help="one of the service's models (`GET /v1/models`); default: its default")
    chosen = separate.add_mutually_exclusive_group()
    chosen.add_argument("--workflow", type=Path, metavar="FILE",
                        help="instead of --model/--stems: a chain or ensemble of models, as a JSON file "
                             "(docs/workflows.md)")
    chosen.add_argument("--preset", help="instead of --model/--stems: a named workflow (`GET /v1/workflows`)")
    separate.add_argument("--server", help="service URL (default: http://DEMIX_HOST:DEMIX_PORT)")
    separate.add_argument("--api-key", help="API key sent as `Authorization: Bearer` (default: DEMIX_API_KEY)")
    separate.add_argument("-o", "--out", type=Path, default=Path("separated"),
                          help="folder for the stems, one sub-folder per file (default: ./separated)")
    eval_command.add_parser(commands)
    return parser


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"demix: {exc}", file=sys.stderr)
        return 2
    if args.command == "up":
        from demix.cli.supervisor import run_up
        return run_up(settings)
    if args.command == "api":
        _replace_process(api_argv(settings, args.threads))
    if args.command == "worker":
        if args.models is not None:
            try:
                settings = Settings.from_env(worker_models=args.models)
                check_worker_models(settings)
            except ValueError as exc:
                print(f"demix worker: {exc}", file=sys.stderr)
                return 2
            os.environ["DEMIX_WORKER_MODELS"] = args.models  # the Celery worker reads its settings anew
        _replace_process(worker_argv(settings, args.concurrency, args.loglevel))
    if args.command == "worker-probe":
        from demix.readiness import probe_workers
        passed, said = probe_workers(settings.data_dir, args.check)
        print(f"{args.check}: {said}" if passed else f"not {args.check}: {said}")
        return 0 if passed else 1
    if args.command == "grpc":
        from demix.grpc_api.server import serve
        return serve(settings)
    if args.command == "flower":
        return _run_flower(settings)
    if args.command == "separate":
        from demix.cli.client import run_separate
        server = args.server or f"http://{settings.host}:{settings.port}"
        return run_separate(server, args.files, args.stems, args.out,
                            api_key=args.api_key or settings.api_key or None, model=args.model,
                            workflow=args.workflow.read_text() if args.workflow else None, preset=args.preset)
    if args.command == "models":
        return models.run(args, settings)
    if args.command == "workflows":
        return workflow_commands.run(args, settings)
    if args.command == "eval":
        return eval_command.run(args, settings)
    if args.command == "config":
        for name, default, doc in Settings.describe():
            value = settings.shown_value(name[len("DEMIX_"):].lower())
            print(f"{name}={value}\n    {doc} (default: {default})")
        return 0
    raise AssertionError(args.command)


def _replace_process(argv: list[str]) -> tp.NoReturn:
    # exec, not a child: signals from docker or `demix up` reach gunicorn/celery directly.
    os.execv(argv[0], argv)


def _run_flower(settings: Settings) -> int:
    """`demix flower`: exec Flower as `demix up` runs it, its login in its environment."""
    from demix.cli.flower import flower_access_note, flower_environment

    if settings.flower_port == 0:
        print("demix flower: DEMIX_FLOWER_PORT is 0 (no Flower); set the port to serve it on", file=sys.stderr)
        return 2
    try:
        env = flower_environment(settings, os.environ)
    except ValueError as exc:
        print(f"demix flower: {exc}", file=sys.stderr)
        return 2
    if note := flower_access_note(settings):
        print(f"demix flower: {note}", file=sys.stderr, flush=True)
    argv = flower_argv(settings)
    os.execve(argv[0], argv, env)


if __name__ == "__main__":
    sys.exit(main())
