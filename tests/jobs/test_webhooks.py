"""Webhook deliveries: a real Redis queue, a real sender and a real HTTP receiver; receivers
that trickle, hang, fail and redirect, records left malformed, and (the chaos test) senders
killed mid-delivery: every job's webhook still reaches its healthy receiver exactly once."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
import typing as tp
from pathlib import Path

import pytest
import redis
import requests

from demix.cli.redis_server import free_port
from demix import redis_keys as keys
from demix.jobs import webhook_health, webhooks
from demix.audio.io import AudioInfo
from demix.errors import BadRequest
from demix.intake.job_request import parse_job_request
from demix.jobs.records import Job, JobStatus, new_job_id
from demix.jobs.webhooks import WebhookQueue, WebhookSender, validate_callback_url, verify_signature
from demix.worker.background import BackgroundProcess
from testkit.synthetic_audio import wav_bytes
from tests.support.webhook_receiver import HANG, Redirect, Slow, Trickle, WebhookReceiver
from tests.support.service_state import database_url, empty_database
from tests.support.waiting import wait_for

SECRET = "s3cret-for-tests"


@pytest.fixture
def webhook_redis(redis_server):
    """Database 1 of the test Redis: the session's worker runs its own sender on database 0."""
    with empty_database(redis_server, 1) as client:
        yield client


@pytest.fixture
def webhook_settings(settings):
    return dataclasses.replace(settings, webhook_secret=SECRET, webhook_attempts=3,
                               webhook_backoff_s=0.1, webhook_timeout_s=5.0,
                               public_url="http://demix.example:8000/")


def make_sender(webhook_redis, webhook_settings, **overrides) -> WebhookSender:
    settings = dataclasses.replace(webhook_settings, **overrides)
    return WebhookSender(WebhookQueue(webhook_redis, settings), poll_interval_s=0.05)


def finished_job(callback_url: str | None, status: JobStatus = JobStatus.SUCCEEDED) -> Job:
    now = time.time()
    return Job(id=new_job_id(), status=status, stems="vocals", model="tiny", samplerate=44100,
               channels=2, frames=44100, created_at=now - 5, started_at=now - 4, finished_at=now,
               progress=1.0, outputs=["vocals", "no_vocals"] if status is JobStatus.SUCCEEDED else [],
               output={"format": "flac"}, callback_url=callback_url,
               error=None if status is JobStatus.SUCCEEDED else {"code": "x", "message": "why"})


@pytest.mark.parametrize("url", ["http://example.com/hook", "https://h.example:8443/a?b=c",
                                 "  http://127.0.0.1:9/x  "])
def test_http_and_https_callback_urls_are_accepted(url):
    assert validate_callback_url(url) == url.strip()


@pytest.mark.parametrize("url", ["ftp://example.com/x", "javascript:alert(1)", "file:///etc/passwd",
                                 "example.com/hook", "http:///nohost", "http://exa mple.com/",
                                 "http://example.com:99999/", "http://example.com/" + "a" * 3000])
def test_other_callback_urls_are_refused(url):
    with pytest.raises(BadRequest) as error:
        validate_callback_url(url)
    assert error.value.code == "invalid_callback_url"


def test_the_job_request_parser_checks_the_callback_url():
    info = AudioInfo(samplerate=44100, channels=2, frames=100, subtype="PCM_16", container="WAV")
    assert parse_job_request({"callback_url": "https://h.example/x"}, info).callback_url == "https://h.example/x"
    assert parse_job_request({}, info).callback_url is None
    with pytest.raises(BadRequest, match="only http and https"):
        parse_job_request({"callback_url": "gopher://h.example/"}, info)


def test_no_callback_url_means_no_webhook():
    assert validate_callback_url(None) is None and validate_callback_url("  ") is None


