"""The Celery app, always built from a `Settings` object by `make_celery`.

The API builds its own inside `create_app`, from the same settings as its job store, so
the broker and the job records can never be on different Redis servers. Worker processes
and Flower use this module's `celery_app` (`celery --app demix.celery_app worker|flower`),
built on first use from the process-wide settings (`get_settings()`) that the worker's job
store reads too. The API sends tasks by name, so it never imports the worker's torch code.
"""
from __future__ import annotations

import functools
import typing as tp

from celery import Celery

from demix.config import Settings, get_settings

SEPARATE_TASK = "demix.separate"
"""Name of the task that separates one job; its only argument is the job id."""

CELERY_WARM_BACKSTOP_S = 60.0
"""How long after DEMIX_WARM_TIMEOUT_S Celery itself kills a pool process that never said it
was up, should the worker's own watchdog (`demix.worker.pool_guard`) not have replaced it."""


SEPARATE_PART_TASK = "demix.separate_part"
"""Name of the task that runs one part of a split job; arguments: job id, attempt, part index."""

MERGE_PARTS_TASK = "demix.merge_parts"
"""Name of the chord body that merges a split job's parts; arguments: job id, attempt."""

RESULT_EXPIRES_S = 24 * 3600
"""How long Celery keeps the (empty) results of parts, which chords count."""

def celery_config(settings: Settings) -> dict:
    """The Celery configuration mapping for these settings."""
    url = settings.effective_redis_url
    return {
        "broker_url": url,
        # Job state lives in our own job records, so results are not stored, except the
        # parts' (empty) ones: the chord that merges a split job counts them in Redis.
        "task_ignore_result": True,
        "result_backend": url,
        "result_expires": RESULT_EXPIRES_S,
        "task_default_queue": settings.queue,
        "task_routes": {name: {"queue": settings.queue}
                        for name in (SEPARATE_TASK, SEPARATE_PART_TASK, MERGE_PARTS_TASK)},
        # A separation takes minutes: take one job at a time and acknowledge it only
        # when it is done, so a worker that dies mid-job gives the job back.
        "worker_prefetch_multiplier": 1,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "broker_transport_options": {"visibility_timeout": settings.job_timeout_s},
        # Redis may restart (`demix up` restarts it; its append-only file keeps the queue):
        # workers retry connecting forever, at startup and after losing the connection,
        # instead of giving up after Celery's default 100 attempts.
        "broker_connection_retry_on_startup": True,
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,
        # A running separation carries on through a broker outage and records its result
        # when Redis is back (Celery 6 will default to cancelling it and starting over).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # A cold shutdown (SIGQUIT, a second Ctrl-C) first waits this long: runs already
        # told to stop by the warm shutdown hand their job back at their next segment;
        # whatever still runs is then cancelled and given back (demix.worker.tasks).
        "worker_soft_shutdown_timeout": settings.soft_shutdown_s,
        # Flower needs task events; sending them costs little.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        # Each pool process loads and warms the model before it reports itself up
        # (demix.worker.tasks); Celery's default of 4 s would kill it mid-warm-up. The watchdog in
        # `demix.worker.pool_guard` replaces one that hangs at DEMIX_WARM_TIMEOUT_S, with its stack.
        "worker_proc_alive_timeout": settings.warm_timeout_s + CELERY_WARM_BACKSTOP_S,
    }


class DemixCelery(Celery):
    """A Celery app that keeps the `Settings` it was configured from."""

    def __init__(self, settings: Settings):
        super().__init__("demix", include=["demix.worker.tasks"])
        self.settings = settings
        self.conf.update(celery_config(settings))


def make_celery(settings: Settings) -> DemixCelery:
    """The Celery app for `settings`: broker, queue and delivery rules all from them."""
    return DemixCelery(settings)


@functools.lru_cache(maxsize=1)
def worker_celery_app() -> DemixCelery:
    """The Celery app of worker and Flower processes, from the process-wide settings."""
    return make_celery(get_settings())


def __getattr__(name: str) -> tp.Any:
    # Built lazily, so importing this module (for `SEPARATE_TASK`) builds no app from the
    # environment; `celery --app demix.celery_app` finds it as `app`.
    if name in ("celery_app", "app"):
        return worker_celery_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
