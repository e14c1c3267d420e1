"""`demix up` as a user runs it: one command, a private Redis, a worker, the API behind
its front; jobs go through; Ctrl-C leaves no process behind."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import soundfile as sf

from demix.cli.redis_server import free_port
from demix.grpc_api.protos import demixing_pb2, demixing_pb2_grpc
from testkit.synthetic_audio import write_wav
from tests.support.live import wait_for_job
from tests.support.encoded_audio import FORMATS as ENCODED_FORMATS, ffmpeg_decode, require_encoders
from tests.support.reference import demucs_separate
from tests.support.http_api import decode_result
from tests.support.demix_up import demix_up, demix_up_started, processes_with_marker
from tests.support.waiting import wait_for
from tests.support.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.processes

def test_demix_up_serves_a_job_and_ctrl_c_stops_everything(tiny_model_repo, tmp_path):
    grpc_port = free_port()
    with demix_up(tmp_path, DEMIX_GRPC_PORT=str(grpc_port)) as (url, output, marker), \
            WebhookReceiver([200]) as receiver:
        assert url in output[-1]
        assert any("started private Redis" in line for line in output)
        # Ready only once the worker's pool process has loaded and warmed the model.
        assert any(" warm on cpu in fp32 " in line for line in output[:-1]), "".join(output)
        path = write_wav(tmp_path / "song.wav", 32000, 1, seconds=1.0)
        with open(path, "rb") as file:
            response = requests.post(f"{url}/v1/jobs", files={"file": file},
                                     data={"stems": "vocals", "callback_url": receiver.url}, timeout=30)
        assert response.status_code == 202, response.text
        job = wait_for_job(url, response.json()["id"])
        assert job["status"] == "succeeded", job["error"]
        assert set(job["outputs"]) == {"vocals", "no_vocals"}
        # The worker's webhook sender posted the finished job.
        [webhook] = receiver.wait_for(1)
        assert json.loads(webhook.body)["id"] == job["id"]
        # The gRPC interface answers too.
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            answer = demixing_pb2_grpc.demixingStub(channel).demixing(
                demixing_pb2.Query(audio_file=path.read_bytes(), sounds="drums"), timeout=120)
        assert sorted(json.loads(answer.demixed_audio)) == ["drums", "no_drums"]
        assert len(processes_with_marker(marker)) >= 6  # up, redis, worker (+pool, background), Flower, gRPC, the API
        flower_url = re.search(r"Flower: (http://\S+?);", output[-1]).group(1)
        assert requests.get(f"{flower_url}/healthcheck", timeout=10).text == "OK"
        assert "Flower" in requests.get(flower_url, timeout=10).text
        assert f"gRPC (demixing.proto): 127.0.0.1:{grpc_port}" in output[-1]


def test_demix_up_runs_without_flower_when_its_port_is_taken(tiny_model_repo, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        flower_port = holder.getsockname()[1]
        with demix_up(tmp_path, DEMIX_FLOWER_PORT=str(flower_port)) as (url, output, _):
            assert "Flower" not in output[-1]
            assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
    warning = next(line for line in output if "DEMIX_FLOWER_PORT" in line)
    assert f"127.0.0.1:{flower_port} is already in use" in warning and "running without Flower" in warning


def test_with_api_keys_demix_up_runs_flower_behind_its_login(tiny_model_repo, tmp_path):
    login = ("ops", "pa55-word")
    with demix_up(tmp_path, DEMIX_API_KEYS="k1", DEMIX_FLOWER_AUTH=":".join(login), DEMIX_GRPC_PORT="0") as (
            url, output, _):
        flower_url = output[-1].split("Flower: ")[1].split(";")[0]
        for path in ("/tasks/datatable?draw=1&start=0&length=10&order[0][column]=0&columns[0][data]=name",
                     "/api/tasks"):
            assert requests.get(flower_url + path, timeout=10).status_code == 401, path
            assert requests.get(flower_url + path, timeout=10, auth=login).status_code == 200, path
        assert requests.get(f"{url}/v1/jobs/x", timeout=10).status_code == 401  # the API's own keys
    assert any("Flower asks for the login in DEMIX_FLOWER_AUTH" in line for line in output), output


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fresh_demix_up_serves_real_htdemucs_exactly_like_demucs(tmp_path):
    """No weights anywhere, no configuration: `demix up` fetches htdemucs itself (the npm
    route here) and its stems equal `demucs.separate`'s with the same weights."""
    path = write_wav(tmp_path / "song.wav", 44100, 2, seconds=10.0, subtype="FLOAT", seed=11)
    with demix_up(tmp_path, ready_timeout=900, DEMIX_MODEL_REPO="", DEMIX_MODEL="htdemucs") as (url, output, _):
        with open(path, "rb") as file:
            job_id = requests.post(f"{url}/v1/jobs", files={"file": file}, timeout=30).json()["id"]
        job = wait_for_job(url, job_id, timeout=900)
        assert job["status"] == "succeeded", job["error"]
        got = decode_result(requests.get(job["result_url"], timeout=60).json())
    assert any("model htdemucs is ready" in line for line in output), "".join(output)
    expected = demucs_separate(path, tmp_path / "data" / "models", "htdemucs", tmp_path / "ref")
    assert sorted(got) == sorted(expected) == ["bass", "drums", "other", "vocals"]
    for name, reference in expected.items():
        assert np.abs(got[name][0] - reference).max() < 1e-4, name


