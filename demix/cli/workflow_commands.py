"""`demix workflows`: add, list and remove the named workflows (presets) jobs choose with
`preset=NAME` (`demix.workflows.presets`; the file is DEMIX_WORKFLOWS)."""
from __future__ import annotations

import argparse
import json
import sys
import typing as tp
from pathlib import Path

from demix.config import Settings


def add_parser(commands: tp.Any) -> None:
    workflows = commands.add_parser("workflows", help="add, list and remove named workflows (presets)")
    actions = workflows.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="check a workflow (JSON or YAML) against the served models and save it "
                                         "as preset NAME in DEMIX_WORKFLOWS")
    add.add_argument("name", help="the preset's name (what a job's `preset` says)")
    add.add_argument("file", type=Path, help="the workflow: {\"steps\": [...], \"outputs\": {...}}")
    add.add_argument("--description", default="", help="a line shown by GET /v1/workflows and the web page")
    actions.add_parser("list", help="list the presets, the models each needs, and whether it can run here")
    remove = actions.add_parser("remove", help="remove preset NAME from DEMIX_WORKFLOWS")
    remove.add_argument("name")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from demix.errors import DemixError
    from demix.workflows.presets import add_preset, all_presets, read_presets_file, remove_preset

    try:
        if args.action == "add":
            path = add_preset(settings, args.name, args.file.read_text(), args.description)
            print(f"preset {args.name} saved in {path}; jobs choose it with preset={args.name}")
            return 0
        if args.action == "remove":
            if not remove_preset(settings, args.name):
                print(f"demix workflows remove: {settings.workflows_file} has no preset {args.name!r}",
                      file=sys.stderr)
                return 1
            print(f"preset {args.name} removed from {settings.workflows_file}")
            return 0
        read_presets_file(settings.workflows_file)  # a broken file is said here, not skipped
        for preset in all_presets(settings):
            state = "enabled" if preset.disabled is None else f"disabled: {preset.disabled}"
            print(f"{preset.name} ({preset.origin}): {', '.join(preset.models) or '-'}; {state}")
            if preset.description:
                print(f"    {preset.description}")
            if preset.workflow:
                print(f"    {json.dumps(preset.workflow)}")
        return 0
    except (DemixError, OSError, ValueError) as exc:
        print(f"demix workflows {args.action}: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
