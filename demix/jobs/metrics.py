"""Service metrics kept in Redis, so every process (API workers, Celery workers on other
machines) adds to the same numbers; the API exposes them at `GET /metrics`.

The job state machine (`demix.jobs.records`) counts outcomes in the same Lua script that makes
the move, so a count is written exactly once, by the process whose move won.
"""
from __future__ import annotations

import shutil
import typing as tp
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from demix import redis_keys as keys
from demix.jobs.webhook_health import OVERDUE_S, SENDER_LIVE_S, webhook_health

JOB_DURATION_BUCKETS = [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 10800.0]
"""Upper bounds (seconds) of the run-time histogram of succeeded jobs (start to finish)."""

AUDIO_SECONDS_BUCKETS = [10.0, 30.0, 60.0, 180.0, 300.0, 600.0, 1800.0, 3600.0, 10800.0]
"""Upper bounds (seconds of input audio) of the processed-audio histogram of succeeded jobs."""

JOB_HISTOGRAMS = {
    "job_duration_seconds": ("Run time of succeeded jobs, from the start of their last attempt to "
                             "success, in seconds.", JOB_DURATION_BUCKETS),
    "job_audio_seconds": ("Length of the input audio of succeeded jobs, in seconds.",
                          AUDIO_SECONDS_BUCKETS),
}
"""Histograms the job state machine observes: Redis key name -> (doc, bucket bounds)."""


WARM_TIMEOUTS_FIELD = "pool_warm_timeouts"
"""Counter of worker pool processes killed for not getting warm within DEMIX_WARM_TIMEOUT_S."""


def count_warm_timeout(client: tp.Any) -> None:
    """One more pool process replaced by a worker's watchdog (`demix.worker.pool_guard`)."""
    client.hincrby(keys.metrics_counters_key(), WARM_TIMEOUTS_FIELD, 1)


CACHE_HITS_FIELD, CACHE_MISSES_FIELD = "cache_hits", "cache_misses"
"""Counters of model runs served from the result cache, and of those that looked and ran the model."""


def count_cache_lookup(client: tp.Any, hit: bool) -> None:
    """One more model run that looked in the result cache (`demix.worker.cached_runs`)."""
    client.hincrby(keys.metrics_counters_key(), CACHE_HITS_FIELD if hit else CACHE_MISSES_FIELD, 1)


