"""A workflow job's runs: child jobs spread over the workers, and moving the workflow on.

A workflow job holds no worker itself. Each piece of its work is a *child job* with its
own record, queue, lease and attempts, so every guarantee of a plain job holds per piece (a
worker killed mid-run: that child alone is requeued and redone; finished children are never
run again; a long child runs as parts):

- a **model run** per (step, model), on that model's queue: the model over the step's input
  (the job's input, or another child's stem), every source of the model, as float32 WAV at
  the input's rate and channels, so a chain passes samples on exactly;
- a **step unit** per step that ensembles several models, or gives a complement `no_X` its
  single model does not write: it reads the runs' stems and writes the step's;
- the **outputs unit**: it writes the job's stems in the job's output format from the steps'
  stems and marks the job succeeded.

`advance` moves a workflow on: it creates (once: `JobStore.create_child` and the units'
fixed ids) and enqueues every unit whose inputs exist, and fails the job when a unit failed.
It runs whenever a child finishes (a job store hook, `demix.services`) and periodically for
every workflow in flight (the workers' workflow sweep), so a message lost between a child's
end and its successor's start only delays the workflow.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import typing as tp

from demix import redis_keys as keys
from demix.audio.output_formats import OutputOptions
from demix.errors import BadRequest, DemixError, IllegalTransition, JobNotFound
from demix.jobs.lifecycle import end_children, enqueue_job
from demix.jobs.records import Job, JobStatus, JobStore, new_job_id
from demix.stems import ALL, output_names
from demix.workflows.spec import StemRef, Step, Workflow

log = logging.getLogger(__name__)

MODEL, STEP, OUTPUTS, FETCH = "model", "step", "outputs", "fetch"
"""The kinds of unit (`Job.workflow_unit["kind"]`)."""

WORKFLOW_MODEL = "workflow"
"""What a workflow job's `model` field says (its models are in its workflow)."""

UNIT_PROGRESS_WEIGHT = {MODEL: 1.0, STEP: 0.1, OUTPUTS: 0.1, FETCH: 0.1}
"""How much of a workflow's progress each kind of unit is: a model run is the work."""


class Context(tp.Protocol):
    """What moving a workflow on needs (`demix.services.Services` and the worker's context)."""
    settings: tp.Any
    jobs: JobStore
    storage: tp.Any
    celery: tp.Any


def unit_id(parent_id: str, unit: str) -> str:
    """The fixed job id of unit `unit` of workflow job `parent_id`: every process moving the
    workflow on names the same child, so it is created once."""
    return hashlib.sha256(f"{parent_id}/{unit}".encode()).hexdigest()[:32]


def run_name(step: str, model: str) -> str:
    return f"{step}/{model}"


def intermediate_output(job: Job) -> OutputOptions:
    """How every child writes its stems: float32 WAV at the job's input rate and channels,
    so a stem read by the next step is exactly what was computed."""
    return OutputOptions(format="wav", sample_format="float32", samplerate=job.samplerate,
                         channels=job.channels, channel_mode="input", clip="clamp")


def step_unit_needed(workflow: Workflow, step: Step) -> bool:
    """Whether `step` needs its own unit: it ensembles several models, or another step or
    the outputs read a complement its one model's run does not write."""
    if len(step.models) > 1:
        return True
    written = output_names(ALL, step.sources)
    return any(stem not in written for stem in workflow.needed_stems(step.name))


def stem_location(workflow: Workflow, parent_id: str, ref: StemRef) -> dict:
    """Which job holds the stem `ref` names: `{"job": id, "stem": name}`, stem None for the
    job's own input."""
    if ref.is_mix:
        return {"job": parent_id, "stem": None}
    step = workflow.step(ref.step)
    unit = step.name if step_unit_needed(workflow, step) else run_name(step.name, step.models[0])
    return {"job": unit_id(parent_id, unit), "stem": ref.stem}


def stem_file(context: Context, location: tp.Mapping[str, tp.Any]) -> tp.Any:
    """The stored file (`demix.storage.local.StoredFile`) at a stem location.

    Raises:
        JobNotFound: the job holding it is gone (its workflow was deleted).
    """
    if location["stem"] is None:
        return context.storage.stored_input(location["job"])
    holder = context.jobs.get(location["job"])
    return context.storage.stem(holder.id, location["stem"], OutputOptions.from_dict(holder.output).extension,
                                holder.attempts)


