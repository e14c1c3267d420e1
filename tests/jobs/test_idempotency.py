"""Idempotency keys: the same `Idempotency-Key` gives back the first job, also under
concurrent submits (real HTTP, real Redis); keys of deleted jobs are free again."""
from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest
import requests

import demix.jobs.idempotency
from demix.jobs.idempotency import IdempotencyKeys
from demix.jobs.records import JobStore
from demix.jobs.retention import sweep_expired_jobs
from demix.storage.local import JobStorage
from testkit.synthetic_audio import wav_bytes
from tests.support.http_api import assert_error  # noqa: F401
from tests.support.service_state import job_count, queue_length  # noqa: F401


def submit(server, body: bytes, key: str | None) -> requests.Response:
    headers = {} if key is None else {"Idempotency-Key": key}
    return requests.post(f"{server.url}/v1/jobs", files={"file": ("song.wav", body, "audio/wav")},
                         headers=headers, timeout=60)


def unique_key(name: str) -> str:
    return f"{name}-{time.time_ns()}"


def test_a_repeated_key_answers_200_with_the_first_job(idle_server, redis_client, tmp_path):
    body, key = wav_bytes(tmp_path), unique_key("repeat")
    first = submit(idle_server, body, key)
    assert first.status_code == 202, first.text
    jobs, queued = job_count(redis_client), queue_length(redis_client)

    again = submit(idle_server, body, key)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Location"] == first.headers["Location"]
    assert (job_count(redis_client), queue_length(redis_client)) == (jobs, queued)
    assert not list(idle_server.settings.data_dir.joinpath("incoming").iterdir())

    other = submit(idle_server, body, unique_key("other"))
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]


