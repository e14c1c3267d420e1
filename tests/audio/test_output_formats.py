"""Resolving a job's output options against its input."""
from __future__ import annotations

import pytest

from demix.audio.io import AudioInfo
from demix.errors import BadRequest
from demix.audio.output_formats import OutputOptions, resolve_output


def info(subtype: str = "PCM_16", samplerate: int = 44100, channels: int = 2) -> AudioInfo:
    return AudioInfo(samplerate=samplerate, channels=channels, frames=1000, subtype=subtype, container="WAV")


@pytest.mark.parametrize("subtype,expected", [
    ("PCM_16", "pcm16"), ("PCM_24", "pcm24"), ("PCM_U8", "pcm16"), ("ULAW", "pcm16"),
    ("IMA_ADPCM", "pcm16"), ("PCM_32", "float32"), ("FLOAT", "float32"), ("DOUBLE", "float32"),
])
def test_by_default_stems_keep_the_inputs_own_format_rate_and_channels(subtype, expected):
    options = resolve_output({}, info(subtype, 22050, 1))
    assert (options.format, options.sample_format, options.samplerate, options.channels) == \
        ("wav", expected, 22050, 1)
    assert options.clip == "clamp" and options.channel_mode == "input"


def decoded(container: str, codec: str, decoded_subtype: str, lossy: bool) -> AudioInfo:
    """What intake says of a non-WAV input it decoded to a WAV of `decoded_subtype`."""
    return AudioInfo(samplerate=48000, channels=2, frames=1000, subtype=codec, container=container,
                     lossy=lossy, decoded_subtype=decoded_subtype)


@pytest.mark.parametrize("input_info,expected", [
    (decoded("MP3", "MPEG_LAYER_III", "FLOAT", True), ("wav", "pcm24")),
    (decoded("MP4", "AAC_LC", "FLOAT", True), ("wav", "pcm24")),
    (decoded("OGG", "OPUS", "FLOAT", True), ("wav", "pcm24")),
    (decoded("WEBM", "VORBIS", "FLOAT", True), ("wav", "pcm24")),
    (decoded("FLAC", "PCM_16", "PCM_16", False), ("flac", "pcm16")),
    (decoded("FLAC", "PCM_24", "PCM_24", False), ("flac", "pcm24")),
    (decoded("FLAC", "PCM_32", "PCM_32", False), ("flac", "pcm24")),
    (decoded("MP4", "ALAC_16", "PCM_16", False), ("wav", "pcm16")),
    (decoded("MP4", "ALAC_24", "PCM_24", False), ("wav", "pcm24")),
    (decoded("AIFF", "PCM_24", "PCM_24", False), ("wav", "pcm24")),
    (decoded("AIFF-C", "FLOAT", "FLOAT", False), ("wav", "float32")),
])
def test_decoded_inputs_default_to_what_a_musician_expects(input_info, expected):
    options = resolve_output({}, input_info)
    assert (options.format, options.sample_format) == expected
    assert (options.samplerate, options.channels) == (48000, 2)


def test_explicit_choices_are_kept():
    options = resolve_output({"format": "FLAC", "sample_format": "pcm24", "samplerate": "48000",
                              "clip": "rescale", "channels": "stereo"}, info(channels=6))
    assert options == OutputOptions(format="flac", sample_format="pcm24", samplerate=48000,
                                    channels=2, channel_mode="stereo", bitrate=320, clip="rescale")
    assert options.subtype == "PCM_24" and options.mime_type == "audio/flac"


def test_mp3_takes_a_bitrate_and_the_highest_rate_it_can_store():
    options = resolve_output({"format": "mp3", "bitrate": "192"}, info("FLOAT", 96000))
    assert (options.bitrate, options.samplerate, options.subtype) == (192, 48000, "MPEG_LAYER_III")


def test_flac_of_a_float_input_defaults_to_24_bit():
    assert resolve_output({"format": "flac"}, info("FLOAT")).sample_format == "pcm24"


@pytest.mark.parametrize("form,message", [
    ({"format": "ogg"}, "unknown format value 'ogg'"),
    ({"sample_format": "pcm8"}, "unknown sample_format"),
    ({"clip": "wrap"}, "unknown clip"),
    ({"samplerate": "fast"}, "samplerate must be 'input'"),
    ({"samplerate": "1000"}, "outside 8000..192000"),
    ({"format": "mp3", "bitrate": "100"}, "bitrate must be one of"),
    ({"format": "mp3", "samplerate": "96000"}, "MP3 cannot store 96000 Hz"),
    ({"format": "mp3", "sample_format": "pcm24"}, "does not apply to mp3"),
    ({"format": "flac", "sample_format": "float32"}, "FLAC stores integer samples only"),
])
def test_impossible_requests_are_400_saying_what_would_work(form, message):
    with pytest.raises(BadRequest, match=message) as caught:
        resolve_output(form, info())
    assert caught.value.code == "invalid_output"


def test_mp3_refuses_more_than_two_channels_unless_downmixed():
    with pytest.raises(BadRequest, match="channels=stereo"):
        resolve_output({"format": "mp3"}, info(channels=6))
    assert resolve_output({"format": "mp3", "channels": "stereo"}, info(channels=6)).channels == 2


def test_options_survive_the_job_record():
    options = resolve_output({"format": "mp3", "bitrate": "128"}, info())
    assert OutputOptions.from_dict(options.to_dict()) == options
