"""demix.cli.redis_server: a private redis-server (or the bundled valkey-server) on a free port."""
from __future__ import annotations

import pytest
import redis

from demix.cli.redis_server import RedisServer, find_redis_server

pytestmark = pytest.mark.processes


def test_the_bundled_valkey_server_is_used_when_redis_is_not_on_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    binary = find_redis_server()
    assert binary.endswith("valkey-server")
    with RedisServer(tmp_path / "data", persist=True, binary=binary) as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()
        process = server.process
    assert process.poll() is not None  # stopped with the context
    assert (tmp_path / "data").is_dir()


def test_a_persistent_server_keeps_queued_data_across_restarts(tmp_path):
    with RedisServer(tmp_path / "data", persist=True) as server:
        client = redis.Redis.from_url(server.url)
        client.rpush("demix", "job-1")
        client.close()
        port = server.port
    with RedisServer(tmp_path / "data", port=port, persist=True) as server:
        client = redis.Redis.from_url(server.url)
        assert client.lrange("demix", 0, -1) == [b"job-1"]
        client.close()
