"""Bad uploads: each gets its JSON error and leaves nothing behind — no queued
message, no job record, no file under the data dir. And the controls: odd but valid
uploads are queued with their real shape."""
from __future__ import annotations

import dataclasses
import http.client
import io
import itertools
import json
import select
import socket
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf
from flask import request

from demix.api import create_app
from demix.intake.uploads import CappedUploadFile
from demix.errors import UploadTooLarge
from testkit.synthetic_audio import music_like, wav_bytes
from tests.support.http_api import assert_error, post
from tests.support.service_state import files_under, job_count, queue_length
from tests.support.wav_corpus import (NOT_AUDIO, ODD_VALID_WAVS, SAMPLES, STREAMED, UNDECODABLE, chunk,
                                      data_header, fmt_chunk, riff)


def zero_frames(tmp_path) -> bytes:
    path = tmp_path / "empty.wav"
    sf.write(str(path), np.zeros((0, 2), dtype=np.float32), 44100, subtype="PCM_16")
    return path.read_bytes()


def float_with(value: float, frame: int):
    def make(tmp_path) -> bytes:
        samples = np.zeros((4410, 2))
        samples[frame, 1] = value
        path = tmp_path / "float.wav"
        sf.write(str(path), samples, 44100, subtype="FLOAT")
        return path.read_bytes()
    return make


# A header whose 1 Hz rate makes 20 kB of 8-bit mono last 5.6 hours: over the 3-hour
# default of DEMIX_MAX_DURATION_S within the idle server's 1 MiB upload limit.
OVER_FIVE_HOURS_AT_1_HZ = riff(fmt_chunk(channels=1, samplerate=1, bits=8), chunk(b"data", bytes(20000)))

