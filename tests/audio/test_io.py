"""Probing uploads and writing stems bit-exactly."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from demix.audio.io import describe_non_wav, dequantize, quantize, read_info, write_audio
from testkit.synthetic_audio import music_like, write_wav


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


def test_read_info_reports_the_header(tmp_path):
    path = write_wav(tmp_path / "a.wav", 22050, 1, seconds=0.5, subtype="PCM_24")
    info = read_info(path)
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (22050, 1, 11025, "PCM_24")


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
