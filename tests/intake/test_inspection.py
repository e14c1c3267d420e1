"""Intake: every WAV a real tool writes is accepted and described right; every bad one is
refused with a specific error. The corpus is tests/support/wav_corpus.py;
tests/api/test_api_errors.py sends it over HTTP."""
from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from demix.intake import inspection as intake
from demix.config import Settings
from demix.errors import InvalidAudio, UnsupportedMediaType
from demix.intake.inspection import inspect_upload
from testkit.synthetic_audio import music_like
from tests.support.wav_corpus import (NOT_AUDIO, ODD_VALID_WAVS, SAMPLES, STREAMED, UNDECODABLE, chunk, data_header,
                                      fmt_chunk, pcm16, plain_wav, rf64_header, rf64_wav, riff)

SETTINGS = Settings()


def write(tmp_path: Path, content: bytes, name: str = "upload.wav") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def refusal(path: Path, settings: Settings = SETTINGS) -> InvalidAudio:
    with pytest.raises(InvalidAudio) as caught:
        inspect_upload(path, settings)
    assert str(path.parent) not in caught.value.message  # never leak server paths
    return caught.value


# ---- accepted -------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(ODD_VALID_WAVS))
def test_odd_but_valid_wavs_are_accepted_and_read_whole(tmp_path, case):
    path = write(tmp_path, ODD_VALID_WAVS[case]())
    info = inspect_upload(path, SETTINGS)
    assert (info.frames, info.samplerate, info.channels) == (1000, 44100, 2)
    # What the worker will read from the (possibly repaired) stored copy: every sample.
    read, _ = sf.read(str(path), dtype="int16", always_2d=True)
    assert np.array_equal(read, SAMPLES)


@pytest.mark.parametrize("size", [0, STREAMED])
def test_a_streamed_header_is_repaired_to_the_real_sizes(tmp_path, size):
    content = riff(fmt_chunk(), data_header(size) + SAMPLES.tobytes(), size=size)
    path = write(tmp_path, content)
    inspect_upload(path, SETTINGS)
    repaired = path.read_bytes()
    assert repaired == riff(fmt_chunk(), chunk(b"data", SAMPLES.tobytes()))


def test_a_streamed_rf64_header_gets_its_ds64_sizes(tmp_path):
    path = write(tmp_path, rf64_header() + SAMPLES.tobytes())
    inspect_upload(path, SETTINGS)
    assert path.read_bytes() == rf64_wav()


@pytest.mark.parametrize("trailer", [b"", b"\x01"])
def test_a_streamed_wav_too_big_for_riff_becomes_rf64(tmp_path, monkeypatch, trailer):
    # 4 GiB of test audio is too slow for the suite; the RIFF limit is lowered instead.
    monkeypatch.setattr(intake, "RIFF_MAX_SIZE", 1000)
    content = riff(chunk(b"LIST", b"abc"), fmt_chunk(), data_header(STREAMED) + SAMPLES.tobytes()
                   + trailer, size=STREAMED)
    path = write(tmp_path, content)
    info = inspect_upload(path, SETTINGS)
    assert (info.container, info.frames, info.channels) == ("RF64", 1000, 2)
    read, _ = sf.read(str(path), dtype="int16", always_2d=True)
    assert np.array_equal(read, SAMPLES)
    repaired = path.read_bytes()
    assert len(repaired) == len(content) + intake.DS64_CHUNK_BYTES
    assert repaired[:4] == b"RF64" and repaired[12:16] == b"ds64"
    assert repaired.endswith(SAMPLES.tobytes() + trailer)


def test_shifting_copes_with_blocks_smaller_than_the_shift(tmp_path):
    path = write(tmp_path, bytes(range(256)) * 10)
    with open(path, "r+b") as file:
        intake._shift_tail(file, start=12, end=2560, by=36, block=7)
    shifted = path.read_bytes()
    assert shifted[48:] == (bytes(range(256)) * 10)[12:] and shifted[:12] == bytes(range(12))


