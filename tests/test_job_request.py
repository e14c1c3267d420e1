"""The one job-request parser: form fields in, stems choice and resolved output out."""
from __future__ import annotations

import pytest

from shared.audio import AudioInfo
from shared.errors import BadRequest
from shared.job_request import FORM_FIELDS, JobRequest, default_output, parse_job_request
from shared.output import OutputOptions
from shared.stems import STEM_CHOICES, output_names


def info(subtype: str = "PCM_24", samplerate: int = 48000, channels: int = 1) -> AudioInfo:
    return AudioInfo(samplerate=samplerate, channels=channels, frames=1000, subtype=subtype, container="WAV")


def test_an_empty_form_asks_for_all_stems_in_the_inputs_own_format():
    request = parse_job_request({}, info())
    assert request == JobRequest(stems="all", output=OutputOptions(
        format="wav", sample_format="pcm24", samplerate=48000, channels=1, channel_mode="input",
        bitrate=320, clip="clamp"))
    assert default_output(info()) == request.output


@pytest.mark.parametrize("raw,stems", [("vocals", "vocals"), (" Drums ", "drums"), ("", "all"), ("ALL", "all")])
def test_stems_are_matched_case_insensitively_and_blank_means_all(raw, stems):
    assert parse_job_request({"stems": raw}, info()).stems == stems


def test_an_unknown_stems_value_is_invalid_stems_naming_the_choices():
    with pytest.raises(BadRequest) as caught:
        parse_job_request({"stems": "guitar"}, info())
    assert caught.value.code == "invalid_stems" and caught.value.http_status == 400
    assert "'guitar'" in caught.value.message and all(c in caught.value.message for c in STEM_CHOICES)


def test_output_names_refuse_what_the_parser_refuses_with_the_same_error():
    assert output_names("bass") == ["bass", "no_bass"]
    with pytest.raises(BadRequest, match="unknown stems value 'no_bass'") as caught:
        output_names("no_bass")
    assert caught.value.code == "invalid_stems"


def test_the_output_error_of_the_parser_is_invalid_output():
    with pytest.raises(BadRequest, match="FLAC stores integer samples only") as caught:
        parse_job_request({"stems": "vocals", "format": "flac", "sample_format": "float32"}, info())
    assert caught.value.code == "invalid_output"


@pytest.mark.parametrize("field", [f for f in FORM_FIELDS if f.choices], ids=lambda f: f.name)
def test_every_documented_choice_is_accepted_and_others_refused(field):
    for choice in field.choices:
        parse_job_request({field.name: choice}, info(channels=2))
    with pytest.raises(BadRequest):
        parse_job_request({field.name: "no-such-value"}, info(channels=2))


def test_every_mp3_bitrate_in_the_fields_schema_is_accepted():
    bitrate = next(f for f in FORM_FIELDS if f.name == "bitrate")
    for rate in bitrate.schema["enum"]:
        assert parse_job_request({"format": "mp3", "bitrate": str(rate)}, info()).output.bitrate == rate
    with pytest.raises(BadRequest, match="bitrate"):
        parse_job_request({"format": "mp3", "bitrate": "100"}, info())


def test_documented_defaults_are_what_the_parser_fills_in():
    defaults = {f.name: f.default for f in FORM_FIELDS if f.default is not None}
    parsed = parse_job_request({}, info())
    resolved = {"stems": parsed.stems, "bitrate": str(parsed.output.bitrate),
                "clip": parsed.output.clip, "channels": parsed.output.channel_mode,
                "samplerate": "input" if parsed.output.samplerate == info().samplerate else None}
    assert defaults == resolved
    assert parse_job_request(defaults, info()) == parsed
