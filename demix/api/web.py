"""`GET /`: the web page — upload audio files (one job each) for a model or a preset
(a workflow), follow the jobs and their steps, play and download their stems.

The page is plain HTML, CSS and JavaScript modules served by this app (`demix/api/templates`,
`demix/api/static`): no build step and nothing fetched from elsewhere. It talks to the same
`/v1` endpoints as every other client.
"""
from __future__ import annotations

import typing as tp

from flask import Blueprint, current_app, render_template

from demix.catalogue import catalogue
from demix.audio.output_formats import CLIP_MODES, CHANNEL_MODES, FORMATS, MP3_BITRATES, MP3_SAMPLERATES, SAMPLE_FORMATS
from demix.readiness import ready_workers
from demix.workflows.presets import listed_presets
from demix.workflows.spec import DEFAULT_ENSEMBLE, MIX

bp = Blueprint("web", __name__)

OFFERED_SAMPLERATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000, 176400, 192000)
"""Output rates the page offers (the API accepts any rate in its range)."""

INPUT_FORMATS = (
    ("WAV", (".wav", ".wave"), ("audio/wav", "audio/x-wav", "audio/wave")),
    ("FLAC", (".flac",), ("audio/flac", "audio/x-flac")),
    ("MP3", (".mp3",), ("audio/mpeg",)),
    ("Ogg", (".ogg", ".oga"), ("audio/ogg",)),
    ("Opus", (".opus",), ("audio/opus",)),
    ("AIFF", (".aif", ".aiff", ".aifc"), ("audio/aiff", "audio/x-aiff")),
    ("M4A", (".m4a", ".mp4", ".m4v"), ("audio/mp4", "audio/x-m4a", "video/mp4")),
    ("WebM", (".webm",), ("audio/webm", "video/webm")),
    ("MKV", (".mka", ".mkv"), ("audio/x-matroska", "video/x-matroska")),
)
"""What the page's file picker offers: (name, extensions, media types). Only a filter for the
picker (a drop or "all files" gets past it): the service decides from a file's content, and
its refusal shows in the file's row."""

CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
"""Everything the page uses comes from this app (stems play from blob URLs)."""


@bp.get("/")
def index():
    services = current_app.extensions["demix"]
    settings = services.settings
    try:
        ready = ready_workers(services.jobs.redis)
    except Exception:  # Redis down: the page still loads; submitting will say what is wrong
        ready = {}
    models = catalogue(settings, ready)
    presets = [{**preset, "steps": describe_steps(preset["workflow"]),
                "outputs": list((preset["workflow"] or {}).get("outputs") or {})}
               for preset in listed_presets(settings, ready)]
    response = current_app.make_response(render_template(
        "index.html",
        models=models,
        stem_choices=models[0]["stems"],
        presets=presets,  # the default model's; the page swaps them with the model
        formats=FORMATS,
        sample_formats=SAMPLE_FORMATS,
        samplerates=OFFERED_SAMPLERATES,
        mp3_samplerates=MP3_SAMPLERATES,
        mp3_bitrates=MP3_BITRATES,
        clip_modes=CLIP_MODES,
        channel_modes=CHANNEL_MODES,
        accepted_files=",".join(ext for _, exts, types in INPUT_FORMATS for ext in (*exts, *types)),
        accepted_names=", ".join(name for name, _, _ in INPUT_FORMATS),
        max_upload_bytes=settings.max_upload_bytes,
        max_upload_mb=settings.max_upload_mb,
        max_duration_s=settings.max_duration_s,
    ))
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response


def describe_steps(workflow: tp.Optional[tp.Mapping[str, tp.Any]]) -> str:
    """A preset's steps in a line, as the page shows them:
    `vocals: m1 + m2 (avg_wave) → band: htdemucs (from vocals/no_vocals)`."""
    described = []
    for number, step in enumerate((workflow or {}).get("steps") or [], 1):
        models = " + ".join(step.get("models") or [])
        ensemble = f" ({step.get('ensemble') or DEFAULT_ENSEMBLE})" if len(step.get("models") or []) > 1 else ""
        source = step.get("input") or MIX
        start = f" (from {source})" if source != MIX else ""
        described.append(f"{step.get('name') or number}: {models}{ensemble}{start}")
    return " → ".join(described)