FIXED_WIDTH_SUBTYPES = ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "ULAW", "ALAW"]
SAMPLE_FORMATS = ([(subtype, container) for subtype in FIXED_WIDTH_SUBTYPES
                   for container in ("WAV", "WAVEX", "RF64")]
                  # libsndfile writes ADPCM only in plain WAV
                  + [("IMA_ADPCM", "WAV"), ("MS_ADPCM", "WAV")])


@pytest.mark.parametrize("subtype,container", SAMPLE_FORMATS)
def test_every_sample_format_is_accepted(tmp_path, subtype, container):
    path = tmp_path / "in.wav"
    frames = 1001
    sf.write(str(path), music_like(44100, 2, frames / 44100)[:frames], 44100, subtype=subtype,
             format=container)
    info = inspect_upload(path, SETTINGS)
    assert (info.samplerate, info.channels, info.subtype, info.container) == (44100, 2, subtype, container)
    assert info.frames == expected_frames(path, frames, subtype)
    assert len(sf.read(str(path))[0]) == info.frames


def expected_frames(path: Path, written: int, subtype: str) -> int:
    """ADPCM codes whole blocks, so the written frames are padded to a block: the count
    of samples per block comes from the file's own `fmt ` chunk (wSamplesPerBlock)."""
    if not subtype.endswith("ADPCM"):
        return written
    content = path.read_bytes()
    samples_per_block = struct.unpack("<H", content[content.index(b"fmt ") + 8 + 18:][:2])[0]
    return -(-written // samples_per_block) * samples_per_block


@pytest.mark.parametrize("samplerate", [8000, 11025, 16000, 22050, 32000, 37800, 44100, 48000,
                                        88200, 96000, 176400, 192000])
def test_sample_rates_from_8_to_192_khz(tmp_path, samplerate):
    path = tmp_path / "in.wav"
    sf.write(str(path), music_like(samplerate, 1, 0.1), samplerate, subtype="PCM_16")
    info = inspect_upload(path, SETTINGS)
    assert (info.samplerate, info.channels, info.frames) == (samplerate, 1, round(samplerate * 0.1))


@pytest.mark.parametrize("channels", range(1, 9))
def test_one_to_eight_channels_are_accepted(tmp_path, channels):
    path = tmp_path / "in.wav"
    sf.write(str(path), music_like(48000, channels, 0.05), 48000, subtype="PCM_24")
    info = inspect_upload(path, SETTINGS)
    assert (info.channels, info.frames) == (channels, 2400)


def test_more_than_eight_channels_are_refused(tmp_path):
    path = write(tmp_path, riff(fmt_chunk(channels=9), chunk(b"data", bytes(18 * 10))))
    error = refusal(path)
    assert error.code == "too_many_channels"
    assert "9 channels" in error.message and "at most 8" in error.message


@pytest.mark.parametrize("frames", [1, 4410])
def test_very_short_files_are_accepted(tmp_path, frames):
    path = write(tmp_path, plain_wav(pcm16(frames)))
    assert inspect_upload(path, SETTINGS).frames == frames


def test_float_beyond_full_scale_and_digital_silence_are_accepted(tmp_path):
    loud = tmp_path / "loud.wav"
    sf.write(str(loud), music_like(44100, 2, 0.1) * 8, 44100, subtype="FLOAT")
    silent = tmp_path / "silent.wav"
    sf.write(str(silent), np.zeros((4410, 2)), 44100, subtype="DOUBLE")
    assert inspect_upload(loud, SETTINGS).frames == inspect_upload(silent, SETTINGS).frames == 4410


# ---- refused --------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(NOT_AUDIO))
def test_what_is_not_audio_is_415_saying_what_it_looks_like(tmp_path, case):
    content, message_parts = NOT_AUDIO[case]
    error = refusal(write(tmp_path, content))
    assert isinstance(error, UnsupportedMediaType) and error.http_status == 415
    assert error.code == "unsupported_format" and "not an audio format the service reads" in error.message
    for part in message_parts:
        assert part in error.message


@pytest.mark.parametrize("case", list(UNDECODABLE))
def test_a_wav_nothing_can_decode_is_422_with_the_reason(tmp_path, case):
    content, message_parts = UNDECODABLE[case]
    error = refusal(write(tmp_path, content))
    assert error.http_status == 422 and error.code == "undecodable_wav"
    assert error.message.startswith("the WAV could not be decoded: ")
    for part in message_parts:
        assert part in error.message


@pytest.mark.parametrize("content", [plain_wav(SAMPLES[:0]), riff(fmt_chunk(), data_header(0)),
                                     riff(fmt_chunk(), data_header(STREAMED), size=STREAMED),
                                     plain_wav()[:44]])
def test_zero_frames_is_empty_audio(tmp_path, content):
    error = refusal(write(tmp_path, content))
    assert error.code == "empty_audio" and "zero frames" in error.message


def float_wav(tmp_path: Path, subtype: str, bad_frame: int, bad_channel: int, value: float,
              frames: int = 3 * 1000) -> Path:
    samples = music_like(44100, 2, frames / 44100)[:frames].astype(np.float64)
    samples[bad_frame, bad_channel] = value
    samples[bad_frame + 5, 0] = np.nan  # a later one must not be the one reported
    path = tmp_path / "float.wav"
    sf.write(str(path), samples, 44100, subtype=subtype)
    return path


@pytest.mark.parametrize("subtype,value,expected", [
    ("FLOAT", np.nan, "a NaN sample"),
    ("FLOAT", np.inf, "an infinite sample"),
    ("DOUBLE", -np.inf, "an infinite sample"),
    ("DOUBLE", np.nan, "a NaN sample"),
    ("DOUBLE", 1e300, "a sample of 1e+300, beyond the 32-bit float range"),
])
def test_nan_and_infinite_samples_are_refused_naming_the_first(tmp_path, monkeypatch, subtype, value,
                                                               expected):
    monkeypatch.setattr(intake, "SCAN_BLOCK_FRAMES", 1000)  # the culprit sits in the third block
    path = float_wav(tmp_path, subtype, bad_frame=2205, bad_channel=1, value=value)
    error = refusal(path)
    assert error.code == "non_finite_samples"
    assert f"{expected} at frame 2205 (channel 2, 0.050 s in)" in error.message


def test_the_scan_reads_the_file_in_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(intake, "SCAN_BLOCK_FRAMES", 1000)
    path = tmp_path / "clean.wav"
    sf.write(str(path), music_like(44100, 2, 0.1), 44100, subtype="FLOAT")
    reads = []
    original_blocks = sf.SoundFile.blocks

    def spy(self, blocksize=None, *args, **kwargs):
        for block in original_blocks(self, blocksize, *args, **kwargs):
            reads.append(len(block))
            yield block

    monkeypatch.setattr(sf.SoundFile, "blocks", spy)
    assert intake.find_unusable_sample(path, "FLOAT") is None
    assert reads == [1000] * 4 + [410]


def test_a_declared_duration_over_the_limit_is_refused_before_scanning(tmp_path):
    path = float_wav(tmp_path, "FLOAT", bad_frame=10, bad_channel=0, value=np.nan, frames=44100 * 3)
    error = refusal(path, dataclasses.replace(SETTINGS, max_duration_s=2))
    assert error.code == "too_long"
    assert "lasts 3.0 s" in error.message and "at most 2 s" in error.message
    assert "DEMIX_MAX_DURATION_S" in error.message


def test_the_duration_limit_defaults_to_three_hours():
    assert Settings().max_duration_s == 3 * 3600
    assert Settings.from_env({"DEMIX_MAX_DURATION_S": "60"}).max_duration_s == 60