@dataclasses.dataclass
class Unit:
    """One child job a workflow needs, before it exists."""
    name: str
    kind: str
    model: str
    queue: str
    reads: dict
    """What it reads: `input` (a stem location) for a model run; `runs` (job ids), `input`,
    `stems`, `ensemble`, `weights` for a step unit; `outputs` (name -> location) for the
    outputs unit."""


def units(workflow: Workflow, parent: Job, settings: tp.Any) -> list[Unit]:
    """Every unit of the workflow, in the order they can run (a `url` job whose input is not
    fetched yet: the fetch alone; what follows depends on the input)."""
    first_model = workflow.steps[0].models[0]
    if parent.awaits_input:
        return [Unit(FETCH, FETCH, first_model, settings.queue_for(first_model), {})]
    found = []
    for step in workflow.steps:
        location = stem_location(workflow, parent.id, step.input)
        runs = [Unit(run_name(step.name, model), MODEL, model, settings.queue_for(model), {"input": location})
                for model in step.models]
        found += runs
        if step_unit_needed(workflow, step):
            found.append(Unit(step.name, STEP, step.models[0], settings.queue_for(step.models[0]), {
                "runs": [unit_id(parent.id, run.name) for run in runs], "input": location,
                "sources": list(step.sources), "stems": list(workflow.needed_stems(step.name)),
                "ensemble": step.ensemble, "weights": list(step.weights) if step.weights else None}))
    last_model = workflow.steps[-1].models[0]
    found.append(Unit(OUTPUTS, OUTPUTS, last_model, settings.queue_for(last_model), {
        "outputs": {name: stem_location(workflow, parent.id, ref) for name, ref in workflow.outputs.items()}}))
    return found


def unit_inputs(unit: Unit) -> list[str]:
    """The ids of the jobs whose stems the unit reads (the workflow job itself: its input)."""
    if unit.kind == MODEL:
        return [unit.reads["input"]["job"]]
    if unit.kind == STEP:
        return list(unit.reads["runs"]) + [unit.reads["input"]["job"]]
    if unit.kind == FETCH:
        return []
    return [location["job"] for location in unit.reads["outputs"].values()]


def child_job(parent: Job, unit: Unit, cache: bool = True) -> Job:
    """The record of `unit`'s child job (`cache`: whether its model run may use the result cache)."""
    job = Job(id=unit_id(parent.id, unit.name), status=JobStatus.QUEUED, stems=ALL, model=unit.model,
              samplerate=parent.samplerate, channels=parent.channels, frames=parent.frames,
              created_at=time.time(), input_format=parent.input_format, queue=unit.queue,
              workflow_unit={"parent": parent.id, "unit": unit.name, "kind": unit.kind, **unit.reads},
              use_cache=cache)
    if unit.kind == FETCH:  # the job's `url` input, fetched and checked as a `url` job's
        return dataclasses.replace(job, source_url=parent.source_url, request_fields=parent.request_fields)
    return dataclasses.replace(job, output=intermediate_output(parent).to_dict())


def start_workflow(parent: Job, context: Context) -> None:
    """Note a new workflow job as in flight and start its first units."""
    context.jobs.redis.sadd(keys.workflows_key(), parent.id)
    advance(parent.id, context)


