"""Every kind of WAV intake accepts, through the real service and worker: stems with the
input's length, rate and channels, in the right sample format, reconstructing the input."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
import soundfile as sf

from testkit.synthetic_audio import music_like
from tests.support.live import wait_for_job
from tests.support.wav_corpus import ODD_VALID_WAVS, SAMPLES

STEP = {"PCM_16": 1 / 2 ** 15, "PCM_24": 1 / 2 ** 23, "FLOAT": 1e-6}


def separate(server, payload: bytes) -> tuple[dict, dict]:
    response = requests.post(f"{server.url}/v1/jobs", files={"file": ("in.wav", payload)},
                             data={"stems": "vocals"}, timeout=30)
    assert response.status_code == 202, response.text
    job = wait_for_job(server.url, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    stems = {}
    for name, encoded in requests.get(job["result_url"], timeout=60).json().items():
        raw = io.BytesIO(base64.b64decode(encoded))
        stems[name] = (sf.read(raw, dtype="float64", always_2d=True)[0], sf.info(io.BytesIO(raw.getvalue())))
    return job, stems


def check_reconstruction(stems: dict, original: np.ndarray, samplerate: int, subtype: str) -> None:
    vocals, vocals_info = stems["vocals"]
    rest, _ = stems["no_vocals"]
    assert vocals_info.samplerate == samplerate and vocals_info.subtype == subtype
    assert vocals.shape == rest.shape == original.shape
    assert np.abs(vocals + rest - original).max() <= STEP[subtype]


@pytest.mark.parametrize("case", list(ODD_VALID_WAVS))
def test_odd_but_valid_files_separate_to_their_real_length(live_server, case):
    job, stems = separate(live_server, ODD_VALID_WAVS[case]())
    assert job["frames"] == len(SAMPLES)
    check_reconstruction(stems, SAMPLES / 2 ** 15, 44100, "PCM_16")


FORMATS = {  # (soundfile format, subtype, samplerate, channels, seconds) -> stems' subtype
    "u8": (("WAV", "PCM_U8", 44100, 2, 0.3), "PCM_16"),
    "pcm32": (("WAV", "PCM_32", 44100, 2, 0.3), "FLOAT"),
    "float64": (("WAV", "DOUBLE", 44100, 1, 0.3), "FLOAT"),
    "mu-law": (("WAV", "ULAW", 8000, 1, 0.3), "PCM_16"),
    "a-law": (("WAV", "ALAW", 8000, 2, 0.3), "PCM_16"),
    "ima adpcm": (("WAV", "IMA_ADPCM", 22050, 2, 0.3), "PCM_16"),
    "ms adpcm": (("WAV", "MS_ADPCM", 22050, 1, 0.3), "PCM_16"),
    "extensible 24-bit": (("WAVEX", "PCM_24", 48000, 2, 0.3), "PCM_24"),
    "rf64": (("RF64", "PCM_16", 44100, 2, 0.3), "PCM_16"),
    "11025 Hz": (("WAV", "PCM_16", 11025, 2, 0.3), "PCM_16"),
    "37800 Hz": (("WAV", "PCM_16", 37800, 1, 0.3), "PCM_16"),
    "88200 Hz": (("WAV", "PCM_24", 88200, 2, 0.3), "PCM_24"),
    "192 kHz": (("WAV", "FLOAT", 192000, 2, 0.2), "FLOAT"),
    "one sample": (("WAV", "PCM_16", 44100, 2, 1 / 44100), "PCM_16"),
}


@pytest.mark.parametrize("case", list(FORMATS))
def test_every_sample_format_and_rate_comes_back_whole(live_server, tmp_path, case):
    (container, subtype, samplerate, channels, seconds), expected_subtype = FORMATS[case]
    path = tmp_path / "in.wav"
    sf.write(str(path), music_like(samplerate, channels, seconds), samplerate, subtype=subtype,
             format=container)
    original = sf.read(str(path), dtype="float64", always_2d=True)[0]
    job, stems = separate(live_server, path.read_bytes())
    assert (job["samplerate"], job["channels"], job["frames"]) == (samplerate, channels, len(original))
    check_reconstruction(stems, original, samplerate, expected_subtype)


def test_digital_silence_gives_silent_stems(live_server, tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(str(path), np.zeros((22050, 2)), 44100, subtype="PCM_16")
    _, stems = separate(live_server, path.read_bytes())
    for data, _info in stems.values():
        assert not data.any()
