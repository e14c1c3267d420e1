"""Output options end to end: what is asked for is what comes back, decoded and checked."""
from __future__ import annotations

import base64
import io
import zipfile

import numpy as np
import pytest
import requests
import soundfile as sf

from testkit.synthetic_audio import music_like, write_wav
from tests.support.live import wait_for_job


def run_job(server, path, **form) -> dict:
    with open(path, "rb") as file:
        response = requests.post(f"{server.url}/v1/jobs", files={"file": ("in.wav", file)}, data=form, timeout=30)
    assert response.status_code == 202, response.text
    job = wait_for_job(server.url, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    return job


def fetch(job: dict) -> dict[str, tuple[np.ndarray, sf._SoundFileInfo, bytes]]:
    result = requests.get(job["result_url"], timeout=60).json()
    decoded = {}
    for name, encoded in result.items():
        raw = base64.b64decode(encoded)
        decoded[name] = (sf.read(io.BytesIO(raw), dtype="float64", always_2d=True)[0],
                         sf.info(io.BytesIO(raw)), raw)
    return decoded


def test_flac_24_bit_reconstructs_the_input(live_server, tmp_path):
    path = write_wav(tmp_path / "in.wav", 48000, 2, 1.0, subtype="PCM_24")
    original = sf.read(str(path), dtype="float64", always_2d=True)[0]
    job = run_job(live_server, path, stems="bass", format="flac")
    assert job["output"]["format"] == "flac" and job["output"]["sample_format"] == "pcm24"
    assert all(url.endswith(".flac") for url in job["outputs"].values())
    stems = fetch(job)
    for data, info, raw in stems.values():
        assert raw[:4] == b"fLaC" and info.subtype == "PCM_24" and info.samplerate == 48000
        assert data.shape == original.shape
    assert np.abs(stems["bass"][0] + stems["no_bass"][0] - original).max() <= 1 / 2 ** 23


def test_mp3_at_a_chosen_bitrate_keeps_length_rate_and_channels(live_server, tmp_path):
    path = write_wav(tmp_path / "in.wav", 44100, 2, 2.0, subtype="PCM_16")
    job = run_job(live_server, path, stems="all", format="mp3", bitrate="128")
    stems = fetch(job)
    assert list(stems) == ["drums", "bass", "other", "vocals"]
    for data, info, raw in stems.values():
        assert info.format == "MP3" and info.samplerate == 44100 and data.shape == (88200, 2)
        assert 100_000 < len(raw) * 8 / 2.0 < 160_000  # about 128 kbit/s
    stem_response = requests.get(job["outputs"]["vocals"], timeout=30)
    assert stem_response.headers["Content-Type"] == "audio/mpeg"


def test_sample_format_and_rate_can_be_changed(live_server, tmp_path):
    path = write_wav(tmp_path / "in.wav", 44100, 1, 1.0, subtype="PCM_16")
    original = sf.read(str(path), dtype="float64", always_2d=True)[0]
    job = run_job(live_server, path, stems="drums", sample_format="float32", samplerate="22050")
    stems = fetch(job)
    for data, info, _ in stems.values():
        assert info.subtype == "FLOAT" and info.samplerate == 22050 and data.shape == (22050, 1)
    # X + no_X is the input at the new rate.
    import soxr
    resampled = soxr.resample(original, 44100, 22050, quality="VHQ")
    reconstruction = stems["drums"][0] + stems["no_drums"][0]
    assert np.abs(reconstruction - resampled).max() < 1e-3


def loud_float_wav(tmp_path):
    path = tmp_path / "loud.wav"
    sf.write(str(path), music_like(44100, 2, 1.0) * 3.0, 44100, subtype="FLOAT")  # peaks ~1.5
    return path, sf.read(str(path), dtype="float64", always_2d=True)[0]


def test_float_output_keeps_samples_beyond_full_scale(live_server, tmp_path):
    path, original = loud_float_wav(tmp_path)
    assert np.abs(original).max() > 1.2
    stems = fetch(run_job(live_server, path, stems="vocals"))
    reconstruction = stems["vocals"][0] + stems["no_vocals"][0]
    assert np.abs(reconstruction - original).max() < 1e-5


@pytest.mark.parametrize("clip", ["clamp", "rescale"])
def test_integer_outputs_never_wrap(live_server, tmp_path, clip):
    path, original = loud_float_wav(tmp_path)
    job = run_job(live_server, path, stems="vocals", sample_format="pcm16", clip=clip)
    assert job["output"]["clip"] == clip
    stems = fetch(job)
    vocals, rest = stems["vocals"][0], stems["no_vocals"][0]
    for data in (vocals, rest):
        assert data.max() <= 32767 / 32768 and data.min() >= -1.0
    if clip == "clamp":
        assert rest.max() == 32767 / 32768 or rest.min() == -1.0  # clipped, not wrapped
    else:
        # One gain for every stem: they still sum to the (scaled) mix.
        gain = np.abs(vocals + rest).max() / np.abs(original).max()
        assert 0.5 < gain < 1.0
        assert np.abs(vocals + rest - gain * original).max() <= 2 / 2 ** 15


def test_channels_stereo_separates_the_itu_downmix_of_a_5_1_input(live_server, tmp_path):
    from demix.separation.channels import downmix_matrix

    path = tmp_path / "surround.wav"
    sf.write(str(path), music_like(48000, 6, 1.0) * 0.5, 48000, subtype="PCM_24")
    original = sf.read(str(path), dtype="float64", always_2d=True)[0]
    job = run_job(live_server, path, stems="other", channels="stereo")
    assert job["channels"] == 6 and job["output"]["channels"] == 2
    stems = fetch(job)
    downmix = original @ downmix_matrix(6).astype(np.float64)
    assert stems["other"][0].shape == (48000, 2)
    assert np.abs(stems["other"][0] + stems["no_other"][0] - downmix).max() <= 2 / 2 ** 23


def test_stems_zip_holds_every_stem_file(live_server, tmp_path):
    path = write_wav(tmp_path / "in.wav", 44100, 2, 0.5)
    job = run_job(live_server, path)
    response = requests.get(job["zip_url"], timeout=60)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert sorted(archive.namelist()) == sorted(f"{name}.wav" for name in job["outputs"])
    for name, url in job["outputs"].items():
        assert archive.read(f"{name}.wav") == requests.get(url, timeout=30).content


def test_bad_output_options_are_400_and_nothing_is_queued(idle_server, tmp_path):
    path = write_wav(tmp_path / "in.wav", 44100, 2, 0.5)
    with open(path, "rb") as file:
        response = requests.post(f"{idle_server.url}/v1/jobs", files={"file": file},
                                 data={"format": "flac", "sample_format": "float32"}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_output"


@pytest.mark.parametrize("channels", [3, 6])
def test_multichannel_is_separated_by_channel_pair_keeping_layout(live_server, tmp_path, channels):
    """Each pair (and a last odd channel) is separated as its own track: a stem's
    channels equal separating those channels alone, and X + no_X is the input."""
    mix = music_like(44100, channels, 1.0, seed=4) * 0.5
    path = tmp_path / "multi.wav"
    sf.write(str(path), mix, 44100, subtype="PCM_16")
    original = sf.read(str(path), dtype="float64", always_2d=True)[0]
    job = run_job(live_server, path, stems="drums")
    assert job["channels"] == channels and job["output"]["channels"] == channels
    stems = fetch(job)
    drums, rest = stems["drums"][0], stems["no_drums"][0]
    assert drums.shape == original.shape
    assert np.abs(drums + rest - original).max() <= 1 / 2 ** 15

    last_group = [channels - 1] if channels % 2 else [channels - 2, channels - 1]
    alone = tmp_path / "alone.wav"
    sf.write(str(alone), original[:, last_group], 44100, subtype="PCM_16")
    alone_drums = fetch(run_job(live_server, alone, stems="drums"))["drums"][0]
    assert np.abs(drums[:, last_group] - alone_drums).max() <= 1 / 2 ** 15
