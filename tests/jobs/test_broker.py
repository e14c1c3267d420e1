"""Reading what the broker holds: real messages sent by the Celery app into a real Redis."""
from __future__ import annotations

import json
import time

import pytest

from demix import redis_keys as keys
from demix.jobs.broker import delivered_job_ids, separation_job_id, waiting_job_ids
from demix.celery_app import celery_app
from demix.jobs.records import new_job_id
from demix.jobs.lifecycle import enqueue_job
from demix.jobs.split_records import send_unit

QUEUE = "demix-tests-broker"


@pytest.fixture
def client(redis_client):
    redis_client.delete(*keys.queue_keys(QUEUE))
    yield redis_client
    redis_client.delete(*keys.queue_keys(QUEUE))


def test_the_job_ids_of_waiting_separation_messages_are_found_and_other_tasks_are_not(client):
    jobs = [new_job_id() for _ in range(3)]
    for job_id in jobs:
        enqueue_job(celery_app, job_id, QUEUE)
    part_of = new_job_id()
    send_unit(celery_app, QUEUE, part_of, 1, "part:0", {})
    assert waiting_job_ids(client, QUEUE) == set(jobs)
    assert waiting_job_ids(client, QUEUE + "-empty") == set()


def test_a_queue_longer_than_one_read_is_read_whole(client, monkeypatch):
    monkeypatch.setattr("demix.jobs.broker.SCAN_CHUNK", 2)
    jobs = {new_job_id() for _ in range(5)}
    for job_id in jobs:
        enqueue_job(celery_app, job_id, QUEUE)
    assert waiting_job_ids(client, QUEUE) == jobs


def test_messages_taken_by_a_worker_count_from_their_delivery_time(client):
    job_id = new_job_id()
    enqueue_job(celery_app, job_id, QUEUE)
    raw = client.rpop(QUEUE)
    tag = f"test-{job_id}"
    client.hset(keys.broker_unacked_key(), tag, json.dumps([json.loads(raw), "", QUEUE]))
    client.zadd(keys.broker_unacked_index_key(), {tag: time.time() - 100})
    try:
        assert job_id in delivered_job_ids(client, since=time.time() - 200)
        assert job_id not in delivered_job_ids(client, since=time.time() - 50)
    finally:
        client.hdel(keys.broker_unacked_key(), tag)
        client.zrem(keys.broker_unacked_index_key(), tag)


@pytest.mark.parametrize("message", [b"not json", b"{}", b'{"headers": {"task": "demix.separate"}}',
                                     b'{"headers": {"task": "demix.separate"}, "body": "W10="}'])
def test_an_unreadable_message_names_no_job(message):
    assert separation_job_id(message) is None
