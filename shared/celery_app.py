"""The one Celery app. The API sends tasks to it by name (so it never imports the
worker's torch code); `demix worker` runs it with the tasks of `worker.tasks`;
Flower watches it: `celery --app shared.celery_app flower`."""
from __future__ import annotations

from celery import Celery

from .config import Settings, get_settings

SEPARATE_TASK = "demix.separate"
"""Name of the task that separates one job; its only argument is the job id."""

WARMUP_TIMEOUT_S = 900.0
"""Longest a new pool process may take to load and warm its model before Celery gives up on it."""


SEPARATE_PART_TASK = "demix.separate_part"
"""Name of the task that runs one part of a split job; arguments: job id, attempt, part index."""

MERGE_PARTS_TASK = "demix.merge_parts"
"""Name of the chord body that merges a split job's parts; arguments: job id, attempt."""

RESULT_EXPIRES_S = 24 * 3600
"""How long Celery keeps the (empty) results of parts, which chords count."""

SOFT_SHUTDOWN_S = 10.0
"""Seconds a cold-shutting-down worker lets its running jobs hand themselves back."""


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
        "broker_connection_retry_on_startup": True,
        # A cold shutdown (SIGQUIT, a second Ctrl-C) first waits this long: runs already
        # told to stop by the warm shutdown hand their job back at their next segment;
        # whatever still runs is then cancelled and given back (worker.tasks).
        "worker_soft_shutdown_timeout": SOFT_SHUTDOWN_S,
        # Flower needs task events; sending them costs little.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        # Each pool process loads and warms the model before it reports itself up
        # (worker.tasks); Celery's default of 4 s would kill it mid-warm-up.
        "worker_proc_alive_timeout": WARMUP_TIMEOUT_S,
    }


def make_celery(settings: Settings) -> Celery:
    app = Celery("demix", include=["worker.tasks"])
    app.conf.update(celery_config(settings))
    return app


celery_app = make_celery(get_settings())