def test_a_finished_job_is_posted_signed_with_its_json(webhook_redis, webhook_settings):
    with WebhookReceiver([200]) as receiver:
        job = finished_job(receiver.url)
        queue = WebhookQueue(webhook_redis, webhook_settings)
        queue.on_job_finished(job)
        sender = make_sender(webhook_redis, webhook_settings).start()
        try:
            [received] = receiver.wait_for(1)
            wait_for(lambda: queue.pending() == 0, "the webhook queue drained", timeout=60.0)
        finally:
            sender.stop()
    signature = received.headers["X-Demix-Signature"]
    assert signature.startswith("sha256=")
    assert verify_signature(received.body, signature, SECRET)
    assert not verify_signature(received.body, signature, "another secret")
    assert not verify_signature(received.body + b" ", signature, SECRET)
    body = json.loads(received.body)
    assert body["id"] == job.id and body["status"] == "succeeded" and body["callback_url"] == receiver.url
    base = f"http://demix.example:8000/v1/jobs/{job.id}"
    assert body["url"] == base
    assert body["outputs"] == {"vocals": f"{base}/stems/vocals.flac",
                               "no_vocals": f"{base}/stems/no_vocals.flac"}
    assert body["result_url"] == f"{base}/result" and body["zip_url"] == f"{base}/stems.zip"
    assert received.headers["Content-Type"] == "application/json"
    assert received.headers["X-Demix-Attempt"] == "1" and len(received.headers["X-Demix-Delivery"]) == 32
    assert not webhook_redis.keys(keys.webhook_key("*"))


@pytest.mark.parametrize("status", [JobStatus.FAILED, JobStatus.SUCCEEDED])
def test_every_final_status_is_delivered(webhook_redis, webhook_settings, status):
    with WebhookReceiver([200]) as receiver:
        WebhookQueue(webhook_redis, webhook_settings).on_job_finished(finished_job(receiver.url, status))
        sender = make_sender(webhook_redis, webhook_settings).start()
        try:
            [received] = receiver.wait_for(1)
        finally:
            sender.stop()
    body = json.loads(received.body)
    assert body["status"] == status.value
    if status is JobStatus.FAILED:
        assert body["error"] == {"code": "x", "message": "why"} and body["outputs"] is None


def test_a_job_without_callback_url_queues_nothing(webhook_redis, webhook_settings):
    WebhookQueue(webhook_redis, webhook_settings).on_job_finished(finished_job(None))
    assert WebhookQueue(webhook_redis, webhook_settings).pending() == 0


def test_failures_are_retried_with_the_same_body_until_one_succeeds(webhook_redis, webhook_settings):
    with WebhookReceiver([500, 503, 204]) as receiver:
        queue = WebhookQueue(webhook_redis, webhook_settings)
        queue.enqueue(finished_job(receiver.url))
        sender = make_sender(webhook_redis, webhook_settings).start()
        try:
            received = receiver.wait_for(3)
            wait_for(lambda: queue.pending() == 0, "the webhook queue drained", timeout=60.0)
            time.sleep(1.0)  # several backoffs: a delivered webhook is not sent again
        finally:
            sender.stop()
    assert len(receiver.requests) == 3
    assert [r.headers["X-Demix-Attempt"] for r in received] == ["1", "2", "3"]
    assert len({r.headers["X-Demix-Delivery"] for r in received}) == 1
    assert len({r.body for r in received}) == 1
    assert all(verify_signature(r.body, r.headers["X-Demix-Signature"], SECRET) for r in received)


def test_a_delivery_is_given_up_after_the_configured_attempts(webhook_redis, webhook_settings):
    with WebhookReceiver([500]) as receiver:
        queue = WebhookQueue(webhook_redis, webhook_settings)
        queue.enqueue(finished_job(receiver.url))
        sender = make_sender(webhook_redis, webhook_settings).start()
        try:
            receiver.wait_for(3)
            wait_for(lambda: queue.pending() == 0, "the webhook queue drained", timeout=60.0)
            time.sleep(1.0)
        finally:
            sender.stop()
    assert len(receiver.requests) == webhook_settings.webhook_attempts == 3
    assert not webhook_redis.keys(keys.webhook_key("*"))


