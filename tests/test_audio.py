"""Probing uploads and writing stems bit-exactly."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from shared.audio import (describe_non_wav, dequantize, output_subtype, probe_wav, quantize,
                          write_audio)
from shared.errors import InvalidAudio
from tests.audio_factory import music_like, write_wav


@pytest.mark.parametrize("head,expected", [
    (b"RIFF\x00\x00\x00\x00WAVEfmt ", None),
    (b"RF64\xff\xff\xff\xffWAVEds64", None),
    (b"OggS\x00\x02", "Ogg"),
    (b"\x00\x00\x00\x20ftypM4A ", "MP4/M4A"),
    (b"FORM\x00\x00\x00\x00AIFFCOMM", "AIFF"),
    (b"RIFF\x00\x00\x00\x00AVI LIST", "'AVI '"),
    (b"  <html><head>", "HTML"),
])
def test_describe_non_wav_names_what_the_file_is(head, expected):
    description = describe_non_wav(head)
    if expected is None:
        assert description is None
    else:
        assert expected in description


def test_probe_reports_the_header(tmp_path):
    path = write_wav(tmp_path / "a.wav", 22050, 1, seconds=0.5, subtype="PCM_24")
    info = probe_wav(path)
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (22050, 1, 11025, "PCM_24")


def test_probe_refuses_a_wav_with_a_missing_fmt_chunk(tmp_path):
    path = tmp_path / "nofmt.wav"
    path.write_bytes(b"RIFF\x24\x00\x00\x00WAVEdata\x10\x00\x00\x00" + bytes(16))
    with pytest.raises(InvalidAudio) as caught:
        probe_wav(path)
    assert caught.value.code == "undecodable_wav" and str(tmp_path) not in caught.value.message


@pytest.mark.parametrize("input_subtype,expected", [
    ("PCM_16", "PCM_16"), ("PCM_24", "PCM_24"), ("PCM_U8", "PCM_16"), ("ULAW", "PCM_16"),
    ("PCM_32", "FLOAT"), ("FLOAT", "FLOAT"), ("DOUBLE", "FLOAT"),
])
def test_output_keeps_the_input_sample_format_where_it_can(input_subtype, expected):
    assert output_subtype(input_subtype) == expected


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "FLOAT"])
def test_written_samples_read_back_exactly(tmp_path, subtype):
    samples = quantize(music_like(44100, 2, seconds=0.2) * 1.9, subtype)  # some beyond full scale
    path = tmp_path / "out.wav"
    write_audio(path, samples, 44100, subtype)
    read, _ = sf.read(str(path), dtype="float32", always_2d=True)
    assert sf.info(str(path)).subtype == subtype
    assert np.array_equal(read, dequantize(samples, subtype))


def test_quantize_clamps_instead_of_wrapping():
    values = quantize(np.array([[1.5], [-1.5], [0.5]], dtype=np.float32), "PCM_16")
    assert values[:, 0].tolist() == [32767, -32768, 16384]
