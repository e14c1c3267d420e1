"""`GET /metrics`: Prometheus text that prometheus_client's parser reads, counting what
happened, the same from every API process (the numbers live in Redis)."""
from __future__ import annotations

import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from demix.errors import InvalidAudio
from demix.jobs.records import Job, JobStatus, JobStore, new_job_id
from testkit.synthetic_audio import write_wav
from tests.support.service_state import database_url
from tests.support.live import wait_for_job


def scrape(base_url: str) -> dict[tuple[str, tuple], float]:
    response = requests.get(f"{base_url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str) -> float:
    """The sum of `name` over all its label values."""
    return sum(sample for (sample_name, _), sample in samples.items() if sample_name == name)


def test_metrics_count_submissions_outcomes_uploads_and_durations(live_server, idle_server, tmp_path,
                                                                   redis_client):
    url = live_server.url
    before = scrape(url)

    path = write_wav(tmp_path / "in.wav", 44100, 2, 2.0)
    with open(path, "rb") as file:
        job = requests.post(f"{url}/v1/jobs", files={"file": ("in.wav", file)}, timeout=30).json()
    assert wait_for_job(url, job["id"])["status"] == "succeeded"
    with open(path, "rb") as file:
        queued = requests.post(f"{idle_server.url}/v1/jobs", files={"file": ("in.wav", file)}, timeout=30).json()
    assert requests.post(f"{idle_server.url}/v1/jobs/{queued['id']}/cancel", timeout=10).status_code == 200
    # A failure recorded by some other process (a worker elsewhere) counts the same.
    store = JobStore(redis_client)
    failed = Job(id=new_job_id(), status=JobStatus.QUEUED, stems="all", model="tiny", samplerate=44100,
                 channels=2, frames=44100, created_at=time.time())
    store.create(failed)
    store.mark_failed(failed.id, InvalidAudio("no samples", code="empty_audio"))

    after = scrape(url)
    other = scrape(idle_server.url)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("demix_jobs_submitted_total") == 3
    assert grew("demix_jobs_succeeded_total") == 1
    assert grew("demix_jobs_cancelled_total") == 1
    assert grew("demix_jobs_failed_total", code="empty_audio") == 1
    assert grew("demix_upload_bytes_total") == 2 * path.stat().st_size
    assert grew("demix_job_duration_seconds_count") == 1
    assert grew("demix_job_duration_seconds_bucket", le="+Inf") == 1
    assert grew("demix_job_duration_seconds_sum") > 0
    assert grew("demix_job_audio_seconds_count") == 1
    assert grew("demix_job_audio_seconds_sum") == pytest.approx(2.0)  # a float sum across tests
    assert grew("demix_job_audio_seconds_bucket", le="10.0") == 1  # 2 s of audio
    assert value(after, "demix_disk_free_bytes") > 0
    assert ("demix_jobs_running", ()) in after
    for name in ("demix_jobs_submitted_total", "demix_jobs_succeeded_total", "demix_upload_bytes_total",
                 "demix_job_audio_seconds_count"):
        assert value(other, name) == value(after, name), name  # another API process, same numbers


def test_queue_length_and_running_gauges(idle_server, tmp_path, redis_client, settings):
    url = idle_server.url
    before = scrape(url)
    path = write_wav(tmp_path / "in.wav", 44100, 2, 0.5)
    ids = []
    for _ in range(2):
        with open(path, "rb") as file:
            ids.append(requests.post(f"{url}/v1/jobs", files={"file": ("in.wav", file)}, timeout=30).json()["id"])
    store = JobStore(redis_client)
    store.mark_running(ids[0], lease_s=30)
    after = scrape(url)
    assert total(after, "demix_queue_length") - total(before, "demix_queue_length") == 2
    assert {dict(labels)["model"] for name, labels in after if name == "demix_queue_length"} == {
        settings.default_model}
    assert value(after, "demix_jobs_running") - value(before, "demix_jobs_running") == 1
    for job_id in ids:
        assert requests.delete(f"{url}/v1/jobs/{job_id}", timeout=10).status_code == 204
    assert value(scrape(url), "demix_jobs_running") == value(before, "demix_jobs_running")


def test_the_queue_length_is_given_per_served_model(redis_client, tmp_path):
    """Each model has its own queue (`DEMIX_MODELS`): an operator sees which one backs up."""
    from prometheus_client import CollectorRegistry, generate_latest

    from demix import redis_keys as keys
    from demix.jobs.metrics import ServiceCollector

    queues = {"htdemucs": "metrics-test", "mel_band_roformer_kim": "metrics-test.mel_band_roformer_kim"}
    priorities = keys.queue_keys(queues["mel_band_roformer_kim"])
    redis_client.delete(*keys.queue_keys(queues["htdemucs"]), *priorities)
    redis_client.rpush(priorities[0], "message", "message")
    redis_client.rpush(priorities[-1], "message")  # another priority of the same queue
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(redis_client, queues, tmp_path))
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    try:
        assert value(samples, "demix_queue_length", model="htdemucs", queue="metrics-test") == 0
        assert value(samples, "demix_queue_length", model="mel_band_roformer_kim",
                     queue="metrics-test.mel_band_roformer_kim") == 3
    finally:
        redis_client.delete(*priorities)


def test_webhook_senders_pending_and_overdue_deliveries_are_shown(redis_server, tmp_path):
    """The health of webhook delivery: an operator sees deliveries overdue with no sender alive
    (every worker's background process down) before a customer misses a webhook."""
    import redis
    from prometheus_client import CollectorRegistry, generate_latest

    from demix import redis_keys as keys
    from demix.jobs.metrics import ServiceCollector
    from demix.jobs.webhook_health import OVERDUE_S

    # Database 4: the session's worker runs its own webhook sender on database 0.
    client = redis.Redis.from_url(database_url(redis_server, 4))
    client.flushdb()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(client, {}, tmp_path))

    def samples() -> dict:
        return {(sample.name, ()): sample.value
                for family in text_string_to_metric_families(generate_latest(registry).decode())
                for sample in family.samples}

    try:
        now = time.time()
        client.zadd(keys.webhooks_due_key(), {"due-now": now, "overdue": now - OVERDUE_S - 1})
        shown = samples()
        assert [value(shown, name) for name in ("demix_webhooks_pending", "demix_webhooks_overdue",
                                                "demix_webhook_senders")] == [2, 1, 0]
        client.zadd(keys.webhook_senders_key(), {"host:1:a": now, "host:2:b": now})
        assert value(samples(), "demix_webhook_senders") == 2
    finally:
        client.flushdb()
        client.close()