def test_an_unreachable_receiver_is_retried_then_given_up(webhook_redis, webhook_settings, caplog):
    caplog.set_level(logging.INFO, logger="demix.jobs.webhooks")
    queue = WebhookQueue(webhook_redis, webhook_settings)
    delivery = queue.enqueue(finished_job(f"http://127.0.0.1:{free_port()}/nobody-listens"))
    sender = make_sender(webhook_redis, webhook_settings).start()
    try:
        wait_for(lambda: queue.pending() == 0, "the webhook queue drained", timeout=60.0)
    finally:
        sender.stop()
    retries = [r.message for r in caplog.records if delivery.id in r.message and "; retry" in r.message]
    [gave_up] = [r.message for r in caplog.records if delivery.id in r.message and "giving up" in r.message]
    assert len(retries) == 2 and all("ConnectionError" in m for m in retries)
    assert "failed 3 times" in gave_up
    assert not webhook_redis.exists(keys.webhook_key(delivery.id))


def test_backoff_doubles_and_is_capped():
    assert [webhooks.backoff_s(n, 5.0) for n in (1, 2, 3, 4)] == [5.0, 10.0, 20.0, 40.0]
    assert webhooks.backoff_s(30, 5.0) == webhooks.MAX_BACKOFF_S


def test_a_hanging_receiver_does_not_delay_the_next_delivery(webhook_redis, webhook_settings):
    with WebhookReceiver([HANG]) as hanging, WebhookReceiver([200]) as healthy:
        queue = WebhookQueue(webhook_redis, webhook_settings)
        sender = make_sender(webhook_redis, webhook_settings, webhook_timeout_s=60.0).start()
        try:
            queue.enqueue(finished_job(hanging.url))
            hanging.wait_for(1)
            queue.enqueue(finished_job(healthy.url))
            healthy.wait_for(1, timeout=30)
            # The first delivery is still waiting for its answer while the second got through (the
            # receiver sees the POST a moment before the sender records it delivered).
            wait_for(lambda: webhook_redis.zcard(keys.webhooks_due_key()) == 1, "the healthy delivery recorded",
                     timeout=30)
            [(pending_id, _)] = webhook_redis.zrange(keys.webhooks_due_key(), 0, -1, withscores=True)
            assert webhook_redis.hget(keys.webhook_key(pending_id.decode()), "url").decode() == hanging.url
        finally:
            sender.stop()


def test_a_delivery_claimed_by_a_sender_that_died_is_sent_by_another(webhook_redis, webhook_settings,
                                                                     monkeypatch):
    monkeypatch.setattr(webhooks, "LEASE_MARGIN_S", 0.0)
    settings = dataclasses.replace(webhook_settings, webhook_timeout_s=0.5)
    with WebhookReceiver([200]) as receiver:
        queue = WebhookQueue(webhook_redis, settings)
        queue.enqueue(finished_job(receiver.url))
        [claimed] = queue.claim_due(10)  # a sender claims it, then dies without sending
        assert queue.claim_due(10) == []  # leased: no one else takes it meanwhile
        sender = WebhookSender(WebhookQueue(webhook_redis, settings), poll_interval_s=0.05).start()
        try:
            [received] = receiver.wait_for(1)
            wait_for(lambda: queue.pending() == 0, "the webhook queue drained", timeout=60.0)
        finally:
            sender.stop()
    assert received.headers["X-Demix-Delivery"] == claimed.id


