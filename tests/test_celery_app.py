"""The Celery app is built from the same `Settings` as the job store it goes with."""
from __future__ import annotations

import dataclasses
import json

import redis
import requests

from demix.cli.redis_server import RedisServer
from demix import redis_keys as keys
from demix.celery_app import SEPARATE_TASK, make_celery
from testkit.synthetic_audio import write_wav
from tests.support.live import LiveServer


def test_create_app_sends_tasks_to_the_redis_its_settings_name(redis_server, redis_client, settings,
                                                                 tmp_path):
    other_queue = "demix-tests-other-redis"
    with RedisServer(tmp_path / "redis-x", persist=False) as redis_x:
        settings_x = dataclasses.replace(settings, redis_url=redis_x.url, queue=other_queue,
                                         data_dir=tmp_path / "data")
        from demix.api import create_app

        app = create_app({"SETTINGS": settings_x})
        assert app.extensions["celery"].conf.broker_url == redis_x.url
        try:
            with LiveServer(app) as server, open(write_wav(tmp_path / "in.wav", 8000, 1, 0.1), "rb") as wav:
                response = requests.post(f"{server.url}/v1/jobs", files={"file": ("in.wav", wav)},
                                         timeout=60)
        finally:
            app.extensions["celery"].pool.force_close_all()  # X's connections: X is stopped next
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]

        client_x = redis.Redis.from_url(redis_x.url)
        try:
            # The task message and the job record are both on X...
            [message] = client_x.lrange(other_queue, 0, -1)
            headers = json.loads(message)["headers"]
            assert headers["task"] == SEPARATE_TASK and headers["id"] == job_id
            assert client_x.exists(keys.job_key(job_id))
        finally:
            client_x.close()
    # ...and nothing went to the Redis the environment names.
    assert not redis_client.exists(other_queue) and not redis_client.exists(keys.job_key(job_id))


def test_the_worker_app_uses_the_process_settings_the_job_store_reads():
    from demix.celery_app import celery_app
    from demix.config import get_settings

    assert celery_app.settings is get_settings()
    assert celery_app.conf.broker_url == get_settings().effective_redis_url


def test_make_celery_routes_separation_to_the_configured_queue(settings):
    app = make_celery(dataclasses.replace(settings, queue="elsewhere", redis_url="redis://example:1/2"))
    assert app.conf.broker_url == "redis://example:1/2"
    assert app.conf.task_routes[SEPARATE_TASK] == {"queue": "elsewhere"}
    assert app.conf.task_default_queue == "elsewhere"


def test_the_soft_shutdown_wait_is_the_setting():
    from demix.celery_app import celery_config
    from demix.config import Settings

    assert celery_config(Settings.from_env({}))["worker_soft_shutdown_timeout"] == 10.0
    assert celery_config(Settings.from_env({"DEMIX_SOFT_SHUTDOWN_S": "2.5"}))["worker_soft_shutdown_timeout"] == 2.5
