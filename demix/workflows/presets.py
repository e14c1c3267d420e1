"""Named workflows (presets): the ones the service ships, built from whatever models it serves,
and the operator's own in a YAML file (`DEMIX_WORKFLOWS`; `demix workflows add NAME FILE`).

The file maps each name to a workflow (`demix.workflows.spec`), optionally with a
`description`::

    karaoke:
      description: Lead vocals out, the rest kept
      steps:
        - {name: voc, input: mix, models: [mel_band_roformer_kim]}
      outputs: {vocals: voc/vocals, karaoke: voc/no_vocals}

A preset is checked against the served models whenever it is listed or chosen: one that
names a model this deployment does not serve is listed as disabled, saying why, and
refused (400) when chosen. A file preset of the same name replaces a shipped one.
"""
from __future__ import annotations

import dataclasses
import logging
import typing as tp
from pathlib import Path

import yaml

from demix.atomic_files import atomic_path
from demix.catalogue import describe_model, warm_model_notes
from demix.config import Settings
from demix.errors import BadRequest, DemixError, shown
from demix.stems import SOURCES
from demix.workflows.spec import Workflow, parse_workflow

log = logging.getLogger(__name__)

SHIPPED = "shipped"
"""The `origin` of the presets the service ships."""

BAND_SOURCES = ("drums", "bass", "other")


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    origin: str
    """`shipped`, or the file it was read from."""
    workflow: tp.Optional[dict]
    """Its workflow JSON (None: a shipped preset the served models cannot make)."""
    disabled: tp.Optional[str] = None
    """Why it cannot run on this deployment (None: it can)."""

    @property
    def models(self) -> list[str]:
        if not self.workflow:
            return []
        names = (model for step in self.workflow.get("steps", []) if isinstance(step, dict)
                 for model in step.get("models", []) if isinstance(model, str))
        return list(dict.fromkeys(names))


Reported = tp.Mapping[str, tp.Mapping[str, tp.Any]]


def all_presets(settings: Settings, reported: Reported = {}) -> list[Preset]:
    """The shipped presets, then the file's (replacing shipped ones of the same name), each
    checked against the served models."""
    found = {preset.name: preset for preset in shipped_presets(settings, reported)}
    try:
        from_file = read_presets_file(settings.workflows_file)
    except ValueError as exc:  # the shipped ones still work; `demix workflows list` shows the error
        log.error("presets file not read: %s", exc)
        from_file = {}
    for name, entry in from_file.items():
        found[name] = _checked(Preset(name, entry.get("description", ""), str(settings.workflows_file),
                                      {key: value for key, value in entry.items() if key != "description"}),
                               settings, reported)
    return list(found.values())


def listed_presets(settings: Settings, ready: tp.Mapping[str, tp.Mapping[str, tp.Any]]) -> list[dict]:
    """Every preset as `GET /v1/workflows` and the web page list it (`ready`: the readiness
    entries, `demix.readiness.ready_workers`): its workflow, its models (each served or not, by
    how many warm workers), `enabled` (the deployment serves its models, else `disabled_reason`
    says why) and `available` (warm workers serve them now)."""
    warm = warm_model_notes(ready)
    served = set(settings.served_models)
    reported = {name: notes[0] for name, notes in warm.items()}
    listed = []
    for preset in all_presets(settings, reported):
        models = [{"name": name, "served": name in served, "workers": len(warm.get(name, []))}
                  for name in preset.models]
        listed.append({"name": preset.name, "description": preset.description, "origin": preset.origin,
                       "workflow": preset.workflow, "models": models, "enabled": preset.disabled is None,
                       "disabled_reason": preset.disabled,
                       "available": preset.disabled is None and all(model["workers"] for model in models)})
    return listed


def preset_workflow(name: str, settings: Settings, reported: Reported = {}) -> Workflow:
    """The checked workflow of preset `name`, as a submission's `preset` field chooses it.

    Raises:
        BadRequest: `unknown_preset` (the message lists the presets), or `preset_disabled`
            (the message says why it cannot run here).
    """
    presets = {preset.name: preset for preset in all_presets(settings, reported)}
    preset = presets.get(name)
    if preset is None:
        raise BadRequest(f"preset: no preset is named {shown(name)}; the presets are {', '.join(presets)} "
                         "(GET /v1/workflows)", code="unknown_preset", details={"field": "preset"})
    if preset.disabled or preset.workflow is None:
        raise BadRequest(f"preset: {name!r} cannot run on this service: {preset.disabled}",
                         code="preset_disabled", details={"field": "preset"})
    return parse_workflow(preset.workflow, settings, reported)