def test_submit_refuses_a_bad_callback_url_and_keeps_nothing(idle_server, redis_client, tmp_path):
    jobs_before = redis_client.zcard(keys.jobs_index_key())
    response = requests.post(f"{idle_server.url}/v1/jobs", timeout=30,
                             files={"file": ("a.wav", wav_bytes(tmp_path))},
                             data={"callback_url": "ftp://example.com/hook"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_callback_url" and "http" in error["message"]
    assert redis_client.zcard(keys.jobs_index_key()) == jobs_before
    assert not [p for p in (idle_server.settings.data_dir / "incoming").glob("*") if p.is_file()]


def test_the_callback_url_is_stored_and_shown_on_the_job(idle_server, tmp_path):
    response = requests.post(f"{idle_server.url}/v1/jobs", timeout=30,
                             files={"file": ("a.wav", wav_bytes(tmp_path))},
                             data={"callback_url": "https://example.com/hooks/demix?x=1"})
    assert response.status_code == 202, response.text
    assert response.json()["callback_url"] == "https://example.com/hooks/demix?x=1"
    job = requests.get(response.json()["url"], timeout=30).json()
    assert job["callback_url"] == "https://example.com/hooks/demix?x=1"
    plain = requests.post(f"{idle_server.url}/v1/jobs", timeout=30, files={"file": ("a.wav", wav_bytes(tmp_path))})
    assert plain.json()["callback_url"] is None


@pytest.fixture
def service_sender(redis_server, settings):
    """A sender like the one a worker's background process runs, on the service's own Redis
    database, polling more often (the session worker's own sender is there too: a delivery
    goes to whichever claims it first)."""
    sender = WebhookSender(WebhookQueue(redis.Redis.from_url(redis_server.url), settings),
                           poll_interval_s=0.05).start()
    yield sender
    sender.stop()


def test_a_job_through_the_api_and_worker_posts_its_final_json(live_server, service_sender, settings,
                                                               tmp_path):
    with WebhookReceiver([200]) as receiver:
        response = requests.post(f"{live_server.url}/v1/jobs", timeout=60,
                                 files={"file": ("a.wav", wav_bytes(tmp_path, seconds=0.5))},
                                 data={"stems": "drums", "callback_url": receiver.url})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        [received] = receiver.wait_for(1, timeout=300)
    shown = requests.get(f"{live_server.url}/v1/jobs/{job_id}", timeout=30).json()
    body = json.loads(received.body)
    assert body["status"] == "succeeded" and body["id"] == job_id
    # The same JSON as the API shows, its links under DEMIX_PUBLIC_URL instead of the request's host.
    expected = json.loads(json.dumps(shown).replace(live_server.url, settings.effective_public_url))
    assert {k: v for k, v in body.items() if k in expected} == {k: v for k, v in expected.items() if k in body}
    # Fields the API computes as it answers (a queue position, a time left) are empty once a job
    # has finished: the webhook may leave those out, nothing else.
    assert all(value is None for key, value in expected.items() if key not in body)
    assert set(body["outputs"]) == {"drums", "no_drums"}
    assert "X-Demix-Signature" not in received.headers  # no DEMIX_WEBHOOK_SECRET in the tests


def test_a_cancelled_job_posts_its_final_json(idle_server, service_sender, tmp_path):
    with WebhookReceiver([200]) as receiver:
        response = requests.post(f"{idle_server.url}/v1/jobs", timeout=60,
                                 files={"file": ("a.wav", wav_bytes(tmp_path))},
                                 data={"callback_url": receiver.url})
        job_id = response.json()["id"]
        assert receiver.requests == []
        assert requests.post(f"{idle_server.url}/v1/jobs/{job_id}/cancel", timeout=30).status_code == 200
        [received] = receiver.wait_for(1)
    body = json.loads(received.body)
    assert body["id"] == job_id and body["status"] == "cancelled" and body["outputs"] is None


def test_the_documented_verification_sample_accepts_real_deliveries_only(webhook_redis, webhook_settings):
    api_doc = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    sample = next(block for block in api_doc.split("```python")[1:] if "def verify(" in block).split("```")[0]
    namespace: dict = {}
    exec(sample, namespace)
    verify = namespace["verify"]
    with WebhookReceiver([200]) as receiver:
        WebhookQueue(webhook_redis, webhook_settings).enqueue(finished_job(receiver.url))
        sender = make_sender(webhook_redis, webhook_settings).start()
        try:
            [received] = receiver.wait_for(1)
        finally:
            sender.stop()
    header = received.headers["X-Demix-Signature"]
    assert verify(received.body, header, SECRET)
    assert not verify(received.body.replace(b"succeeded", b"failed"), header, SECRET)
    assert not verify(received.body, header, "wrong secret")


# -- no receiver can break delivery -------------------------------------------------------------

@pytest.mark.parametrize("answer", [Trickle(500, seconds=10.0), Trickle(200, seconds=10.0), HANG],
                         ids=["trickled-500", "trickled-200", "hang"])
def test_an_attempt_ends_at_its_deadline_however_slowly_the_receiver_answers(webhook_settings, answer):
    """`requests`' timeout bounds each read: a status line trickled a byte at a time would
    hold the attempt for 10 s. The deadline ends it after DEMIX_WEBHOOK_TIMEOUT_S."""
    settings = dataclasses.replace(webhook_settings, webhook_timeout_s=1.0)
    delivery = webhooks.Delivery(id="d" * 32, job_id="j" * 32, url="", body=b"{}", attempts=0)
    with WebhookReceiver([answer]) as receiver:
        delivery = dataclasses.replace(delivery, url=receiver.url)
        reason = webhooks.post_delivery(delivery, settings)
        if answer != HANG:  # the sender hung up before the status line was out
            wait_for(lambda: receiver.hung_up == [delivery.id], "the receiver's trickle cut short", timeout=30)
    assert reason == "no complete answer within 1s (DEMIX_WEBHOOK_TIMEOUT_S)"
    assert receiver.answered == []


def test_a_stale_attempt_whose_lease_was_taken_over_records_nothing(webhook_redis, webhook_settings):
    """The defect of issue 20 in its smallest form: attempt 1 outlives its lease, attempt 2
    delivers and removes the record, then attempt 1 reports its failure. It must not write
    back a partial record (`{attempts: 1}`, no TTL) that every later claim trips on."""
    settings = dataclasses.replace(webhook_settings, webhook_timeout_s=0.0, webhook_attempts=2)
    queue = WebhookQueue(webhook_redis, settings)
    original = webhooks.LEASE_MARGIN_S
    webhooks.LEASE_MARGIN_S = 0.3
    try:
        delivery = queue.enqueue(finished_job("http://127.0.0.1:9/hook"))
        [first] = queue.claim_due(10)
        [second] = wait_for(lambda: queue.claim_due(10), "the first attempt's lease ran out", timeout=30)
    finally:
        webhooks.LEASE_MARGIN_S = original
    assert first.id == second.id == delivery.id
    queue.succeeded(second)
    queue.failed(first, "HTTP 500")
    assert queue.pending() == 0
    assert not webhook_redis.keys(keys.webhook_key("*"))


def test_a_receiver_that_trickles_then_fails_does_not_stop_later_webhooks(webhook_redis, webhook_settings,
                                                                          monkeypatch):
    """Issue 20, item 2, scaled down: the receiver's first POST trickles its status line for
    longer than the lease, then answers 500; later POSTs answer 200 (the issue: timeout 5 s,
    2 attempts, backoff 2 s, a 50 s trickle against a 35 s lease; here 1 s, 2, 0.5 s, 6 s
    against 1.5 s). The webhook is delivered once, nothing is written back after it, the
    sender lives on and a later job's webhook goes out."""
    monkeypatch.setattr(webhooks, "LEASE_MARGIN_S", 0.5)
    settings = dataclasses.replace(webhook_settings, webhook_timeout_s=1.0, webhook_attempts=2,
                                   webhook_backoff_s=0.5)
    queue = WebhookQueue(webhook_redis, settings)
    with WebhookReceiver([Trickle(500, seconds=6.0), 200]) as trickler, WebhookReceiver([200]) as healthy:
        first = queue.enqueue(finished_job(trickler.url))
        sender = make_sender(webhook_redis, settings).start()
        try:
            wait_for(lambda: trickler.successes()[first.id] == 1, "the first webhook delivered", timeout=60)
            wait_for(lambda: trickler.hung_up or len(trickler.answered) == 2, "the trickling attempt over",
                     timeout=60)
            wait_for(lambda: queue.pending() == 0 and not webhook_redis.keys(keys.webhook_key("*")),
                     "no delivery left in Redis", timeout=15)
            later = queue.enqueue(finished_job(healthy.url))
            wait_for(lambda: healthy.successes()[later.id] == 1 and queue.pending() == 0,
                     "the later webhook delivered", timeout=30)
            assert sender.running
        finally:
            sender.stop()
    assert trickler.successes() == {first.id: 1} and healthy.successes() == {later.id: 1}
    assert trickler.hung_up == [first.id]  # the sender left the trickle at its deadline
    assert [r.headers["X-Demix-Attempt"] for r in trickler.requests] == ["1", "2"]


def test_malformed_records_are_dropped_and_the_next_delivery_goes_out(webhook_redis, webhook_settings, caplog):
    caplog.set_level(logging.INFO, logger="demix.jobs.webhooks")
    due_long_ago = time.time() - 60  # claimed before the good one
    records = {
        "partial": {"attempts": 1},  # what a stale failure used to write back
        "no-body": {"job_id": "j", "url": "http://127.0.0.1:9/x", "attempts": 0},
        "bad-attempts": {"job_id": "j", "url": "http://127.0.0.1:9/x", "body": "{}", "attempts": "many"},
        "negative-attempts": {"job_id": "j", "url": "http://127.0.0.1:9/x", "body": "{}", "attempts": -1},
        "bad-url": {"job_id": "j", "url": "gopher://127.0.0.1:9/x", "body": "{}", "attempts": 0},
    }
    for delivery_id, fields in records.items():
        webhook_redis.hset(keys.webhook_key(delivery_id), mapping=fields)
    webhook_redis.set(keys.webhook_key("not-a-hash"), "x")
    not_utf8 = b"\xff\xfe"
    webhook_redis.hset(keys.webhook_key("").encode() + not_utf8, mapping={"job_id": "j", "url": "http://x/",
                                                                          "body": "{}", "attempts": 0})
    webhook_redis.zadd(keys.webhooks_due_key(), {**{delivery_id: due_long_ago for delivery_id in records},
                                                 "not-a-hash": due_long_ago, not_utf8: due_long_ago})
    with WebhookReceiver([200]) as receiver:
        queue = WebhookQueue(webhook_redis, webhook_settings)
        good = queue.enqueue(finished_job(receiver.url))
        sender = make_sender(webhook_redis, webhook_settings).start()
        try:
            wait_for(lambda: receiver.successes()[good.id] == 1 and queue.pending() == 0,
                     "the good webhook delivered and every malformed one dropped", timeout=60)
            assert sender.running
        finally:
            sender.stop()
    assert not webhook_redis.keys(keys.webhook_key("*"))
    dropped = [r.getMessage() for r in caplog.records if "malformed record" in r.getMessage()]
    assert len(dropped) == len(records) + 2, dropped
    assert any("webhook partial: malformed record (no job_id and no url and no body)" in m for m in dropped)
    assert any("many" in m for m in dropped) and any("only http and https" in m for m in dropped)


def test_the_sender_survives_an_error_in_a_claim(webhook_redis, webhook_settings, monkeypatch, caplog):
    queue = WebhookQueue(webhook_redis, webhook_settings)
    sender = make_sender(webhook_redis, webhook_settings)
    real_claim = sender.queue.claim_due
    failures = []

    def claim_failing_once(limit: int) -> list:
        if not failures:
            failures.append(limit)
            raise RuntimeError("a bug in a claim")
        return real_claim(limit)

    monkeypatch.setattr(sender.queue, "claim_due", claim_failing_once)
    with WebhookReceiver([200]) as receiver:
        good = queue.enqueue(finished_job(receiver.url))
        sender.start()
        try:
            wait_for(lambda: receiver.successes()[good.id] == 1, "the webhook delivered after the error", timeout=60)
            assert sender.running
        finally:
            sender.stop()
    [error] = [r for r in caplog.records if "unexpected error" in r.getMessage()]
    assert error.exc_info is not None and "a bug in a claim" in caplog.text  # with its traceback


def test_a_sender_whose_thread_died_is_started_again(webhook_redis, webhook_settings, caplog):
    """`WebhookSender.ensure_running`, which the background process calls every second."""
    queue = WebhookQueue(webhook_redis, webhook_settings)
    sender = make_sender(webhook_redis, webhook_settings)
    real_run = sender.run

    def end_at_once() -> None:  # as an error the loop cannot catch would end it
        sender.run = real_run  # type: ignore[method-assign]

    sender.run = end_at_once  # type: ignore[method-assign]
    assert not sender.ensure_running()  # never started: nothing to restart
    sender.start()
    try:
        wait_for(lambda: not sender.running, "the sender's thread ended", timeout=30)
        assert sender.ensure_running() and sender.running
        assert not sender.ensure_running()
        assert "webhook sender: its thread died; starting it again" in caplog.text
        with WebhookReceiver([200]) as receiver:
            good = queue.enqueue(finished_job(receiver.url))
            wait_for(lambda: receiver.successes()[good.id] == 1, "the webhook delivered", timeout=60)
    finally:
        sender.stop()
    assert not sender.ensure_running()  # stopped on purpose: not restarted


def test_an_attempt_that_never_reports_back_counts_and_the_last_is_given_up(webhook_redis, webhook_settings,
                                                                            monkeypatch, caplog):
    monkeypatch.setattr(webhooks, "LEASE_MARGIN_S", 0.2)
    settings = dataclasses.replace(webhook_settings, webhook_timeout_s=0.0, webhook_attempts=2)
    queue = WebhookQueue(webhook_redis, settings)
    delivery = queue.enqueue(finished_job("http://127.0.0.1:9/hook"))
    [first] = queue.claim_due(10)  # its sender dies, and the next one's too
    [second] = wait_for(lambda: queue.claim_due(10), "the first lease ran out", timeout=30)
    assert (first.attempt, second.attempt) == (1, 2)
    wait_for(lambda: not queue.claim_due(10) and queue.pending() == 0, "the delivery given up", timeout=30)
    assert not webhook_redis.exists(keys.webhook_key(delivery.id))
    assert f"webhook {delivery.id} to http://127.0.0.1:9/hook: attempt 2 never reported back" in caplog.text


def test_a_record_expires_a_day_after_its_last_possible_attempt(webhook_redis, webhook_settings):
    queue = WebhookQueue(webhook_redis, webhook_settings)
    delivery = queue.enqueue(finished_job("http://127.0.0.1:9/hook"))
    # 3 attempts, each leased for its 5 s timeout and the margin, and 0.1 s + 0.2 s of backoff
    life = 3 * (5.0 + webhooks.LEASE_MARGIN_S) + 0.3
    assert webhooks.delivery_life_s(webhook_settings) == pytest.approx(life)
    ttl = webhook_redis.ttl(keys.webhook_key(delivery.id))
    assert webhooks.RECORD_GRACE_S + life - 5 <= ttl <= webhooks.RECORD_GRACE_S + life + 1
    queue.claim_due(10)
    queue.failed(dataclasses.replace(delivery, attempts=0), "HTTP 500")  # an outcome keeps the TTL
    assert webhook_redis.ttl(keys.webhook_key(delivery.id)) > webhooks.RECORD_GRACE_S


# -- chaos: every receiver's misbehaviour at once, and senders killed mid-delivery ---------------

CHAOS_ATTEMPTS = 8
CHAOS_SETTINGS = {"DEMIX_WEBHOOK_TIMEOUT_S": "2", "DEMIX_WEBHOOK_BACKOFF_S": "0.5",
                  "DEMIX_WEBHOOK_ATTEMPTS": str(CHAOS_ATTEMPTS)}
"""What the background processes of the chaos test run with: short timeouts and backoffs."""

JOBS_PER_RECEIVER = 2


@pytest.fixture
def chaos_db(redis_server, monkeypatch) -> tp.Iterator[redis.Redis]:
    """Database 3 of the test Redis, which the background processes started here use (they read
    DEMIX_REDIS_URL and the webhook settings from the environment)."""
    url = database_url(redis_server, 3)
    monkeypatch.setenv("DEMIX_REDIS_URL", url)
    for name, value in CHAOS_SETTINGS.items():
        monkeypatch.setenv(name, value)
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.mark.processes
@pytest.mark.timeout(600)
def test_chaos_every_jobs_webhook_reaches_its_healthy_receiver_exactly_once(chaos_db, settings, caplog):
    """Two workers' background processes send the webhooks of jobs whose receivers hang,
    trickle, fail then succeed, redirect then succeed, answer slowly or at once. Both are
    killed (SIGKILL) while every attempt they have in flight hangs, and restarted as their
    workers restart them; more jobs finish while no sender runs. Every job's webhook is
    answered 2xx exactly once, no receiver sees more than DEMIX_WEBHOOK_ATTEMPTS requests per
    delivery, redirects are not followed, and nothing is left in Redis. (Prints its times.)"""
    caplog.set_level(logging.INFO, logger="demix.worker.background")
    queue = WebhookQueue(chaos_db, dataclasses.replace(settings, webhook_timeout_s=2.0, webhook_backoff_s=0.5,
                                                       webhook_attempts=CHAOS_ATTEMPTS))
    started = time.monotonic()
    backgrounds = [BackgroundProcess(), BackgroundProcess()]
    with contextlib.ExitStack() as stack:
        elsewhere = stack.enter_context(WebhookReceiver([200]))
        scripts = {
            "hanging": [HANG, 200],  # the senders are killed while they wait on it
            "trickling": [Trickle(500, seconds=6.0), 200],  # cut at the deadline
            "failing": [500, 503, 200],
            "redirecting": [Redirect(elsewhere.url), Redirect(elsewhere.url, 307), 200],
            "stalling": [HANG, Slow(200, 0.3)],  # cut at the deadline
            "slow": [Slow(200, 0.5)],
            "healthy": [200],
        }
        receivers = {name: stack.enter_context(WebhookReceiver(script, per_delivery=True))
                     for name, script in scripts.items()}
        expected: dict[str, str] = {}  # delivery id -> receiver name

        def enqueue(name: str) -> None:
            for _ in range(JOBS_PER_RECEIVER):
                expected[queue.enqueue(finished_job(receivers[name].url)).id] = name

        def all_delivered() -> bool:
            return all(receivers[name].successes()[delivery_id] >= 1 for delivery_id, name in expected.items())

        for background in backgrounds:
            background.start()
        try:
            # Only hanging attempts in flight, so the kill cannot cut one that was answered 2xx.
            enqueue("hanging")
            receivers["hanging"].wait_for(JOBS_PER_RECEIVER, timeout=120)
            for background in backgrounds:
                os.kill(background.process.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            for background in backgrounds:
                background.process.wait(10)
            for name in scripts:
                if name != "hanging":
                    enqueue(name)
            for background in backgrounds:
                background.check()
            wait_for(lambda: webhook_health.webhook_health(chaos_db).senders >= 2, "the restarted senders beating",
                     timeout=120)
            wait_for(all_delivered, "every webhook delivered", timeout=300)
            delivered_at = time.monotonic()
            wait_for(lambda: chaos_db.zcard(keys.webhooks_due_key()) == 0
                     and not chaos_db.keys(keys.webhook_key("*")), "nothing left in Redis", timeout=60)
        finally:
            for background in backgrounds:
                background.stop()
    print(f"\nCHAOS webhooks: {len(expected)} deliveries, all delivered {delivered_at - started:.1f}s after "
          f"the start, {delivered_at - killed_at:.1f}s after the kill; "
          f"{sum(len(r.requests) for r in receivers.values())} requests in all", flush=True)
    for name, receiver in receivers.items():
        mine = {delivery_id for delivery_id, owner in expected.items() if owner == name}
        assert receiver.successes() == {delivery_id: 1 for delivery_id in mine}, name
        per_delivery = receiver.requests_per_delivery()
        assert set(per_delivery) == mine and max(per_delivery.values()) <= CHAOS_ATTEMPTS, (name, per_delivery)
    assert elsewhere.requests == []  # a 3xx is a failed attempt, not followed
    # Each hanging attempt was cut by the kill, and counted: the next attempt is the second.
    assert sorted(r.headers["X-Demix-Attempt"] for r in receivers["hanging"].requests) == ["1", "1", "2", "2"]
    assert sorted(receivers["trickling"].hung_up) == sorted(d for d, n in expected.items() if n == "trickling")
    assert caplog.text.count("exited with -9; starting it again") == len(backgrounds)