def advance(parent_id: str, context: Context) -> list[str]:
    """Move workflow job `parent_id` on: send every unit whose inputs are ready and that does
    not exist yet; fail the job if a unit failed. Safe to run in many processes at once and
    again at any time. Returns the names of the units it sent."""
    jobs = context.jobs
    try:
        parent = jobs.get(parent_id)
    except JobNotFound:
        jobs.redis.srem(keys.workflows_key(), parent_id)
        return []
    if parent.status.is_finished:
        jobs.redis.srem(keys.workflows_key(), parent_id)
        return []
    workflow = Workflow.from_dict(parent.workflow)
    children = _children(jobs, parent_id)
    for child in children.values():
        if child.status in (JobStatus.FAILED, JobStatus.CANCELLED):
            _fail(parent, child, context)
            return []
    fetched = children.get(unit_id(parent_id, FETCH))
    if parent.awaits_input and fetched is not None and fetched.status is JobStatus.SUCCEEDED:
        parent = _adopt_input(parent, fetched, context)
        if parent is None:
            return []
    done = {child.id for child in children.values() if child.status is JobStatus.SUCCEEDED}
    if not parent.awaits_input:
        done.add(parent_id)
    sent = []
    for unit in units(workflow, parent, context.settings):
        child_id = unit_id(parent_id, unit.name)
        if child_id in children or not all(job_id in done for job_id in unit_inputs(unit)):
            continue
        child = child_job(parent, unit, cache=parent.use_cache)
        if "input" in unit.reads:  # its own copy of what it reads: it runs as any job
            context.storage.copy_input(child.id, stem_file(context, unit.reads["input"]))
        if jobs.create_child(child, parent_id):
            enqueue_job(context.celery, child.id, child.queue)
            log.info("workflow job %s: %s sent to %s", parent_id, unit.name, child.queue)
            sent.append(unit.name)
    return sent


def _adopt_input(parent: Job, fetched: Job, context: Context) -> tp.Optional[Job]:
    """A `url` workflow's input is fetched: make it the job's own and record what it is
    (its rate, channels, output options resolved from it); None if the job failed here."""
    output = OutputOptions.from_dict(fetched.output)
    if output.samplerate != fetched.samplerate or output.channel_mode != "input":
        _fail(parent, dataclasses.replace(fetched, error=BadRequest(
            f"the input is {fetched.samplerate} Hz and a workflow job's stems keep the input's rate and "
            f"channels; {output.format} stems cannot (choose wav or flac)", code="invalid_output").to_dict()),
            context)
        return None
    context.storage.copy_input(parent.id, context.storage.stored_input(fetched.id))
    try:
        return context.jobs.update_running(
            parent.id, parent.attempts, samplerate=fetched.samplerate, channels=fetched.channels,
            frames=fetched.frames, input_format=fetched.input_format, output=fetched.output,
            download=fetched.download)
    except (IllegalTransition, JobNotFound):  # cancelled or deleted meanwhile
        return None


def _children(jobs: JobStore, parent_id: str) -> dict[str, Job]:
    found = {}
    for child_id in jobs.children(parent_id):
        try:
            found[child_id] = jobs.get(child_id)
        except JobNotFound:
            pass
    return found


def _fail(parent: Job, child: Job, context: Context) -> None:
    """A unit failed (or was cancelled without its job): the job fails saying which and why,
    and its other units stop."""
    unit = child.workflow_unit.get("unit", child.id)
    cause = child.error or {"code": "cancelled", "message": "it was cancelled"}
    error = DemixError(f"{_describe(unit)} failed: {cause.get('message')}", code=cause.get("code") or "failed")
    try:
        context.jobs.mark_failed(parent.id, error)
        log.warning("workflow job %s failed: %s", parent.id, error.message)
    except (IllegalTransition, JobNotFound):
        pass  # finished or cancelled meanwhile
    end_children(context.jobs, context.storage, parent.id)
    context.jobs.redis.srem(keys.workflows_key(), parent.id)


def _describe(unit: str) -> str:
    if unit == OUTPUTS:
        return "writing the outputs"
    if unit == FETCH:
        return "fetching the input"
    step, _, model = unit.partition("/")
    return f"step {step!r}, model {model!r}," if model else f"step {step!r} (its ensemble)"


def in_flight(jobs: JobStore) -> list[str]:
    """Ids of the workflow jobs not finished yet."""
    return sorted(member.decode() for member in jobs.redis.smembers(keys.workflows_key()))


def advance_all(context: Context) -> dict[str, list[str]]:
    """`advance` every workflow in flight (the workers' sweep); returns what each sent."""
    sent = {}
    for parent_id in in_flight(context.jobs):
        try:
            if names := advance(parent_id, context):
                sent[parent_id] = names
        except Exception:  # one broken record must not stop the others
            log.exception("could not advance workflow job %s", parent_id)
    return sent


def on_child_finished(job: Job, context: Context) -> None:
    """The job store hook: a finished child moves its workflow on."""
    parent_id = job.workflow_unit.get("parent")
    if parent_id:
        advance(parent_id, context)


def workflow_view(parent: Job, jobs: JobStore) -> dict:
    """`workflow_progress` of a workflow job, its runs read now."""
    return workflow_progress(parent, list(_children(jobs, parent.id).values()))


