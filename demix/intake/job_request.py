"""The one parser of a job request: the form fields of `POST /v1/jobs` in, the model,
its stems choice, the resolved output options and the webhook's `callback_url` out.

The API parses every submission here; the OpenAPI description lists `FORM_FIELDS`;
the worker asks `default_output` for records written before output options existed.
A new form field is one more `FormField` and one more `JobRequest` attribute.
"""
from __future__ import annotations

import dataclasses
import typing as tp

from demix.audio.io import AudioInfo
from demix.catalogue import ModelInfo, check_model, describe_model
from demix.config import Settings, get_settings
from demix.audio.output_formats import (CHANNEL_MODES, CLIP_MODES, FORMATS, MAX_SAMPLERATE, MIN_SAMPLERATE,
                                        MP3_BITRATES, SAMPLE_FORMATS, OutputOptions, resolve_output)
from demix.stems import ALL, SOURCES, check_stems
from demix.errors import BadRequest
from demix.jobs.webhooks import MAX_CALLBACK_URL_LENGTH, validate_callback_url
from demix.workflows.presets import preset_workflow
from demix.workflows.spec import Workflow, parse_workflow

FILE_FIELD = "file"
"""The multipart file part holding the audio to separate."""

WORKFLOW_FIELD = "workflow"
"""The form field holding a workflow's JSON (`demix.workflows.spec`)."""

PRESET_FIELD = "preset"
"""The form field naming a preset workflow (`demix.workflows.presets`)."""

URL_FIELD = "url"
"""The form field naming an http(s) address to fetch the input from, instead of a `file`."""


@dataclasses.dataclass(frozen=True)
class FormField:
    """One text field of the submission form, as the parser reads it and the spec shows it."""
    name: str
    description: str
    choices: tp.Tuple[str, ...] = ()  # empty: not a fixed set; `schema` says what is valid
    default: tp.Optional[str] = None  # None: derived from the input (see description)
    schema: tp.Optional[tp.Mapping[str, tp.Any]] = None  # JSON Schema of the value, when not `choices`


FORM_FIELDS: tp.Tuple[FormField, ...] = (
    FormField("model", "One of the served models (`GET /v1/models`). Default: the first of DEMIX_MODELS.",
              schema={"type": "string"}),
    FormField("stems", "`all` for every source of the model (a one-source model: it and its "
              "complement), or one source `X` for `X` and `no_X` (the input minus `X`); the model's "
              "`stems` in `GET /v1/models` lists them (the 4-stem Demucs: all, drums, bass, other, vocals).",
              schema={"type": "string"}, default=ALL),
    FormField("format", "Container and codec of the stems. Default: `flac` for a FLAC input, "
              "`wav` for every other.", FORMATS),
    FormField("sample_format", "Sample format of WAV/FLAC stems (FLAC: integers only; not for MP3). "
              "Default: the input's own — 16/24-bit PCM kept; 8-bit, μ-law, A-law, ADPCM → pcm16; "
              "32-bit PCM and float → float32 (FLAC: pcm24); a lossy input (MP3, AAC, Vorbis, "
              "Opus) → pcm24.", SAMPLE_FORMATS),
    FormField("samplerate", f"`input`, or a rate in Hz ({MIN_SAMPLERATE}–{MAX_SAMPLERATE}; MP3: its "
              "standard rates up to 48000). Default for MP3: the highest MP3 rate not above the input's.",
              default="input", schema={"anyOf": [{"const": "input"}, {
                  "type": "integer", "minimum": MIN_SAMPLERATE, "maximum": MAX_SAMPLERATE}]}),
    FormField("bitrate", "MP3 constant bitrate in kbit/s (ignored for WAV and FLAC).",
              default=str(MP3_BITRATES[-1]), schema={"type": "integer", "enum": list(MP3_BITRATES)}),
    FormField("clip", "`clamp`: each sample clipped to full scale; `rescale`: one gain for all "
              "stems of the job, so they still sum to the scaled mix. Integer outputs never wrap.",
              CLIP_MODES, "clamp"),
    FormField("channels", "`input`: the input's channel count and layout; `stereo`: stems of the "
              "ITU-R BS.775 stereo downmix.", CHANNEL_MODES, "input"),
    FormField("workflow", "Instead of `model` and `stems`: a chain or ensemble of models as one job, "
              "as JSON (`{\"steps\": [...], \"outputs\": {...}}`, see docs/workflows.md). Its stems keep "
              "the input's rate and channels.", schema={"type": "string", "contentMediaType": "application/json"}),
    FormField("preset", "Instead of `model` and `stems` (or a `workflow`): a named workflow, one of "
              "`GET /v1/workflows`.", schema={"type": "string"}),
    FormField("cache", "`true`: a model run reuses the stems an earlier job computed with the same model "
              "on the same audio (the result cache), and keeps its own for later jobs; `false`: it neither "
              "reads nor writes the cache.", ("true", "false"), "true"),
    FormField("callback_url", "An http or https URL the service POSTs the job's JSON to when it "
              "finishes (succeeded, failed or cancelled), signed in `X-Demix-Signature`. Default: none.",
              schema={"type": "string", "format": "uri", "maxLength": MAX_CALLBACK_URL_LENGTH,
                      "pattern": r"^[hH][tT][tT][pP][sS]?://"}),
)
"""Every text field of `POST /v1/jobs`, in the order the docs give them (docs/api.md, then the
output options of docs/formats.md)."""


