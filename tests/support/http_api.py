"""Requests to the HTTP API, and checks on its answers."""
from __future__ import annotations

import base64
import io

import numpy as np
import requests
import soundfile as sf


def post(server, files=None, data=None) -> requests.Response:
    """POST /v1/jobs on `server` (a LiveServer) with a multipart body."""
    return requests.post(f"{server.url}/v1/jobs", files=files, data=data, timeout=30)


def submit(base_url: str, path, stems: str | None = None) -> requests.Response:
    """POST the WAV at `path` to /v1/jobs."""
    data = {} if stems is None else {"stems": stems}
    with open(path, "rb") as file:
        return requests.post(f"{base_url}/v1/jobs", files={"file": ("song.wav", file, "audio/wav")},
                             data=data, timeout=30)


def decode_result(result: dict) -> dict[str, tuple[np.ndarray, int, str]]:
    """A job's base64 stems (`GET /v1/jobs/<id>/result`) as {stem: (samples, rate, subtype)}."""
    decoded = {}
    for name, encoded in result.items():
        raw = base64.b64decode(encoded, validate=True)
        assert raw[:4] == b"RIFF" and raw[8:12] == b"WAVE", f"{name} is not a complete WAV"
        info = sf.info(io.BytesIO(raw))
        data, samplerate = sf.read(io.BytesIO(raw), dtype="float64", always_2d=True)
        decoded[name] = (data, samplerate, info.subtype)
    return decoded


def assert_error(response: requests.Response, status: int, code: str, *message_parts: str) -> None:
    """The response is the JSON error `code` at `status`, its message holding every part."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    for part in message_parts:
        assert part in error["message"], error["message"]