END_TO_END_FORMATS = ("flac 24-bit 48 kHz", "mp3 vbr with LAME header", "ogg vorbis (oggenc)", "opus (opusenc)",
                      "aiff 16-bit", "aiff-c float", "m4a aac-lc", "m4a alac 24-bit", "webm opus", "mka opus",
                      "mp4 video with aac", "mkv video with vorbis")
"""One of each container and codec (tests/intake/test_intake_formats.py decodes every variant)."""


@pytest.mark.timeout(1200)
def test_demix_up_separates_every_input_format_to_ffmpegs_length(tiny_model_repo, tmp_path):
    """Each format from a real encoder through one `demix up`: the stems are exactly as long
    as FFmpeg's decode of the upload, in the defaults for that input, and `X + no_X` is
    that decode."""
    require_encoders()
    uploads = {case: ENCODED_FORMATS[case].write(tmp_path, f"in{index}")
               for index, case in enumerate(END_TO_END_FORMATS)}
    with demix_up(tmp_path) as (url, _, _):
        submitted = {}
        for case, path in uploads.items():
            with open(path, "rb") as file:  # a neutral name: the bytes alone tell the format
                response = requests.post(f"{url}/v1/jobs", files={"file": ("upload", file)},
                                         data={"stems": "vocals"}, timeout=60)
            assert response.status_code == 202, (case, response.text)
            submitted[case] = response.json()["id"]
        for case, job_id in submitted.items():
            job = wait_for_job(url, job_id, timeout=300)
            assert job["status"] == "succeeded", (case, job["error"])
            encoded, reference = ENCODED_FORMATS[case], ffmpeg_decode(uploads[case])
            assert job["input_format"] == encoded.input_format, case
            assert job["frames"] == len(reference.samples), case
            expected_format = "flac" if encoded.input_format.startswith("FLAC/") else "wav"
            assert job["output"]["format"] == expected_format, case
            stems = {}
            for name, stem_url in job["outputs"].items():
                raw = requests.get(stem_url, timeout=60).content
                samples, samplerate = sf.read(io.BytesIO(raw), dtype="float64", always_2d=True)
                assert samplerate == reference.samplerate, case
                stems[name] = samples
            assert stems["vocals"].shape == stems["no_vocals"].shape == reference.samples.shape, case
            step = {"pcm16": 2 ** -15, "pcm24": 2 ** -23, "float32": 0.0}[job["output"]["sample_format"]]
            # One output step, plus float rounding where libsndfile decoded (its decoders are not FFmpeg's).
            assert np.abs(stems["vocals"] + stems["no_vocals"] - reference.samples).max() <= step + 1e-6, case


HAZARDS = Path(__file__).resolve().parents[1] / "support" / "fork_hazard"


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL])
def test_nothing_outlives_demix_up_even_a_pool_process_that_hangs(tiny_model_repo, tmp_path, stop_signal):
    """Stopped (SIGTERM: it stops its parts, then returns only once they are gone) or killed
    outright (SIGKILL: its parts get SIGTERM from Linux and end by themselves), `demix up`
    leaves no process behind, even a worker whose pool process hangs for ever in its
    warm-up: that worker's warm shutdown cannot finish, so it turns cold, then kills."""
    hazard_dir = tmp_path / "hazard"
    hazard_dir.mkdir()
    settings = {"PYTHONPATH": os.pathsep.join(filter(None, [str(HAZARDS), os.environ.get("PYTHONPATH")])),
                "DEMIX_TEST_FORK_HAZARD": "hang-every-warm-up", "DEMIX_TEST_HAZARD_DIR": str(hazard_dir),
                "DEMIX_WARM_SHUTDOWN_S": "2"}
    with demix_up_started(tmp_path, **settings) as (process, marker, output):
        wait_for(lambda: next(hazard_dir.glob("hanging-*"), None), "the pool process hanging", timeout=180)
        started = processes_with_marker(marker)
        assert len(started) >= 5, started  # up, Redis, worker, its pool and background processes, the API
        process.send_signal(stop_signal)
        if stop_signal == signal.SIGTERM:
            assert process.wait(120) == 0, "".join(output)
            assert processes_with_marker(marker) == [], "".join(output)
        else:
            # The worker's shutdown: 2 s warm, then SIGTERM and SIGKILL 5 s apart.
            wait_for(lambda: processes_with_marker(marker) == [], "every part of demix up gone", timeout=60)
