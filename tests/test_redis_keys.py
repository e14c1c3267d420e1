"""The Redis key names (`demix.redis_keys`): the service's own never collide, and the broker's
ones match where kombu's Redis transport really keeps a queue and its unacknowledged
messages (a Celery message sent with any priority is counted)."""
from __future__ import annotations

import dataclasses
import inspect

from kombu.transport.redis import Channel

from demix import redis_keys as keys
from demix.celery_app import SEPARATE_TASK, make_celery
from demix.jobs.records import new_job_id

BROKER_KEYS = {"queue_keys", "broker_unacked_key", "broker_unacked_index_key"}
"""Named by kombu, not by the service: no `demix:` prefix."""


def own_key_names(argument: str) -> dict[str, str]:
    """Every service key function's name for `argument` (each of its parameters)."""
    names = {}
    for name, function in inspect.getmembers(keys, inspect.isfunction):
        if name not in BROKER_KEYS and function.__module__ == keys.__name__:
            names[name] = function(*[argument] * len(inspect.signature(function).parameters))
    return names


def test_the_services_keys_are_prefixed_and_never_collide():
    names = own_key_names("abc")
    assert len(names) >= 15
    assert all(value.startswith(f"{keys.PREFIX}:") for value in names.values()), names
    assert len(set(names.values())) == len(names), names
    # A job's lease and one of its parts' leases differ, whatever the job id.
    assert keys.lease_key("abc") != keys.unit_lease_key("abc", "") and \
        keys.unit_lease_key("abc", "merge").startswith(keys.lease_key("abc") + ":")


def test_the_unacked_keys_are_kombus():
    assert keys.broker_unacked_key() == Channel.unacked_key
    assert keys.broker_unacked_index_key() == Channel.unacked_index_key


def test_messages_of_every_priority_are_in_the_queues_lists(settings, redis_client):
    queue = f"demix-tests-keys-{new_job_id()[:8]}"
    app = make_celery(dataclasses.replace(settings, queue=queue))
    priorities = [0, 1, 3, 5, 6, 9]
    try:
        for priority in priorities:
            app.send_task(SEPARATE_TASK, args=[new_job_id()], queue=queue, priority=priority)
        lists = [key for key in redis_client.keys(f"{queue}*") if redis_client.type(key) == b"list"]
        assert len(lists) > 1 and {key.decode() for key in lists} <= set(keys.queue_keys(queue))
        assert sum(redis_client.llen(key) for key in keys.queue_keys(queue)) == len(priorities)
    finally:
        # The app's pool is left open: kombu shares connection and producer pools between
        # apps of one broker, and closing it would break every later send of the session's
        # own Celery app ("Acquire on closed pool").
        redis_client.delete(*keys.queue_keys(queue))
