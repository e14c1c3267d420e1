"""The commands that run each of the service's processes: `demix api`/`demix worker` exec
them, `demix up` starts them as children, and the deployment files mirror them."""
from __future__ import annotations

import os
import sys
import typing as tp

from demix.config import Settings


def api_argv(settings: Settings, threads: tp.Optional[int] = None) -> list[str]:
    """The command serving `demix.api.create_app()` behind the HTTP front (`demix.api.front`)."""
    argv = [sys.executable, "-m", "demix.api.front"]
    return argv + ["--threads", str(threads)] if threads else argv


def check_worker_models(settings: Settings) -> None:
    """Raises ValueError when the worker would serve a model DEMIX_MODELS does not name."""
    unknown = [name for name in settings.worker_served_models if name not in settings.served_models]
    if unknown:
        raise ValueError(f"--models/DEMIX_WORKER_MODELS names {', '.join(unknown)}, which DEMIX_MODELS "
                         f"({', '.join(settings.served_models)}) does not serve")


def worker_queues(settings: Settings) -> list[str]:
    """The queues of the models the worker serves (`DEMIX_WORKER_MODELS`, else all)."""
    return [settings.queue_for(name) for name in settings.worker_served_models]


def worker_argv(settings: Settings, concurrency: tp.Optional[int] = None, loglevel: str = "INFO") -> list[str]:
    """The command running a Celery worker on its models' queues, with task events for Flower."""
    return [sys.executable, "-m", "celery", "--app", "demix.celery_app", "worker",
            "--queues", ",".join(worker_queues(settings)),
            "--concurrency", str(concurrency or settings.worker_concurrency),
            "--prefetch-multiplier", "1",
            "--task-events",
            "--hostname", worker_node_name(os.getpid()),
            "--loglevel", loglevel]


def worker_node_name(pid: int, host: str = "%h") -> str:
    """The Celery node name of the worker whose process is `pid` (exec keeps the pid).

    Unique per process, as Celery requires of workers sharing a broker: two workers on
    one machine, or a worker and its restarted successor, are told apart (in Flower too).
    """
    return f"demix-{pid}@{host}"


def flower_argv(settings: Settings) -> list[str]:
    """The command serving Flower for the service's Celery app on DEMIX_HOST:DEMIX_FLOWER_PORT
    (127.0.0.1 when API keys are set and Flower has no login: `demix.cli.flower`). Its login
    goes in its environment (`flower_environment`), never here: `ps` shows a command line."""
    from demix.cli.flower import flower_address

    return [sys.executable, "-m", "celery", "--app", "demix.celery_app", "flower",
            f"--address={flower_address(settings)}", f"--port={settings.flower_port}"]
