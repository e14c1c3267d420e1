"""Workflows driven in this process, without Celery: the tasks a workflow sends are recorded
and run here in order by the worker's own `run_job` (tests/worker/, tests/workflows/)."""
from __future__ import annotations

import json
import typing as tp
from pathlib import Path


class QueueRecorder:
    """Celery as far as a workflow uses it: `sent` holds (job id, queue) per task sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def send_task(self, name: str, args: list, queue: str, **_options: tp.Any) -> None:
        self.sent.append((args[0], queue))


def worker_context(settings: tp.Any, redis_client: tp.Any, storage: tp.Any = None) -> tp.Any:
    """A worker's context over `redis_client` and `storage` (default: the settings'), sending to
    a `QueueRecorder`, whose job store moves a workflow on when a run finishes, as a worker's."""
    from demix.jobs.records import JobStore
    from demix.separation.models import ModelCache
    from demix.services import make_storage
    from demix.worker.attempt import WorkerContext
    from demix.workflows.runs import on_child_finished

    context = WorkerContext(settings=settings, jobs=JobStore(redis_client), models=ModelCache(),
                            storage=storage if storage is not None else make_storage(settings), celery=QueueRecorder())
    context.jobs.on_finished.append(lambda job: on_child_finished(job, context))
    return context


def run_workflow(context: tp.Any, mix: Path, workflow: tp.Mapping[str, tp.Any], cache: bool = True,
                 **output_fields: str) -> str:
    """Submit a workflow job of `mix` as the API does (float32 stems unless `output_fields` say
    otherwise), then run every task it sends, in order, until none is left; returns its id."""
    from demix.audio.output_formats import resolve_output
    from demix.intake.inspection import inspect_upload
    from demix.worker.runner import run_job
    from demix.workflows.runs import new_workflow_job, start_workflow
    from demix.workflows.spec import parse_workflow

    with context.storage.open_upload() as upload:
        upload.write(mix.read_bytes())
    info = inspect_upload(Path(upload.name), context.settings)
    job = new_workflow_job(parse_workflow(json.dumps(workflow), context.settings), info,
                           resolve_output({"sample_format": "float32", **output_fields}, info), cache=cache)
    context.storage.accept_upload(Path(upload.name), job.id)
    context.jobs.create(job)
    start_workflow(job, context)
    while context.celery.sent:
        run_job(context.celery.sent.pop(0)[0], context)
    return job.id