def shipped_presets(settings: Settings, reported: Reported = {}) -> list[Preset]:
    """The presets every deployment has, made of the models it serves."""
    sources = {name: describe_model(settings, name, reported.get(name)).sources or SOURCES
               for name in settings.served_models}
    with_vocals = [name for name, theirs in sources.items() if "vocals" in theirs]
    vocals_only = [name for name, theirs in sources.items() if tuple(theirs) == ("vocals",)]
    band = [name for name, theirs in sources.items() if all(source in theirs for source in BAND_SOURCES)]

    best_vocals = Preset(
        "best_vocals", "Vocals and instrumental from every served model with a vocals source, averaged "
        "(avg_wave): ensembles beat the best single model.", SHIPPED, None)
    if len(with_vocals) >= 2:
        best_vocals = dataclasses.replace(best_vocals, workflow={
            "steps": [{"name": "vocals", "input": "mix", "models": with_vocals, "ensemble": "avg_wave"}],
            "outputs": {"vocals": "vocals/vocals", "instrumental": "vocals/no_vocals"}})
    else:
        best_vocals = dataclasses.replace(best_vocals, disabled=(
            "it needs two or more served models with a vocals source, and this service serves "
            f"{_count(with_vocals)} (add one with `demix models pull mel_band_roformer_kim`)"))

    then_band = Preset(
        "vocals_then_band", "Vocals by a vocals model, then drums, bass and other by a 4-stem "
        "model from the instrumental it leaves.", SHIPPED, None)
    if vocals_only and band:
        then_band = dataclasses.replace(then_band, workflow={
            "steps": [{"name": "vocals", "input": "mix", "models": [vocals_only[0]]},
                      {"name": "band", "input": "vocals/no_vocals", "models": [band[0]]}],
            "outputs": {"vocals": "vocals/vocals", **{source: f"band/{source}" for source in BAND_SOURCES}}})
    else:
        missing = [what for what, have in (("a vocals model (e.g. `demix models pull mel_band_roformer_kim`)",
                                            vocals_only), ("a 4-stem model such as htdemucs", band)) if not have]
        then_band = dataclasses.replace(then_band, disabled=f"it needs {' and '.join(missing)}, which this "
                                                            "service does not serve")
    return [best_vocals, then_band]


def _count(names: list[str]) -> str:
    return f"{len(names)} ({', '.join(names)})" if names else "none"


def _checked(preset: Preset, settings: Settings, reported: Reported) -> Preset:
    try:
        parse_workflow(preset.workflow, settings, reported)
    except DemixError as exc:
        return dataclasses.replace(preset, disabled=exc.message)
    return preset


def read_presets_file(path: Path) -> dict[str, dict]:
    """The file's presets, name -> workflow (with its `description`); none if it does not exist.

    Raises:
        ValueError: the file is not YAML mapping names to workflows.
    """
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(name, str) and isinstance(entry, dict)
                                             for name, entry in data.items()):
        raise ValueError(f"{path}: expected a mapping of preset names to workflows")
    return data


def add_preset(settings: Settings, name: str, workflow_text: str, description: str = "") -> Path:
    """Check a workflow (JSON or YAML text) against the served models and save it in the
    presets file as `name` (replacing one of that name); returns the file.

    Raises:
        BadRequest: the workflow is refused (the message says where and why), or `name` is
            not a preset name.
        ValueError: the presets file is unreadable.
    """
    if not name.replace("_", "").replace("-", "").isalnum() or not name[:1].isalpha() or len(name) > 64:
        raise BadRequest(f"preset name {shown(name)}: letters, digits, _ and -, starting with a letter")
    try:
        workflow = yaml.safe_load(workflow_text)  # JSON is YAML too
    except yaml.YAMLError as exc:
        raise BadRequest(f"workflow: not valid JSON or YAML: {exc}", code="invalid_workflow") from None
    parse_workflow(workflow, settings)
    path = settings.workflows_file
    presets = read_presets_file(path)
    presets[name] = {**({"description": description} if description else {}), **workflow}
    _write_presets_file(path, presets)
    return path


def remove_preset(settings: Settings, name: str) -> bool:
    """Remove preset `name` from the presets file; False if the file has none of that name."""
    path = settings.workflows_file
    presets = read_presets_file(path)
    if presets.pop(name, None) is None:
        return False
    _write_presets_file(path, presets)
    return True


def _write_presets_file(path: Path, presets: tp.Mapping[str, dict]) -> None:
    """Write the presets file whole (a reader sees the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        temporary.write_text(yaml.safe_dump(dict(presets), sort_keys=False))