BAD_FILES = {
    **{name: (lambda tmp, content=content: content, 415, "unsupported_format",
              ["not an audio format the service reads", *parts])
       for name, (content, parts) in NOT_AUDIO.items()},
    "random bytes": (lambda tmp: np.random.default_rng(0).bytes(4096), 415, "unsupported_format",
                     ["not an audio format the service reads", "match no audio format"]),
    **{name: (lambda tmp, content=content: content, 422, "undecodable_wav", ["could not be decoded", *parts])
       for name, (content, parts) in UNDECODABLE.items()},
    "zero frames": (zero_frames, 422, "empty_audio", ["zero frames"]),
    "streamed header, no samples": (lambda tmp: riff(fmt_chunk(), data_header(STREAMED), size=STREAMED),
                                    422, "empty_audio", ["zero frames"]),
    "NaN sample": (float_with(np.nan, 2000), 422, "non_finite_samples",
                   ["NaN sample at frame 2000 (channel 2"]),
    "infinite sample": (float_with(-np.inf, 7), 422, "non_finite_samples", ["infinite sample at frame 7"]),
    "over the duration limit": (lambda tmp: OVER_FIVE_HOURS_AT_1_HZ, 422, "too_long",
                                ["lasts 20000.0 s", "at most 10800 s", "DEMIX_MAX_DURATION_S"]),
    "nine channels": (lambda tmp: riff(fmt_chunk(channels=9), chunk(b"data", bytes(18 * 10))),
                      422, "too_many_channels", ["9 channels", "at most 8"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_upload_is_refused_and_nothing_is_kept(idle_server, snapshot, tmp_path, case):
    make, status, code, message_parts = BAD_FILES[case]
    response = post(idle_server, files={"file": ("song.wav", make(tmp_path), "audio/wav")})
    assert_error(response, status, code, *message_parts)
    assert str(idle_server.settings.data_dir) not in response.text
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
    # 8 s is cut off while the file part streams, 20 s refused from the request's Content-Length.
    big = wav_bytes(tmp_path, seconds=seconds)
    assert len(big) > 1024 * 1024
    response = post(idle_server, files={"file": ("big.wav", big)})
    assert_error(response, 413, "upload_too_large", "1 MiB")
    assert snapshot()


def test_a_form_of_2000_parts_gets_413_naming_the_part_limit(idle_server, snapshot, tmp_path):
    parts = [("file", ("song.wav", wav_bytes(tmp_path), "audio/wav"))] + \
        [(f"field{index}", (None, "x")) for index in range(2000)]
    response = post(idle_server, files=parts)
    assert_error(response, 413, "too_many_form_parts", "more than 100 parts")
    assert "MiB" not in response.json()["error"]["message"]
    assert snapshot()


def test_a_form_of_many_files_gets_413_naming_the_part_limit_and_keeps_none(idle_server, snapshot):
    response = post(idle_server, files=[("file", (f"{index}.wav", b"RIFF", "audio/wav")) for index in range(150)])
    assert_error(response, 413, "too_many_form_parts", "more than 100 parts")
    assert snapshot()


def test_a_text_field_over_the_field_limit_gets_413_naming_that_limit(idle_server, snapshot, tmp_path):
    # 1 MiB of text: twice the 500000-byte field limit, within the idle server's 2 MiB body limit.
    response = post(idle_server, files={"file": ("song.wav", wav_bytes(tmp_path), "audio/wav")},
                    data={"callback_url": "https://example.com/" + "a" * (1 << 20)})
    assert_error(response, 413, "form_field_too_large", "text field", "500000 bytes")
    assert "1 MiB limit" not in response.json()["error"]["message"]
    assert snapshot()


def test_a_body_of_text_fields_alone_over_the_field_limit_gets_413_naming_that_limit(idle_server, snapshot):
    # urlencoded, read whole into memory: held to the text field limit, not the upload limit.
    response = requests.post(f"{idle_server.url}/v1/jobs", data={"url": "https://example.com/" + "a" * (1 << 20)},
                             timeout=30)
    assert response.request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert_error(response, 413, "form_field_too_large", "text fields only", "500000 bytes")
    assert snapshot()


def test_a_long_form_value_is_not_repeated_whole_in_the_error(idle_server, snapshot, tmp_path):
    long_value = "guitar" * 2000  # 12000 characters
    for field in ("stems", "model", "format", "samplerate"):
        response = post(idle_server, files={"file": ("song.wav", wav_bytes(tmp_path), "audio/wav")},
                        data={field: long_value})
        assert response.status_code == 400, response.text
        message = response.json()["error"]["message"]
        assert len(message) < 300 and "(12000 characters)" in message, (field, message)
    response = requests.get(f"{idle_server.url}/v1/jobs/{'j' * 3000}", timeout=30)
    assert_error(response, 404, "not_found", "(3000 characters)")
    assert len(response.json()["error"]["message"]) < 300
    assert snapshot()


BOUNDARY = "demix-test-boundary"


def chunked_form(file_pieces: tp.Iterable[bytes], sent: list[int]) -> tp.Iterator[bytes]:
    """A multipart body with one `file` part, built by hand as a generator so requests sends
    it chunked (no Content-Length); `sent[0]` counts the bytes the server has taken."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"pipe.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode()
    for piece in itertools.chain([head], file_pieces, [f"\r\n--{BOUNDARY}--\r\n".encode()]):
        sent[0] += len(piece)
        yield piece


def post_chunked(server, body: tp.Iterator[bytes]) -> requests.Response:
    response = requests.post(f"{server.url}/v1/jobs", data=body, timeout=30,
                             headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert response.request.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in response.request.headers
    return response


def test_a_chunked_upload_over_the_limit_is_413(idle_server, snapshot):
    # 1.5 MiB: under the request-level cap (limit + form overhead), so it is the file part's
    # own cap that refuses it; a chunked request has no Content-Length to check up front.
    sent = [0]
    header = riff(fmt_chunk(), data_header(STREAMED), size=STREAMED)
    pieces = itertools.chain([header], itertools.repeat(bytes(64 * 1024), 24))
    response = post_chunked(idle_server, chunked_form(pieces, sent))
    assert_error(response, 413, "upload_too_large", "1 MiB")
    assert snapshot()


def test_an_endless_chunked_upload_is_answered_while_it_streams(idle_server, snapshot):
    """Like `ffmpeg -f wav pipe: | curl -T -`: the 413 must come while the body is still
    being sent (the server stops storing at the limit), not once 256 MiB have arrived."""
    total = 256 * 1024 * 1024
    header = riff(fmt_chunk(), data_header(STREAMED), size=STREAMED)
    pieces = itertools.chain([header], itertools.repeat(bytes(64 * 1024), total // (64 * 1024)))
    status, body, sent = send_chunked_until_answered(idle_server.url, chunked_form(pieces, [0]))
    assert status == 413 and body["error"]["code"] == "upload_too_large", body
    assert sent < total / 8, f"the answer came only after {sent} of {total} bytes"
    assert snapshot()


def send_chunked_until_answered(url: str, body: tp.Iterator[bytes]) -> tuple[int, dict, int]:
    """POST `body` to /v1/jobs with chunked transfer encoding over a plain socket, piece by
    piece, stopping as soon as the server answers (requests would send the whole body first).
    Returns the status, the JSON body and how many body bytes were sent."""
    host, port = url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
                           f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n".encode())
        for piece in body:
            if select.select([connection], [], [], 0)[0]:
                break  # the server has answered
            connection.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
        # Read by Content-Length, not to EOF: the server keeps the connection open while
        # it discards what is left of the body.
        response = http.client.HTTPResponse(connection)
        response.begin()
        return response.status, json.loads(response.read()), sent


def test_a_chunked_upload_within_the_limit_is_accepted(idle_server, tmp_path):
    sent = [0]
    response = post_chunked(idle_server, chunked_form([wav_bytes(tmp_path, seconds=2.0)], sent))
    assert response.status_code == 202, response.text
    assert (response.json()["frames"], response.json()["channels"]) == (88200, 2)


def test_a_file_part_stops_growing_at_the_limit(settings, tmp_path):
    limited = dataclasses.replace(settings, max_upload_mb=1)
    with open(tmp_path / "part", "wb") as file:
        part = CappedUploadFile(file, limited)
        part.write(bytes(600 * 1024))
        with pytest.raises(UploadTooLarge, match="1 MiB"):
            part.write(bytes(600 * 1024))
        part.close()
    assert (tmp_path / "part").stat().st_size == 600 * 1024


def test_even_a_tiny_file_part_goes_to_disk_never_to_memory(settings, tmp_path):
    app = create_app({"SETTINGS": dataclasses.replace(settings, data_dir=tmp_path)})
    with app.test_request_context("/v1/jobs", method="POST",
                                  data={"file": (io.BytesIO(b"RIFF"), "tiny.wav")}):
        stream = request.files["file"].stream
        assert isinstance(stream, CappedUploadFile)
        assert Path(stream.name).parent == tmp_path / "incoming"
    assert files_under(tmp_path) == set()  # and gone once the request is over, unclaimed


@pytest.mark.parametrize("case", [
    "data size 0 (streamed)", "data size 0xFFFFFFFF (ffmpeg pipe)",
    "RF64 with ds64 sizes 0 (ffmpeg -rf64 pipe)", "BW64", "chunks before and after fmt and data",
    "odd-sized chunks with pad bytes", "trailing garbage after data", "WAVE_FORMAT_EXTENSIBLE by hand",
])
def test_odd_but_valid_uploads_are_queued_with_their_real_shape(idle_server, case):
    response = post(idle_server, files={"file": ("odd.wav", ODD_VALID_WAVS[case]())})
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["frames"], job["samplerate"], job["channels"]) == (1000, 44100, 2)
    # The stored input (repaired where needed) reads whole, as the worker will read it.
    stored = idle_server.settings.data_dir / "jobs" / job["id"] / "input.wav"
    read, _ = sf.read(str(stored), dtype="int16", always_2d=True)
    assert np.array_equal(read, SAMPLES)


@pytest.mark.parametrize("samplerate,channels,subtype,seconds", [
    (8000, 1, "PCM_U8", 0.5), (11025, 2, "ULAW", 0.2), (37800, 1, "IMA_ADPCM", 0.3),
    (88200, 2, "MS_ADPCM", 0.1), (192000, 1, "DOUBLE", 0.2), (22050, 2, "PCM_32", 1 / 22050),
])
def test_unusual_formats_are_queued_with_their_real_shape(idle_server, tmp_path, samplerate, channels,
                                                          subtype, seconds):
    path = tmp_path / "in.wav"
    sf.write(str(path), music_like(samplerate, channels, seconds), samplerate, subtype=subtype)
    response = post(idle_server, files={"file": ("in.wav", path.read_bytes())})
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["frames"], job["samplerate"], job["channels"]) == (sf.info(str(path)).frames,
                                                                   samplerate, channels)
    assert job["input_format"] == f"WAV/{subtype}"


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
    from demix.cli.redis_server import free_port

    down = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0",
                               data_dir=tmp_path / "data")
    client = create_app({"SETTINGS": down}).test_client()
    response = client.post("/v1/jobs", data={"file": (io.BytesIO(wav_bytes(tmp_path)), "x.wav")},
                           content_type="multipart/form-data")
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "service_unavailable"
    assert files_under(tmp_path / "data") == set()