def test_concurrent_submits_with_one_key_create_exactly_one_job(idle_server, redis_client, tmp_path):
    body, key, clients = wav_bytes(tmp_path, seconds=2.0), unique_key("race"), 8
    jobs, queued = job_count(redis_client), queue_length(redis_client)
    start = threading.Barrier(clients)

    def race(_: int) -> requests.Response:
        start.wait(timeout=60)
        return submit(idle_server, body, key)

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        responses = list(pool.map(race, range(clients)))
    assert sorted(r.status_code for r in responses) == [200] * (clients - 1) + [202], \
        [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert job_count(redis_client) == jobs + 1 and queue_length(redis_client) == queued + 1
    # Every duplicate's upload was discarded; only the one job's input is kept.
    assert not list(idle_server.settings.data_dir.joinpath("incoming").iterdir())


def test_the_key_of_a_deleted_job_can_be_used_again(idle_server, tmp_path):
    body, key = wav_bytes(tmp_path), unique_key("reuse")
    first = submit(idle_server, body, key).json()["id"]
    assert requests.delete(f"{idle_server.url}/v1/jobs/{first}", timeout=30).status_code == 204
    second = submit(idle_server, body, key)
    assert second.status_code == 202 and second.json()["id"] != first
    assert submit(idle_server, body, key).json()["id"] == second.json()["id"]


def test_the_key_of_a_job_expired_by_retention_can_be_used_again(idle_server, redis_client, tmp_path):
    body, key = wav_bytes(tmp_path), unique_key("expired")
    first = submit(idle_server, body, key).json()["id"]
    store = JobStore(redis_client)
    store.mark_cancelled(first)  # finished (it would otherwise wait in the unconsumed queue)
    assert first in sweep_expired_jobs(store, JobStorage(idle_server.settings.data_dir), retention_s=1,
                                       now=time.time() + 2)
    second = submit(idle_server, body, key)
    assert second.status_code == 202 and second.json()["id"] != first


def test_a_repeat_is_answered_before_its_body_is_read(idle_server, tmp_path):
    key = unique_key("early")
    first = submit(idle_server, wav_bytes(tmp_path), key).json()["id"]
    # Not even a valid body: the repeat is recognised from its header alone.
    again = requests.post(f"{idle_server.url}/v1/jobs", data=b"not multipart", timeout=30,
                          headers={"Idempotency-Key": key, "Content-Type": "application/octet-stream"})
    assert again.status_code == 200 and again.json()["id"] == first


@pytest.mark.parametrize("key, reason", [
    ("", "empty"),
    ("x" * 256, "256 characters long"),
    ("has spaces in it", "printable ASCII"),
    ("caf\u00e9", "printable ASCII"),
])
def test_an_invalid_key_is_400_and_nothing_is_kept(idle_server, snapshot, tmp_path, key, reason):
    response = requests.post(f"{idle_server.url}/v1/jobs", timeout=30,
                             files={"file": ("song.wav", wav_bytes(tmp_path), "audio/wav")},
                             headers={"Idempotency-Key": key.encode("utf-8")})
    assert_error(response, 400, "invalid_idempotency_key", reason)
    assert snapshot()


def test_a_submit_with_a_failed_upload_does_not_use_up_the_key(idle_server, tmp_path):
    key = unique_key("bad-first")
    bad = submit(idle_server, b"ID3\x04" + bytes(100), key)
    assert bad.status_code == 415
    assert submit(idle_server, wav_bytes(tmp_path), key).status_code == 202


# ------------------------------------------------------------------ IdempotencyKeys itself

@pytest.fixture
def existing_jobs():
    return set()


@pytest.fixture
def idempotency_keys(redis_client, existing_jobs) -> IdempotencyKeys:
    return IdempotencyKeys(redis_client, ttl_s=3600, job_exists=existing_jobs.__contains__)


def test_keys_are_scoped_per_owner(idempotency_keys, existing_jobs):
    key = unique_key("owned")
    assert idempotency_keys.claim("alice", key, "a" * 32) is None
    assert idempotency_keys.claim("bob", key, "b" * 32) is None
    existing_jobs.update({"a" * 32, "b" * 32})
    idempotency_keys.confirm("alice", key, "a" * 32)
    idempotency_keys.confirm("bob", key, "b" * 32)
    assert idempotency_keys.find("alice", key) == "a" * 32
    assert idempotency_keys.find("bob", key) == "b" * 32


def test_a_claim_whose_submit_died_is_taken_over_after_the_grace_time(idempotency_keys, monkeypatch):
    key = unique_key("dead")
    assert idempotency_keys.claim("o", key, "1" * 32) is None  # never confirmed: its submit died
    monkeypatch.setattr(demix.jobs.idempotency, "PENDING_GRACE_S", 0.2)
    assert idempotency_keys.claim("o", key, "2" * 32) is None


def test_a_waiting_submit_gets_the_job_once_the_claimer_confirms(idempotency_keys, existing_jobs):
    key = unique_key("wait")
    assert idempotency_keys.claim("o", key, "3" * 32) is None

    def create_then_confirm() -> None:
        time.sleep(0.3)
        existing_jobs.add("3" * 32)
        idempotency_keys.confirm("o", key, "3" * 32)

    thread = threading.Thread(target=create_then_confirm)
    thread.start()
    assert idempotency_keys.claim("o", key, "4" * 32) == "3" * 32
    thread.join(10)


def test_a_released_claim_frees_the_key(idempotency_keys):
    key = unique_key("released")
    assert idempotency_keys.claim("o", key, "5" * 32) is None
    idempotency_keys.release("o", key, "5" * 32)
    assert idempotency_keys.claim("o", key, "6" * 32) is None


def test_the_key_expires_with_the_retention_time(redis_client):
    keys = IdempotencyKeys(redis_client, ttl_s=7200, job_exists=lambda job_id: True)
    key = unique_key("ttl")
    keys.claim("o", key, "7" * 32)
    keys.confirm("o", key, "7" * 32)
    ttl = redis_client.ttl(keys._redis_key("o", key))
    assert 7000 < ttl <= 7200  # confirming kept the TTL
