"""End to end: real HTTP against the real app, a real Redis and a real Celery worker
running a tiny real HT-Demucs."""
from __future__ import annotations

import base64

import numpy as np
import pytest
import requests
import soundfile as sf

from testkit.synthetic_audio import write_wav
from testkit.tiny_models import TINY_SOURCES
from tests.support.http_api import decode_result, submit
from tests.support.live import wait_for_job

# (samplerate, channels, subtype, tolerance of X + no_X against the input)
INPUTS = {
    "48k-mono-pcm16": (48000, 1, "PCM_16", 1 / 2 ** 15),
    "22k-stereo-pcm16": (22050, 2, "PCM_16", 1 / 2 ** 15),
    "44k-stereo-pcm24": (44100, 2, "PCM_24", 1 / 2 ** 23),
    "96k-stereo-float": (96000, 2, "FLOAT", 1e-6),
}
EXPECTED_SUBTYPE = {"PCM_16": "PCM_16", "PCM_24": "PCM_24", "FLOAT": "FLOAT"}


@pytest.mark.parametrize("stems", ["all", "vocals"])
@pytest.mark.parametrize("case", list(INPUTS))
def test_separation_keeps_rate_channels_length_and_reconstructs(live_server, tmp_path, case, stems):
    samplerate, channels, subtype, tolerance = INPUTS[case]
    path = write_wav(tmp_path / "in.wav", samplerate, channels, seconds=1.5, subtype=subtype)
    original, _ = sf.read(str(path), dtype="float64", always_2d=True)

    response = submit(live_server.url, path, None if stems == "all" else stems)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["Location"].endswith(f"/v1/jobs/{job['id']}")
    # An idle worker may take the job before the POST's answer reads it back.
    assert job["status"] in ("queued", "running") and job["stems"] == stems and job["model"] == "tiny"
    assert (job["samplerate"], job["channels"], job["frames"]) == (samplerate, channels, len(original))
    assert job["duration"] == pytest.approx(len(original) / samplerate)

    job = wait_for_job(live_server.url, job["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"] == 1.0 and job["error"] is None
    assert job["started_at"] and job["finished_at"] and job["created_at"] <= job["finished_at"]

    expected_names = TINY_SOURCES if stems == "all" else [stems, f"no_{stems}"]
    assert list(job["outputs"]) == expected_names

    result = requests.get(job["result_url"], timeout=30)
    assert result.status_code == 200 and result.headers["Content-Type"] == "application/json"
    decoded = decode_result(result.json())
    assert list(decoded) == expected_names
    for name, (data, rate, stem_subtype) in decoded.items():
        assert rate == samplerate and data.shape == original.shape, name
        assert stem_subtype == EXPECTED_SUBTYPE[subtype]
        assert np.isfinite(data).all() and np.abs(data).max() > 0, name
    if stems != "all":
        reconstruction = decoded[stems][0] + decoded[f"no_{stems}"][0]
        assert np.abs(reconstruction - original).max() <= tolerance

    # Each stem is also served alone, byte for byte the file inside /result.
    for name, url in job["outputs"].items():
        stem = requests.get(url, timeout=30)
        assert stem.status_code == 200 and stem.headers["Content-Type"] == "audio/wav"
        assert stem.content == base64.b64decode(result.json()[name])


def test_service_stems_equal_the_model_applied_directly(live_server, tmp_path, tiny_model_repo):
    """What comes back is the model's separation, not a pass-through: at 44.1 kHz
    stereo float, each stem equals demucs' own normalise/apply_model/de-normalise."""
    import torch
    from demucs.apply import apply_model
    from demucs.pretrained import get_model

    path = write_wav(tmp_path / "in.wav", 44100, 2, seconds=2.0, subtype="FLOAT", seed=3)
    job = wait_for_job(live_server.url, submit(live_server.url, path).json()["id"])
    decoded = decode_result(requests.get(job["result_url"], timeout=30).json())

    wav = torch.from_numpy(sf.read(str(path), dtype="float32")[0].T.copy())
    ref = wav.mean(0)
    mean, std = ref.mean(), ref.std() + 1e-8
    model = get_model("tiny", repo=tiny_model_repo)
    with torch.no_grad():
        expected = apply_model(model, ((wav - mean) / std)[None], shifts=0, overlap=0.25)[0] * std + mean
    for index, name in enumerate(model.sources):
        assert np.abs(decoded[name][0] - expected[index].T.numpy()).max() < 1e-4, name


def test_progress_advances_while_the_model_runs(live_server, tmp_path):
    # 40 s is several model segments, each reported as it finishes.
    path = write_wav(tmp_path / "long.wav", 44100, 2, seconds=40.0, subtype="PCM_16")
    seen = []
    job_id = submit(live_server.url, path).json()["id"]
    job = wait_for_job(live_server.url, job_id, on_poll=lambda j: seen.append(j["progress"]))
    assert job["status"] == "succeeded"
    intermediate = {p for p in seen if 0.0 < p < 1.0}
    assert len(intermediate) >= 2, seen
    assert seen == sorted(seen), "progress must never go backwards"


def test_two_jobs_load_the_model_once(live_server, tmp_path):
    from demix.worker.runner import worker_context

    path = write_wav(tmp_path / "in.wav", 44100, 2, seconds=0.5)
    for _ in range(2):
        job = wait_for_job(live_server.url, submit(live_server.url, path).json()["id"])
        assert job["status"] == "succeeded"
    assert worker_context().models.loads == 1


def test_result_before_the_job_finishes_is_409_with_its_status(idle_server, tmp_path):
    path = write_wav(tmp_path / "in.wav", 44100, 2, seconds=0.5)
    job = submit(idle_server.url, path).json()
    for url in (f"{idle_server.url}/v1/jobs/{job['id']}/result",
                f"{idle_server.url}/v1/jobs/{job['id']}/stems/drums.wav"):
        response = requests.get(url, timeout=10)
        assert response.status_code == 409
        error = response.json()["error"]
        assert error["code"] == "job_not_finished" and error["status"] == "queued"


def test_unknown_job_and_unknown_stem_are_404(live_server, tmp_path):
    for job_id in ("0" * 32, "not-a-job-id"):
        response = requests.get(f"{live_server.url}/v1/jobs/{job_id}", timeout=10)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    path = write_wav(tmp_path / "in.wav", 44100, 2, seconds=0.5)
    job = wait_for_job(live_server.url, submit(live_server.url, path, "bass").json()["id"])
    response = requests.get(f"{live_server.url}/v1/jobs/{job['id']}/stems/drums.wav", timeout=10)
    assert response.status_code == 404 and "bass.wav, no_bass.wav" in response.json()["error"]["message"]