class ServiceCollector(Collector):
    """Reads the service's metrics from Redis (and the disk) at each scrape, so the numbers
    are the same whichever API process answers."""

    def __init__(self, client: tp.Any, queues: tp.Mapping[str, str], data_dir: Path):
        """`queues`: each served model's Celery queue, by model name (`Settings.queue_for`)."""
        self.redis, self.queues, self.data_dir = client, dict(queues), Path(data_dir)

    def collect(self) -> tp.Iterator[tp.Any]:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.metrics_counters_key())
        for name in JOB_HISTOGRAMS:
            pipe.hgetall(keys.metrics_histogram_key(name))
        # A queue is one Redis list per message priority (kombu): its length is their sum.
        queue_keys = {model: keys.queue_keys(queue) for model, queue in self.queues.items()}
        for model_keys in queue_keys.values():
            for key in model_keys:
                pipe.llen(key)
        pipe.scard(keys.running_jobs_key())
        counters_raw, *rest = pipe.execute()
        histograms_raw = rest[:len(JOB_HISTOGRAMS)]
        lengths, running = iter(rest[len(JOB_HISTOGRAMS):-1]), rest[-1]
        counters = {k.decode(): float(v) for k, v in counters_raw.items()}

        yield _counter("demix_jobs_submitted", "Jobs accepted by the API.", counters.get("submitted", 0))
        yield _counter("demix_jobs_succeeded", "Jobs that succeeded.", counters.get("succeeded", 0))
        yield _counter("demix_jobs_cancelled", "Jobs cancelled (or deleted before they finished).",
                       counters.get("cancelled", 0))
        failed = CounterMetricFamily("demix_jobs_failed", "Jobs that failed, by error code.",
                                     labels=["code"])
        for field, value in sorted(counters.items()):
            if field.startswith("failed:"):
                failed.add_metric([field[len("failed:"):]], value)
        yield failed
        requeued = CounterMetricFamily(
            "demix_jobs_requeued", "Jobs put back in the queue: lost (lease expired), handed_back "
                                   "(worker stopping) or lost_message (queued, its broker message "
                                   "gone: sent again).", labels=["reason"])
        for field, value in sorted(counters.items()):
            if field.startswith("requeued:"):
                requeued.add_metric([field[len("requeued:"):]], value)
        yield requeued
        yield _counter("demix_pool_warm_timeouts",
                       "Worker pool processes killed and replaced because they were not warm within "
                       "DEMIX_WARM_TIMEOUT_S (each one's Python stack is in its worker's log).",
                       counters.get(WARM_TIMEOUTS_FIELD, 0))
        yield _counter("demix_upload_bytes", "Bytes of accepted uploads.", counters.get("upload_bytes", 0))
        yield _counter("demix_cache_hits", "Model runs served from the result cache (no model run).",
                       counters.get(CACHE_HITS_FIELD, 0))
        yield _counter("demix_cache_misses", "Model runs that looked in the result cache and ran the model.",
                       counters.get(CACHE_MISSES_FIELD, 0))

        for (name, (doc, bounds)), raw in zip(JOB_HISTOGRAMS.items(), histograms_raw):
            yield _histogram(f"demix_{name}", doc, bounds, raw)

        queue_length = GaugeMetricFamily("demix_queue_length", "Jobs waiting in a model's queue (Celery "
                                         "messages not yet taken by a worker).", labels=["model", "queue"])
        for model, model_keys in queue_keys.items():
            queue_length.add_metric([model, self.queues[model]], sum(next(lengths) for _ in model_keys))
        yield queue_length
        yield GaugeMetricFamily("demix_jobs_running", "Jobs running now.", value=running)
        yield GaugeMetricFamily("demix_disk_free_bytes", "Free space under DEMIX_DATA_DIR, in bytes.",
                                value=_free_bytes(self.data_dir))

        webhooks = webhook_health(self.redis)
        yield GaugeMetricFamily("demix_webhook_senders", "Webhook senders alive (one per worker's background "
                                f"process; a heartbeat within the last {SENDER_LIVE_S:g}s).", value=webhooks.senders)
        yield GaugeMetricFamily("demix_webhooks_pending", "Webhook deliveries not yet delivered nor given up.",
                                value=webhooks.pending)
        yield GaugeMetricFamily("demix_webhooks_overdue", f"Webhook deliveries due over {OVERDUE_S:g}s ago and "
                                "not yet attempted: no sender is alive, or all are busy.", value=webhooks.overdue)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _histogram(name: str, doc: str, bounds: tp.Sequence[float],
               raw: tp.Mapping[bytes, bytes]) -> HistogramMetricFamily:
    # Redis keeps one count per bucket; Prometheus wants them cumulative.
    fields = {k.decode(): v for k, v in raw.items()}
    buckets, total = [], 0.0
    per_bound = {float(k): float(v) for k, v in fields.items() if k not in ("count", "sum", "+Inf")}
    for bound in bounds:
        total += per_bound.get(bound, 0.0)
        buckets.append((repr(float(bound)), total))
    total += float(fields.get("+Inf", 0))
    buckets.append(("+Inf", total))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=float(fields.get("sum", 0)))


def _free_bytes(directory: Path) -> float:
    # The data dir may not exist yet on a fresh install; its nearest existing parent is on
    # the same filesystem.
    path = directory
    while not path.exists() and path != path.parent:
        path = path.parent
    return float(shutil.disk_usage(path).free)
