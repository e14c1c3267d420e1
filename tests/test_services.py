"""Building the service's connections (`demix.services`): storage chosen from
`DEMIX_STORAGE`, one Redis for the job store, the limit and the broker, API keys read
only when a door asks for them, and a job store whose finished jobs queue their webhook."""
from __future__ import annotations

import dataclasses
import json
import time

import pytest

from demix import redis_keys as keys
from demix.jobs.records import Job, JobStatus, new_job_id
from demix.storage.s3 import ObjectStorage
from demix.services import (REDIS_CONNECT_TIMEOUT_S, REDIS_HEALTH_CHECK_S, REDIS_SOCKET_TIMEOUT_S, build_services,
                            make_storage, redis_client)
from demix.storage.local import JobStorage
from tests.support.environment import UNCONSUMED_QUEUE


def test_an_empty_storage_setting_keeps_files_in_the_data_dir(settings, tmp_path):
    built = make_storage(dataclasses.replace(settings, storage="", data_dir=tmp_path / "data"))
    assert type(built) is JobStorage and built.root == tmp_path / "data"


def test_an_s3_location_keeps_files_in_that_bucket_with_local_scratch(settings, tmp_path):
    built = make_storage(dataclasses.replace(settings, storage="s3://media/demix/", data_dir=tmp_path / "scratch",
                                             s3_endpoint_url="http://127.0.0.1:9"))
    assert isinstance(built, ObjectStorage)
    assert (built.bucket, built.prefix, built.incoming_dir) == ("media", "demix/", tmp_path / "scratch" / "incoming")
    assert built.client.meta.endpoint_url == "http://127.0.0.1:9"


def test_a_storage_setting_that_is_no_s3_location_is_the_data_dir_too(tmp_path):
    class OldSettings:  # settings objects from before DEMIX_STORAGE existed have no such field
        data_dir = tmp_path / "old"

    assert make_storage(OldSettings()).root == tmp_path / "old"


def test_the_redis_client_fails_fast_when_redis_is_away_and_checks_idle_connections(settings):
    client = redis_client(dataclasses.replace(settings, redis_url="redis://127.0.0.1:6390/3"))
    options = client.connection_pool.connection_kwargs
    assert (options["host"], options["port"], options["db"]) == ("127.0.0.1", 6390, 3)
    assert options["socket_connect_timeout"] == REDIS_CONNECT_TIMEOUT_S
    assert options["socket_timeout"] == REDIS_SOCKET_TIMEOUT_S
    assert options["health_check_interval"] == REDIS_HEALTH_CHECK_S


def test_the_job_store_the_limit_and_the_broker_share_the_settings_redis(settings, tmp_path):
    chosen = dataclasses.replace(settings, redis_url="redis://127.0.0.1:6391/2", max_active_jobs_per_key=4,
                                 data_dir=tmp_path / "data")
    services = build_services(chosen)
    assert services.jobs.redis is services.limits.redis  # one connection pool
    assert services.jobs.redis.connection_pool.connection_kwargs["port"] == 6391
    assert services.celery.conf.broker_url == "redis://127.0.0.1:6391/2"
    assert services.limits.limit == 4 and services.storage.root == tmp_path / "data"
    given = object()
    assert build_services(chosen, celery=given).celery is given


def test_api_keys_are_read_when_a_door_first_asks_so_a_worker_needs_no_keys_file(settings, tmp_path):
    keys_file = tmp_path / "keys"
    services = build_services(dataclasses.replace(settings, api_keys=str(keys_file)))  # no file yet: fine
    keys_file.write_text("# the doors' keys\nkey-one\n")
    assert services.api_keys.owner_of("key-one")
    keys_file.unlink()
    assert services.api_keys.owner_of("key-one")  # read once, kept
    with pytest.raises(ValueError, match="cannot be read"):
        build_services(dataclasses.replace(settings, api_keys=str(tmp_path / "missing"))).api_keys


def test_a_job_finished_through_the_built_store_queues_its_webhook(settings, redis_client, tmp_path):
    services = build_services(dataclasses.replace(settings, queue=UNCONSUMED_QUEUE, data_dir=tmp_path / "data"))
    job_id = new_job_id()
    services.jobs.create(Job(id=job_id, status=JobStatus.QUEUED, stems="vocals", model=settings.model,
                             samplerate=44100, channels=2, frames=44100, created_at=time.time(),
                             queue=UNCONSUMED_QUEUE, callback_url="http://127.0.0.1:9/hook"))
    due_before = set(redis_client.zrange(keys.webhooks_due_key(), 0, -1))
    services.jobs.mark_cancelled(job_id)
    queued = set(redis_client.zrange(keys.webhooks_due_key(), 0, -1)) - due_before
    assert len(queued) == 1
    delivery_id = queued.pop().decode()
    delivery = redis_client.hgetall(keys.webhook_key(delivery_id))
    redis_client.zrem(keys.webhooks_due_key(), delivery_id)  # nobody is to deliver it
    assert delivery[b"url"] == b"http://127.0.0.1:9/hook" and delivery[b"job_id"] == job_id.encode()
    assert json.loads(delivery[b"body"])["status"] == "cancelled"
    services.jobs.delete(job_id)