@dataclasses.dataclass(frozen=True)
class JobRequest:
    """A validated submission: which model, what to separate into and how to write it."""
    stems: str
    output: OutputOptions
    model: str = ""
    callback_url: tp.Optional[str] = None
    """Where to POST the job when it finishes (webhook), if anywhere."""
    workflow: tp.Optional[Workflow] = None
    """A workflow job's checked workflow (then `model` is empty)."""
    cache: bool = True
    """Whether the job's model runs may use the result cache."""


def parse_job_request(form: tp.Mapping[str, str], info: AudioInfo, settings: tp.Optional[Settings] = None,
                      reported: tp.Mapping[str, tp.Mapping[str, tp.Any]] = {}) -> JobRequest:
    """Validate the form fields against the input's `info` and the served models of
    `settings` (default: the process's), and resolve every default.

    Values are matched case-insensitively (but a model name exactly) and a blank field
    means its default. `reported`: per model, what a warm worker said of it (its sources).

    Raises:
        BadRequest: `unknown_model` for a model the service does not serve (the message
            lists those it does), `invalid_stems` for a stems choice the model does not
            offer (the message lists those it does), `invalid_output` for an output option
            that cannot be written (the message says what would work), `invalid_callback_url`
            for a callback_url that is not an http(s) URL.
    """
    settings = settings or get_settings()
    cache = use_cache(form)
    if (form.get(WORKFLOW_FIELD) or "").strip() or (form.get(PRESET_FIELD) or "").strip():
        return dataclasses.replace(_workflow_request(form, info, settings, reported), cache=cache)
    model = chosen_model(form, settings, reported)
    stems = check_stems((form.get("stems") or ALL).strip().lower() or ALL, model.sources or SOURCES,
                        model=model.name)
    return JobRequest(stems=stems, output=resolve_output(form, info), model=model.name,
                      callback_url=validate_callback_url(form.get("callback_url")), cache=cache)


def use_cache(form: tp.Mapping[str, str]) -> bool:
    """The form's `cache` field (blank: true).

    Raises:
        BadRequest: (`invalid_cache`) neither true nor false.
    """
    value = (form.get("cache") or "").strip().lower() or "true"
    if value not in ("true", "false"):
        raise BadRequest(f"cache: {value!r} is neither true nor false", code="invalid_cache",
                         details={"field": "cache"})
    return value == "true"


def _workflow_request(form: tp.Mapping[str, str], info: AudioInfo, settings: Settings,
                      reported: tp.Mapping[str, tp.Mapping[str, tp.Any]]) -> JobRequest:
    preset = (form.get(PRESET_FIELD) or "").strip()
    for name in ("model", "stems") + ((WORKFLOW_FIELD,) if preset else ()):
        if (form.get(name) or "").strip():
            raise BadRequest(f"{name}: a {'preset' if preset else 'workflow'} job names its models and stems in "
                             f"its workflow; leave {name!r} out", code="invalid_workflow", details={"field": name})
    workflow = preset_workflow(preset, settings, reported) if preset \
        else parse_workflow(form[WORKFLOW_FIELD], settings, reported)
    output = resolve_output(form, info)
    if output.samplerate != info.samplerate or output.channel_mode != "input":
        field = "samplerate" if output.samplerate != info.samplerate else "channels"
        raise BadRequest(f"{field}: a workflow job's stems keep the input's rate and channels; leave "
                         f"{field!r} out", code="invalid_output", details={"field": field})
    return JobRequest(stems=ALL, output=output, callback_url=validate_callback_url(form.get("callback_url")),
                      workflow=workflow)


def chosen_model(form: tp.Mapping[str, str], settings: Settings,
                 reported: tp.Mapping[str, tp.Mapping[str, tp.Any]] = {}) -> ModelInfo:
    """The form's `model` (blank: the default one), described by the catalogue.

    Raises:
        BadRequest: (`unknown_model`) the service does not serve it.
    """
    name = check_model(settings, (form.get("model") or "").strip() or settings.default_model)
    return describe_model(settings, name, reported.get(name))