def workflow_progress(parent: Job, children: tp.Sequence[Job]) -> dict:
    """The job JSON's view of a workflow job: per step its runs' states, progress and
    whether the cache gave them, and the whole job's progress."""
    workflow = Workflow.from_dict(parent.workflow)
    by_unit = {child.workflow_unit.get("unit"): child for child in children}
    weighted, total, steps = 0.0, 0.0, []
    for step in workflow.steps:
        runs = []
        for model in step.models:
            child = by_unit.get(run_name(step.name, model))
            runs.append({"model": model, "status": child.status.value if child else "waiting",
                         "progress": round(_done(child), 4), "cached": bool(child and child.cached),
                         "attempts": child.attempts if child else 0})
        unit_jobs = [by_unit.get(run_name(step.name, model)) for model in step.models]
        weights = [UNIT_PROGRESS_WEIGHT[MODEL]] * len(unit_jobs)
        if step_unit_needed(workflow, step):
            unit_jobs.append(by_unit.get(step.name))
            weights.append(UNIT_PROGRESS_WEIGHT[STEP])
        step_done = sum(w * _done(child) for w, child in zip(weights, unit_jobs))
        weighted, total = weighted + step_done, total + sum(weights)
        steps.append({**step.to_dict(), "status": _step_status(unit_jobs),
                      "progress": round(step_done / sum(weights), 4), "runs": runs})
    for kind in (OUTPUTS, FETCH) if parent.source_url else (OUTPUTS,):
        weighted += UNIT_PROGRESS_WEIGHT[kind] * _done(by_unit.get(kind))
        total += UNIT_PROGRESS_WEIGHT[kind]
    progress = 1.0 if parent.status is JobStatus.SUCCEEDED else weighted / total
    fetch = by_unit.get(FETCH)
    return {"steps": steps, "outputs": {name: str(ref) for name, ref in workflow.outputs.items()},
            "progress": round(progress, 4), "download": fetch.download if fetch else None}


def _done(child: tp.Optional[Job]) -> float:
    if child is None:
        return 0.0
    return 1.0 if child.status is JobStatus.SUCCEEDED else child.progress


def _step_status(unit_jobs: tp.Sequence[tp.Optional[Job]]) -> str:
    """`waiting` (no run sent yet), `queued`, `running`, `succeeded`, or `failed`/`cancelled`."""
    statuses = [child.status for child in unit_jobs if child is not None]
    for status in (JobStatus.FAILED, JobStatus.CANCELLED):
        if status in statuses:
            return status.value
    if not statuses:
        return "waiting"
    if len(statuses) == len(unit_jobs) and all(status is JobStatus.SUCCEEDED for status in statuses):
        return JobStatus.SUCCEEDED.value
    if JobStatus.RUNNING in statuses or JobStatus.SUCCEEDED in statuses:
        return JobStatus.RUNNING.value
    return JobStatus.QUEUED.value


def new_workflow_job(workflow: Workflow, info: tp.Any, output: tp.Optional[OutputOptions], owner: str = "",
                     callback_url: tp.Optional[str] = None, job_id: tp.Optional[str] = None,
                     source_url: tp.Optional[str] = None, request_fields: tp.Mapping[str, str] = {},
                     cache: bool = True) -> Job:
    """The record of a new workflow job on an input described by `info` (`AudioInfo`; None
    for a `url` job, whose input and `output` are known once fetched). It is `running` from
    the start, at attempt 1 (the fence its outputs unit finishes it with), with no queue and
    no lease of its own: its units have those. With `cache` false, its model runs neither
    read nor write the result cache."""
    now = time.time()
    job = Job(id=job_id or new_job_id(), status=JobStatus.RUNNING, stems=ALL, model=WORKFLOW_MODEL,
              samplerate=0, channels=0, frames=0, created_at=now, started_at=now, attempts=1,
              owner=owner, callback_url=callback_url, workflow=workflow.to_dict(), source_url=source_url,
              request_fields=dict(request_fields), use_cache=cache)
    if info is None:
        return job
    return dataclasses.replace(job, samplerate=info.samplerate, channels=info.channels, frames=info.frames,
                               input_format=info.input_format, output=output.to_dict())
