"""Running the units of a workflow job that run no model (`demix.workflows.runs`): a step's
stems from its models' runs (their ensemble, the complements), and the job's outputs in
its own format, which finishes the job.

Each is one attempt of a child job under its lease, like a model run (`demix.worker.runner`
claims it and records its outcome); this module only reads the stems it needs and writes.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import typing as tp
from pathlib import Path

from demix.audio.output_formats import OutputOptions
from demix.errors import IllegalTransition, JobNotFound
from demix.jobs.records import Job, JobStatus
from demix.intake.url_jobs import fetch_input
from demix.workflows.runs import FETCH, OUTPUTS, STEP, stem_file

from demix.separation import JobStemSink, encode_stems, write_step_stems
from demix.worker.attempt import AttemptLease, JobInterrupted, WorkerContext, retry_while_redis_is_down

log = logging.getLogger(__name__)


def is_workflow_unit(job: Job) -> bool:
    """Whether `job` is a workflow unit that runs no model (a `url` input's fetch, a step's
    stems, the outputs)."""
    return job.workflow_unit.get("kind") in (FETCH, STEP, OUTPUTS)


def run_workflow_unit(job: Job, attempt: int, context: WorkerContext, lease: AttemptLease) -> list[str]:
    """Run attempt `attempt` of unit `job`; returns the stems it wrote for itself."""
    kind = job.workflow_unit["kind"]
    if kind == FETCH:  # the workflow adopts the fetched input when this unit succeeds
        fetch_input(job, context, lease)
        return []
    if kind == STEP:
        return _run_step(job, attempt, context, lease)
    return _run_outputs(job, context, lease)


def _run_step(job: Job, attempt: int, context: WorkerContext, lease: AttemptLease) -> list[str]:
    unit = job.workflow_unit
    stems = unit["stems"]
    sources = list(dict.fromkeys(name[3:] if name.startswith("no_") else name for name in stems))
    storage = context.storage
    with contextlib.ExitStack() as stack:
        runs = [{source: stack.enter_context(local_copy(context, {"job": run_id, "stem": source}))
                 for source in sources} for run_id in unit["runs"]]
        input_path = stack.enter_context(storage.input_file(job.id))
        storage.incoming_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="step-", dir=storage.incoming_dir)))
        lease.check()
        sink = JobStemSink(storage, job.id, OutputOptions.from_dict(job.output), attempt)
        return write_step_stems(runs, input_path, stems, sink, scratch, unit.get("ensemble"), unit.get("weights"),
                                progress=lease.report_progress)


def _run_outputs(job: Job, context: WorkerContext, lease: AttemptLease) -> list[str]:
    """Write the workflow job's stems and mark it succeeded; then its runs' files go."""
    jobs, storage = context.jobs, context.storage
    parent = jobs.get(job.workflow_unit["parent"])
    if parent.status is JobStatus.SUCCEEDED:  # an earlier attempt of this unit finished it
        return []
    if parent.status is not JobStatus.RUNNING:
        raise JobInterrupted("cancelled", f"the workflow job is {parent.status.value}")
    output = OutputOptions.from_dict(parent.output)
    storage.clear_stems(parent.id, parent.attempts)  # what a killed earlier attempt left
    with contextlib.ExitStack() as stack:
        files = {name: stack.enter_context(local_copy(context, location))
                 for name, location in job.workflow_unit["outputs"].items()}
        lease.check()
        names = encode_stems(files, JobStemSink(storage, parent.id, output, parent.attempts), output,
                             progress=lease.report_progress)
    lease.confirm()
    try:
        retry_while_redis_is_down(lambda: jobs.mark_succeeded(parent.id, names, parent.attempts))
    except (IllegalTransition, JobNotFound) as exc:  # cancelled or deleted while writing
        storage.clear_stems(parent.id, parent.attempts)
        raise JobInterrupted("cancelled", exc.message) from None
    log.info("workflow job %s succeeded: %s", parent.id, ", ".join(names))
    for child_id in jobs.children(parent.id):  # the runs' stems were only steps on the way
        storage.delete_job(child_id)
    return []


@contextlib.contextmanager
def local_copy(context: WorkerContext, location: tp.Mapping[str, tp.Any]) -> tp.Iterator[Path]:
    """The stem (or input) at `location` as a local file for the block: the file itself in
    a local folder, a scratch copy from a bucket."""
    stored = stem_file(context, location)
    path = stored.local_path
    if path is not None:
        if not path.exists():
            raise FileNotFoundError(f"{location['stem'] or 'input'} of job {location['job']} is gone")
        yield path
        return
    target = context.storage.scratch_file(stored.name)
    try:
        with stored.open() as stream, open(target, "wb") as copy:
            shutil.copyfileobj(stream, copy, 1 << 20)
        yield target
    finally:
        target.unlink(missing_ok=True)
