"""Whether webhooks go out (`demix.jobs.webhook_health`): senders' heartbeats and the pending
and overdue deliveries, on a real Redis."""
from __future__ import annotations

import time

import pytest

from demix import redis_keys as keys
from demix.jobs.records import Job, JobStatus, new_job_id
from demix.jobs.webhook_health import OVERDUE_S, SENDER_LIVE_S, WebhookHealth, beat, forget_sender, webhook_health
from demix.jobs.webhooks import WebhookQueue, WebhookSender
from tests.support.service_state import empty_database
from tests.support.waiting import wait_for


@pytest.fixture
def own_db(redis_server):
    """Database 5 of the test Redis: the session's worker runs its own sender on database 0."""
    with empty_database(redis_server, 5) as client:
        yield client


def finished_job(callback_url: str) -> Job:
    now = time.time()
    return Job(id=new_job_id(), status=JobStatus.SUCCEEDED, stems="vocals", model="tiny", samplerate=44100,
               channels=2, frames=44100, created_at=now - 5, started_at=now - 4, finished_at=now,
               progress=1.0, outputs=["vocals", "no_vocals"], output={"format": "flac"}, callback_url=callback_url)


def test_overdue_deliveries_with_no_live_sender_are_stalled(own_db, settings):
    assert webhook_health(own_db) == WebhookHealth(senders=0, pending=0, overdue=0)
    queue = WebhookQueue(own_db, settings)
    queue.enqueue(finished_job("http://127.0.0.1:9/a"))
    late = queue.enqueue(finished_job("http://127.0.0.1:9/b"))
    own_db.zadd(keys.webhooks_due_key(), {late.id: time.time() - OVERDUE_S - 1})
    beat(own_db, "gone:1:x", now=time.time() - SENDER_LIVE_S - 1)  # silent too long: not counted
    health = webhook_health(own_db)
    assert health == WebhookHealth(senders=0, pending=2, overdue=1) and health.stalled
    beat(own_db, "alive:2:y")
    health = webhook_health(own_db)
    assert health == WebhookHealth(senders=1, pending=2, overdue=1) and not health.stalled
    forget_sender(own_db, "alive:2:y")
    assert webhook_health(own_db).senders == 0


def test_a_sender_beats_while_it_runs_and_is_forgotten_when_it_stops(own_db, settings):
    sender = WebhookSender(WebhookQueue(own_db, settings), poll_interval_s=0.05).start()
    try:
        wait_for(lambda: webhook_health(own_db).senders == 1, "the sender's first heartbeat", timeout=30)
        assert own_db.zscore(keys.webhook_senders_key(), sender.id) is not None
    finally:
        sender.stop()
    assert webhook_health(own_db).senders == 0


def test_senders_silent_for_an_hour_are_taken_off_the_set(own_db):
    beat(own_db, "killed:1:x", now=time.time() - 3601)
    beat(own_db, "alive:2:y")
    assert [member.decode() for member in own_db.zrange(keys.webhook_senders_key(), 0, -1)] == ["alive:2:y"]
