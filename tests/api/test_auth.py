"""API keys: 401 without a valid key, each key sees only its own jobs, the per-key limit
on active jobs (429 + Retry-After), and keys never stored or logged. Real HTTP against
an app with keys, in front of a queue no worker consumes."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging

import pytest
import requests

from demix import api_keys as auth
from demix.api_keys import load_api_keys, owner_id
from demix import redis_keys as keys
from demix.errors import SeparationFailed
from demix.jobs.records import JobStore, new_job_id
from testkit.synthetic_audio import wav_bytes
from tests.support.environment import SESSION_DIR
from tests.support.live import LiveServer

KEYS = ("key-alpha-1c2d", "key-beta-9f8e", "key-gamma-77aa", "key-delta-0b0b")
LIMIT_KEY, RACE_KEY = "key-limit-5e5e", "key-race-4d4d"  # each used by one test only
LIMIT = 2
KEYED_QUEUE = "demix-tests-keyed"


@pytest.fixture(scope="module")
def keyed_server(redis_server, settings):
    from demix.api import create_app

    keyed = dataclasses.replace(settings, queue=KEYED_QUEUE, data_dir=SESSION_DIR / "keyed-data",
                                max_upload_mb=1, api_keys=",".join(KEYS + (LIMIT_KEY, RACE_KEY)),
                                max_active_jobs_per_key=LIMIT)
    with LiveServer(create_app({"SETTINGS": keyed})) as server:
        yield server


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def submit(server, key: str, tmp_path, **kwargs) -> requests.Response:
    return requests.post(f"{server.url}/v1/jobs", files={"file": ("a.wav", wav_bytes(tmp_path, seconds=0.2))},
                         headers=bearer(key), timeout=30, **kwargs)


def queued_messages(redis_client) -> int:
    return sum(redis_client.llen(key) for key in keys.queue_keys(KEYED_QUEUE))


# -- the setting -----------------------------------------------------------------------------

def test_keys_are_read_comma_separated_or_from_a_file(tmp_path):
    assert len(load_api_keys(" a1 , b2 ,, ")) == 2
    assert not load_api_keys("")
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# team keys\nfirst-key\n\n  second-key  \n")
    loaded = load_api_keys(str(key_file))
    assert len(loaded) == 2 and loaded.owner_of("second-key") == owner_id("second-key")
    assert loaded.owner_of("# team keys") is None


@pytest.mark.parametrize("setting,message", [
    ("/no/such/keys.txt", "cannot be read"),
    (" , ", "holds no API key"),
])
def test_a_broken_key_setting_stops_the_app_saying_why(setting, message):
    with pytest.raises(ValueError, match=message):
        load_api_keys(setting)


def test_an_error_about_a_key_file_never_shows_a_key(tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("good-key\nbad key-with-space\n")
    with pytest.raises(ValueError, match="whitespace") as caught:
        load_api_keys(str(key_file))
    assert "bad key" not in str(caught.value) and "good-key" not in str(caught.value)
    assert "secret-one" not in repr(load_api_keys("secret-one"))


def test_keys_are_not_shown_by_demix_config_nor_in_the_settings_repr(monkeypatch, capsys, settings):
    from demix.cli.main import main

    monkeypatch.setenv("DEMIX_API_KEYS", "printed-never-1,printed-never-2")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "DEMIX_API_KEYS=<2 hidden>" in out and "printed-never" not in out
    assert "printed-never" not in repr(dataclasses.replace(settings, api_keys="printed-never-1"))
    monkeypatch.setenv("DEMIX_API_KEYS", "/etc/demix/keys.txt")  # a path is no secret
    main(["config"])
    assert "DEMIX_API_KEYS=/etc/demix/keys.txt" in capsys.readouterr().out


def test_a_key_is_compared_against_every_key_in_constant_time(monkeypatch):
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b))
    api_keys = load_api_keys(",".join(KEYS))
    assert api_keys.owner_of(KEYS[0]) == owner_id(KEYS[0])  # the first key matches...
    assert len(calls) == len(KEYS)  # ...and all are still compared, as equal-length digests
    assert set(calls) == {(32, 32)}
    assert api_keys.owner_of("key-alpha") is None  # a prefix of a key is no key


# -- who may call ----------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {KEYS[0]}"},
                                     {"Authorization": "Bearer not-a-key"}], ids=["none", "empty", "basic", "wrong"])
def test_v1_without_a_valid_key_is_401_with_www_authenticate(keyed_server, redis_client, tmp_path, headers):
    before = queued_messages(redis_client)
    for response in (
            requests.get(f"{keyed_server.url}/v1/jobs/{new_job_id()}", headers=headers, timeout=10),
            requests.get(f"{keyed_server.url}/v1/no-such-endpoint", headers=headers, timeout=10),
            requests.post(f"{keyed_server.url}/v1/jobs", files={"file": ("a.wav", wav_bytes(tmp_path))},
                          headers=headers, timeout=30)):
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="demix"')
        assert "not-a-key" not in response.text
    assert queued_messages(redis_client) == before


@pytest.mark.parametrize("path", ["/healthz", "/openapi.json", "/docs"])
def test_service_endpoints_stay_open(keyed_server, path):
    assert requests.get(f"{keyed_server.url}{path}", timeout=10).status_code == 200


def test_another_keys_job_is_a_404_exactly_like_an_unknown_id(keyed_server, redis_client, tmp_path):
    response = submit(keyed_server, KEYS[0], tmp_path)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert requests.get(f"{keyed_server.url}/v1/jobs/{job_id}", headers=bearer(KEYS[0]),
                        timeout=10).json()["id"] == job_id

    unknown_id = new_job_id()
    for suffix in ("", "/result", "/stems.zip", "/stems/vocals.wav"):
        theirs = requests.get(f"{keyed_server.url}/v1/jobs/{job_id}{suffix}", headers=bearer(KEYS[1]), timeout=10)
        unknown = requests.get(f"{keyed_server.url}/v1/jobs/{unknown_id}{suffix}", headers=bearer(KEYS[1]),
                               timeout=10)
        assert theirs.status_code == unknown.status_code == 404
        assert theirs.text.replace(job_id, unknown_id) == unknown.text
        assert sorted(theirs.headers) == sorted(unknown.headers)
    JobStore(redis_client).mark_failed(job_id, SeparationFailed("done with it"))


def test_the_job_stores_an_owner_id_never_the_key(keyed_server, redis_client, tmp_path):
    job_id = submit(keyed_server, KEYS[2], tmp_path).json()["id"]
    record = redis_client.hgetall(keys.job_key(job_id))
    assert JobStore(redis_client).get(job_id).owner == hashlib.sha256(KEYS[2].encode()).hexdigest()[:16]
    assert not any(KEYS[2].encode() in value for value in record.values())
    assert not any(KEYS[2].encode() in key for key in redis_client.keys("*"))
    JobStore(redis_client).mark_failed(job_id, SeparationFailed("done with it"))


def test_keys_are_never_logged(keyed_server, caplog, tmp_path):
    with caplog.at_level(logging.DEBUG):
        submit(keyed_server, KEYS[3], tmp_path)
        requests.get(f"{keyed_server.url}/v1/jobs/{new_job_id()}", headers=bearer("wrong-key-xyz"), timeout=10)
    assert caplog.records  # the requests were logged...
    assert not [r for r in caplog.records if KEYS[3] in r.getMessage() or "wrong-key-xyz" in r.getMessage()]


# -- the per-key limit -----------------------------------------------------------------------

def test_over_the_active_job_limit_is_429_with_retry_after(keyed_server, redis_client, tmp_path):
    key, server = LIMIT_KEY, keyed_server
    first, second = (submit(server, key, tmp_path).json()["id"] for _ in range(LIMIT))
    before = (queued_messages(redis_client), redis_client.zcard(keys.jobs_index_key()))
    refused = submit(server, key, tmp_path)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_active_jobs"
    assert refused.headers["Retry-After"] == "30"  # nothing running: the default
    assert (queued_messages(redis_client), redis_client.zcard(keys.jobs_index_key())) == before
    assert submit(server, KEYS[1], tmp_path).status_code == 202  # other keys are not affected

    store = JobStore(redis_client)
    attempt = store.mark_running(first, lease_s=60).attempts
    store.heartbeat(first, attempt, lease_s=60, progress=0.5)
    retry_after = int(submit(server, key, tmp_path).headers["Retry-After"])
    assert 1 <= retry_after <= 30  # about as long as it has run so far

    store.mark_succeeded(first, ["vocals"], attempt)  # a finished job frees its slot
    assert submit(server, key, tmp_path).status_code == 202
    store.delete(second)  # and so does a deleted one
    assert submit(server, key, tmp_path).status_code == 202
    assert submit(server, key, tmp_path).status_code == 429


def test_concurrent_submits_cannot_pass_the_limit_together(keyed_server, tmp_path):
    key = RACE_KEY
    body = wav_bytes(tmp_path, seconds=0.2)

    def post(_index: int) -> int:
        return requests.post(f"{keyed_server.url}/v1/jobs", files={"file": ("a.wav", body)},
                             headers=bearer(key), timeout=60).status_code

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        statuses = sorted(pool.map(post, range(6)))
    assert statuses == [202] * LIMIT + [429] * (6 - LIMIT)
