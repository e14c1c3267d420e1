"""schemathesis against the live app's own `/openapi.json`: real HTTP, real Redis, the
idle worker setup of `conftest` (jobs are queued, never run, so it stays fast).

Every operation is fuzzed with valid and invalid inputs (positive and negative
generation: random multipart bodies, wrong types, odd path values); each response must
be a non-5xx and match the spec: status code, content type, headers, body schema.
"""
from __future__ import annotations

import dataclasses
import io

import hypothesis
import pytest
import requests
import schemathesis
import soundfile as sf
from hypothesis import strategies as st
from schemathesis import GenerationMode

from demix.api.openapi import OPERATIONS
from demix import redis_keys as keys
from testkit.synthetic_audio import music_like, wav_bytes
from tests.support.environment import SESSION_DIR
from tests.support.live import LiveServer

EXAMPLES_PER_OPERATION = 20
"""Bounded, so the whole file runs in well under a minute on a loaded 2-core machine."""


def wav_file_bytes(samplerate: int, channels: int, subtype: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, music_like(samplerate, channels, 0.25), samplerate, subtype=subtype, format="WAV")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def api_schema(idle_server):
    # Positive cases upload real WAVs (of a few kinds), so the fuzzer reaches the 202 path
    # with random output options; negative cases upload anything at all.
    wavs = [wav_file_bytes(rate, channels, subtype) for rate, channels, subtype in
            [(44100, 2, "PCM_16"), (22050, 1, "PCM_24"), (48000, 2, "FLOAT"), (8000, 1, "ULAW")]]
    schemathesis.openapi.media_type("audio/wav", st.sampled_from(wavs))
    return schemathesis.openapi.from_url(f"{idle_server.url}/openapi.json")


def forget_idempotency_keys(client) -> None:
    """Make every generated request a first submit: hypothesis repeats header values, and
    a repeated `Idempotency-Key` rightly answers 200 with the first job whatever the body
    (replays are tested in test_idempotency)."""
    for key in client.scan_iter(match=keys.idempotency_key("*", "*")):
        client.delete(key)


def without_workflow_text(case, mode: GenerationMode) -> None:
    """No generator writes JSON text meeting `workflow`'s contentSchema, so a positive case
    leaves the field out: workflows are checked by tests/workflows/test_spec.py and run end
    to end in tests/workflows/."""
    if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
        case.body.pop("workflow", None)


def without_blank_choices(case, mode: GenerationMode) -> None:
    """A negative case breaks the form in a way other than a blank field: the parser takes a
    blank field as its default (tests/intake/test_job_request.py), which an `enum` cannot say."""
    if mode is GenerationMode.NEGATIVE and isinstance(case.body, dict) and any(
            isinstance(value, str) and not value.strip() for value in case.body.values()):
        hypothesis.reject()


# One test per operation and mode, from the same list the spec is built from (schemathesis'
# pytest plugin, `from_fixture`, does not run under pytest 9, so hypothesis is driven here).
# Negative cases need an input to break: operations without any only run positive ones.
CASES = [(op.endpoint.split(".")[-1], mode) for op in OPERATIONS for mode in GenerationMode
         if mode is GenerationMode.POSITIVE or op.parameters or op.request_body]


@pytest.mark.parametrize("operation_id,mode", CASES, ids=[f"{op}-{mode.value}" for op, mode in CASES])
def test_every_response_matches_the_spec(api_schema, redis_client, operation_id, mode):
    operation = api_schema.find_operation_by_id(operation_id)
    statuses = set()

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck), database=None,
                         phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
    def check(case):
        forget_idempotency_keys(redis_client)
        without_workflow_text(case, mode)
        without_blank_choices(case, mode)
        statuses.add(case.call_and_validate(timeout=30).status_code)

    check()
    if operation_id == "create_job":
        # Valid uploads with random options are queued; broken requests are refused.
        assert (202 in statuses) if mode is GenerationMode.POSITIVE else statuses <= {400, 413, 415, 422}, statuses


CONTRACT_KEY = "contract-test-key"


@pytest.fixture(scope="module")
def keyed_schema(api_schema, redis_server, settings):
    """The spec of an app with API keys and a per-key limit, and that app's URL."""
    from demix.api import create_app

    keyed = dataclasses.replace(settings, queue="demix-tests-contract-keyed", max_upload_mb=1,
                                data_dir=SESSION_DIR / "contract-keyed-data", api_keys=CONTRACT_KEY,
                                max_active_jobs_per_key=1000)
    with LiveServer(create_app({"SETTINGS": keyed})) as server:
        yield schemathesis.openapi.from_url(f"{server.url}/openapi.json")


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda mode: mode.value)
@pytest.mark.parametrize("operation_id", ["create_job", "get_job", "get_result"])
def test_with_api_keys_every_response_matches_the_spec(keyed_schema, redis_client, operation_id, mode):
    """With keys the spec adds the bearer scheme, 401 and 429; schemathesis also checks
    that a request without the key is refused."""
    operation = keyed_schema.find_operation_by_id(operation_id)
    statuses = set()

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(max_examples=EXAMPLES_PER_OPERATION // 2, deadline=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck), database=None,
                         phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
    def check(case):
        forget_idempotency_keys(redis_client)
        without_workflow_text(case, mode)
        without_blank_choices(case, mode)
        response = case.call_and_validate(headers={"Authorization": f"Bearer {CONTRACT_KEY}"}, timeout=30)
        statuses.add(response.status_code)

    check()
    if mode is GenerationMode.POSITIVE:  # negative cases also break the Authorization header
        assert 401 not in statuses, statuses
        if operation_id == "create_job":
            assert 202 in statuses


def test_a_real_wav_submitted_and_polled_matches_the_spec(api_schema, idle_server, tmp_path):
    """The happy path the fuzzer cannot reach with random bytes: a valid WAV is queued (202)
    and its job, polled, has the documented shape and a queue position."""
    submit = api_schema["/v1/jobs"]["POST"]
    response = requests.post(f"{idle_server.url}/v1/jobs", files={"file": ("a.wav", wav_bytes(tmp_path))},
                             data={"stems": "vocals", "format": "flac"}, timeout=30)
    assert response.status_code == 202, response.text
    submit.validate_response(response)
    job = response.json()
    assert job["status"] == "queued" and job["queue_position"] >= 1 and job["eta_s"] is None

    poll = requests.get(f"{idle_server.url}/v1/jobs/{job['id']}", timeout=10)
    api_schema["/v1/jobs/{job_id}"]["GET"].validate_response(poll)
    not_yet = requests.get(f"{idle_server.url}/v1/jobs/{job['id']}/result", timeout=10)
    assert not_yet.status_code == 409
    api_schema["/v1/jobs/{job_id}/result"]["GET"].validate_response(not_yet)


def test_the_validator_catches_a_response_that_breaks_the_spec(api_schema, idle_server, tmp_path):
    """The checks above can fail: a job JSON with an undocumented field is refused."""
    response = requests.post(f"{idle_server.url}/v1/jobs", files={"file": ("a.wav", wav_bytes(tmp_path))},
                             timeout=30)
    response._content = response.content.replace(b'"id":', b'"undocumented": 1, "id":', 1)
    with pytest.raises(Exception, match="undocumented"):
        api_schema["/v1/jobs"]["POST"].validate_response(response)
