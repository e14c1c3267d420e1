"""Bad uploads: each gets its JSON error and leaves nothing behind — no queued
message, no job record, no file under the data dir."""
from __future__ import annotations

import numpy as np
import pytest
import requests
import soundfile as sf

from shared import keys
from tests.audio_factory import wav_bytes
from tests.conftest import UNCONSUMED_QUEUE

MP3_FRAME = bytes([0xFF, 0xFB, 0x90, 0x64]) + bytes(413)


def queue_length(redis_client) -> int:
    return sum(redis_client.llen(key) for key in keys.queue_keys(UNCONSUMED_QUEUE))


def job_count(redis_client) -> int:
    return redis_client.zcard(keys.jobs_index_key())


def files_under(directory) -> set:
    return {p for p in directory.rglob("*") if p.is_file()} if directory.exists() else set()


@pytest.fixture
def snapshot(idle_server, redis_client):
    """State before the request, compared after it."""
    data_dir = idle_server.settings.data_dir
    before = (queue_length(redis_client), job_count(redis_client), files_under(data_dir))

    def unchanged() -> bool:
        after = (queue_length(redis_client), job_count(redis_client), files_under(data_dir))
        return after == before

    return unchanged


def post(server, files=None, data=None) -> requests.Response:
    return requests.post(f"{server.url}/v1/jobs", files=files, data=data, timeout=30)


def assert_error(response: requests.Response, status: int, code: str, *message_parts: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    for part in message_parts:
        assert part in error["message"], error["message"]


def truncated_header(tmp_path) -> bytes:
    return wav_bytes(tmp_path)[:30]


def zero_frames(tmp_path) -> bytes:
    path = tmp_path / "empty.wav"
    sf.write(str(path), np.zeros((0, 2), dtype=np.float32), 44100, subtype="PCM_16")
    return path.read_bytes()


BAD_FILES = {
    "mp3 renamed .wav": (lambda tmp: b"ID3\x04\x00\x00\x00\x00\x00\x00" + MP3_FRAME * 4,
                         422, "not_wav", ["not a WAV", "MP3", "ID3"]),
    "bare mp3 frames": (lambda tmp: MP3_FRAME * 4, 422, "not_wav", ["MP3 frame header"]),
    "flac": (lambda tmp: b"fLaC\x00\x00\x00\x22" + bytes(64), 422, "not_wav", ["FLAC"]),
    "html page": (lambda tmp: b"<!DOCTYPE html><html><body>404</body></html>", 422, "not_wav", ["HTML"]),
    "empty file": (lambda tmp: b"", 422, "not_wav", ["empty"]),
    "random bytes": (lambda tmp: np.random.default_rng(0).bytes(4096), 422, "not_wav",
                     ["not a WAV", "match no audio format"]),
    "truncated header": (truncated_header, 422, "undecodable_wav", ["could not be decoded"]),
    "zero frames": (zero_frames, 422, "empty_audio", ["zero frames"]),
    "six channels": (lambda tmp: wav_bytes(tmp, channels=6), 422, "too_many_channels", ["6 channels"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_upload_is_refused_and_nothing_is_kept(idle_server, snapshot, tmp_path, case):
    make, status, code, message_parts = BAD_FILES[case]
    response = post(idle_server, files={"file": ("song.wav", make(tmp_path), "audio/wav")})
    assert_error(response, status, code, *message_parts)
    assert snapshot()


def test_missing_file_field_is_400(idle_server, snapshot):
    response = post(idle_server, data={"stems": "all"})
    assert_error(response, 400, "missing_file", "'file'")
    assert snapshot()


def test_unknown_stems_value_is_400(idle_server, snapshot, tmp_path):
    response = post(idle_server, files={"file": ("a.wav", wav_bytes(tmp_path))}, data={"stems": "guitar"})
    assert_error(response, 400, "invalid_stems", "guitar", "drums", "vocals")
    assert snapshot()


@pytest.mark.parametrize("seconds", [8.0, 20.0])
def test_upload_over_the_size_limit_is_413(idle_server, snapshot, tmp_path, seconds):
    # The idle server's limit is 1 MiB; 44.1 kHz stereo PCM16 is about 0.17 MiB a second.
    # 8 s is caught once the file part is on disk, 20 s from the request's Content-Length.
    big = wav_bytes(tmp_path, seconds=seconds)
    assert len(big) > 1024 * 1024
    response = post(idle_server, files={"file": ("big.wav", big)})
    assert_error(response, 413, "upload_too_large", "1 MiB")
    assert snapshot()


def test_a_good_upload_is_enqueued_exactly_once(idle_server, redis_client, tmp_path):
    """The control for the tests above: the same counters do move for a valid file."""
    queued, jobs = queue_length(redis_client), job_count(redis_client)
    response = post(idle_server, files={"file": ("ok.wav", wav_bytes(tmp_path))}, data={"stems": "drums"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert queue_length(redis_client) == queued + 1
    assert job_count(redis_client) == jobs + 1
    stored = idle_server.settings.data_dir / "jobs" / job_id / "input.wav"
    assert stored.read_bytes() == wav_bytes(tmp_path)
    assert not any((idle_server.settings.data_dir / "incoming").iterdir())


def test_unreachable_redis_is_a_503_and_keeps_nothing(settings, tmp_path):
    import dataclasses
    import io

    from api import create_app
    from cli.redis_server import free_port

    down = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0",
                               data_dir=tmp_path / "data")
    client = create_app({"SETTINGS": down}).test_client()
    response = client.post("/v1/jobs", data={"file": (io.BytesIO(wav_bytes(tmp_path)), "x.wav")},
                           content_type="multipart/form-data")
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "service_unavailable"
    assert files_under(tmp_path / "data") == set()
