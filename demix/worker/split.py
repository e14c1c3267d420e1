"""Running a long job as parts on many workers: a Celery chord of part tasks and a merge.

The job's own task (`run_job`) makes the first pass over the whole input under the job's
lease, writes the plan (`split-<attempt>/plan.json`: the mix's mean and deviation, the
parts' windows) and sends a chord: one `separate_part` per part, then `merge_parts`. Each
part and the merge is a *unit* (`demix.jobs.split_records`): it takes its own lease, stops at its
next segment when the job is cancelled, deleted or superseded (fenced by the attempt, as
the unsplit run), and when its worker stops it is sent again (with its chord) for
another worker. A unit whose worker died is sent again alone by the part sweep
(`demix.worker.maintenance`). The merge writes the stems through the same sink and publish
path as an unsplit run and marks the job succeeded.

Plain Python over the stores and the engine; `demix.worker.tasks` holds the thin Celery tasks.
"""
from __future__ import annotations

import json
import logging
import typing as tp
from pathlib import Path

import torch
from celery import chord

from demix.celery_app import MERGE_PARTS_TASK, SEPARATE_PART_TASK
from demix.config import Settings
from demix.errors import DemixError, IllegalTransition, JobNotFound, SeparationFailed
from demix.jobs.records import Job
from demix.audio.output_formats import OutputOptions
from demix.jobs.split_records import MERGE, SplitStore, part_unit, send_unit
from demix.storage.local import disk_full_error

from demix.separation import (JobStemSink, MODEL_SHARE, STATS_SHARE, SplitPlan, StemLayout, is_roformer,
                              merge_split, part_windows_total, prepare_split, resolve_device, run_part,
                              single_pass, stem_layout)
from demix.worker.attempt import (AttemptLease, JobInterrupted, WorkerContext, attempt_scratch, job_model_spec,
                                  lease_holder, record_outcome, retry_while_redis_is_down, separation_options)

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"


def should_split(job: Job, settings: Settings, model: torch.nn.Module, layout: StemLayout) -> bool:
    """Whether the job runs as parts: longer than `DEMIX_SPLIT_S` (when set), one model
    pass (no shifts, one sub-model with weight for the stems), at most two channels (or
    their stereo downmix), a Demucs model (the split's plan is Demucs' segments and
    normalisation; a RoFormer runs whole)."""
    return (settings.split_s > 0 and job.duration > settings.split_s and not layout.by_pairs
            and not is_roformer(model) and single_pass(model, layout.sources, settings.shifts) is not None)


def start_split(job: Job, attempt: int, context: WorkerContext, lease: AttemptLease,
                model: torch.nn.Module, layout: StemLayout, input_path: Path) -> None:
    """The first pass over the job's input (a local file), the plan, the split record,
    then the chord of parts and merge."""
    try:
        files = context.storage.begin_split(job.id, attempt)
        plan = prepare_split(model, input_path, layout, context.settings.overlap,
                             int(context.settings.split_s * model.samplerate), files,
                             progress=lambda value: lease.report_progress(STATS_SHARE * value))
        files.write_text(PLAN_FILE, json.dumps(plan.to_dict()))
        lease.check()
        SplitStore(context.jobs.redis).create(job.id, attempt, len(plan.parts),
                                              part_windows_total(model, layout, plan))
    except BaseException:
        context.storage.clear_split(job.id, attempt)
        raise
    queue, celery = job_queue(job, context), context.celery
    header = [celery.signature(SEPARATE_PART_TASK, args=[job.id, attempt, part.index], queue=queue)
              for part in plan.parts]
    body = celery.signature(MERGE_PARTS_TASK, args=[job.id, attempt], queue=queue, immutable=True)
    chord(header, app=celery)(body)
    log.info("job %s attempt %d: %d parts sent", job.id, attempt, len(plan.parts))


def job_queue(job: Job, context: WorkerContext) -> str:
    """Where a job's parts and merge go: the queue the job itself was sent to (a record
    from before queues were recorded: the worker's)."""
    return job.queue or context.settings.queue


class UnitLease(AttemptLease):
    """A unit's hold on its part of the job: renews the unit's lease and the job's, and
    records the windows a part has run (`report_progress` takes that count)."""

    def __init__(self, context: WorkerContext, job_id: str, attempt: int, worker: str, unit: str):
        super().__init__(context, job_id, attempt, worker)
        self.unit = unit
        self.splits = SplitStore(context.jobs.redis)

    def _write(self, progress: tp.Optional[float]) -> None:
        self.splits.heartbeat(self.job_id, self.attempt, self.unit, self.lease_s, self.holder,
                              windows=None if progress is None else int(progress),
                              base=STATS_SHARE, share=MODEL_SHARE)

    def flush(self, windows: int) -> None:
        """Record the final count at once (progress writes are rate-limited)."""
        self._renew(windows)
        self.check()

    def interruption(self) -> tp.Optional[JobInterrupted]:
        """Why the unit must stop, asking Redis now (a failure may just be the job's files
        removed by a cancel that the next heartbeat would have reported)."""
        self._renew(None)
        return self._interrupted


def chord_message(request: tp.Any) -> dict:
    """What a unit's Celery message carried, to send it again the same way."""
    return {"id": request.id, "group": request.group, "group_index": request.group_index,
            "chord": request.chord}


def run_part_unit(job_id: str, attempt: int, index: int, context: WorkerContext, worker: str,
                  message: dict) -> bool:
    """Run part `index` of attempt `attempt`; True when it is done (the chord counts it),
    False when this delivery stops or is skipped (the chord must not count it)."""
    unit = part_unit(index)
    lease = _start_unit(job_id, attempt, unit, context, worker, message)
    if lease is None:
        return False
    files = context.storage.split_files(job_id, attempt)
    windows_done = 0

    def count_windows(count: int) -> None:
        nonlocal windows_done
        windows_done += count
        lease.report_progress(windows_done)

    try:
        with lease, attempt_scratch(context.storage):
            model, layout, plan, options = _load(job_id, attempt, context)
            run_part(model, layout, plan, index, files, options, on_windows=count_windows)
            lease.flush(windows_done)
        retry_while_redis_is_down(lambda: lease.splits.finish(job_id, attempt, unit))
    except JobInterrupted as stop:
        _abandon_unit(job_id, attempt, unit, stop, context, message)
        return False
    except (JobNotFound, IllegalTransition) as exc:
        log.info("job %s %s: outcome discarded: %s", job_id, unit, exc.message)
        return False
    except Exception as exc:
        stop = lease.interruption()
        if stop is not None:
            _abandon_unit(job_id, attempt, unit, stop, context, message)
            return False
        if _fail(job_id, attempt, unit, exc, context):
            raise
        return False
    return True


def run_merge_unit(job_id: str, attempt: int, context: WorkerContext, worker: str, message: dict) -> None:
    """Merge the parts of attempt `attempt` into the job's stems and mark it succeeded."""
    lease = _start_unit(job_id, attempt, MERGE, context, worker, message)
    if lease is None:
        return
    storage = context.storage
    try:
        with lease, attempt_scratch(context.storage):
            model, layout, plan, _options = _load(job_id, attempt, context)
            lease.check()
            sink = JobStemSink(storage, job_id, layout.output, attempt)
            with storage.input_file(job_id) as input_path:
                outputs = merge_split(model, input_path, layout, plan, storage.split_files(job_id, attempt), sink)
            lease.check()
    except JobInterrupted as stop:
        _abandon_unit(job_id, attempt, MERGE, stop, context, message)
        return
    except Exception as exc:
        stop = lease.interruption()
        if stop is not None:
            _abandon_unit(job_id, attempt, MERGE, stop, context, message)
            return
        if _fail(job_id, attempt, MERGE, exc, context):
            raise
        return
    if record_outcome(job_id, attempt, context, lambda: context.jobs.mark_succeeded(job_id, outputs, attempt)):
        storage.clear_other_attempts(job_id, keep=attempt)
        log.info("job %s succeeded on attempt %d from %d parts", job_id, attempt, len(plan.parts))
    storage.clear_split(job_id, attempt)
    SplitStore(context.jobs.redis).drop(job_id)


def _start_unit(job_id: str, attempt: int, unit: str, context: WorkerContext, worker: str,
                message: dict) -> tp.Optional[UnitLease]:
    """Take the unit, or None when this delivery must be skipped (the job is finished,
    cancelled, deleted or at another attempt; the unit is done or runs elsewhere)."""
    splits = SplitStore(context.jobs.redis)
    try:
        tries = splits.start(job_id, attempt, unit, context.settings.lease_s, lease_holder(worker), message)
    except (JobNotFound, IllegalTransition) as exc:
        log.info("job %s %s of attempt %d: not starting it: %s", job_id, unit, attempt, exc.message)
        if isinstance(exc, JobNotFound) or exc.details.get("status") == "cancelled":
            context.storage.delete_job(job_id)
        return None
    if tries is None:
        log.info("job %s %s: done or running elsewhere; skipping a duplicate delivery", job_id, unit)
        return None
    return UnitLease(context, job_id, attempt, worker, unit)


def _load(job_id: str, attempt: int, context: WorkerContext) -> tuple[torch.nn.Module, StemLayout, SplitPlan, tp.Any]:
    settings, storage = context.settings, context.storage
    device = resolve_device(settings.device)
    job = context.jobs.get(job_id)
    model = context.models.get(job_model_spec(job, settings, device))
    plan = SplitPlan.from_dict(json.loads(storage.split_files(job_id, attempt).read_text(PLAN_FILE)))
    with storage.input_file(job_id) as input_path:
        layout = stem_layout(model, input_path, job.stems,
                             OutputOptions.from_dict(job.output) if job.output else None)
    return model, layout, plan, separation_options(settings, device)


def _abandon_unit(job_id: str, attempt: int, unit: str, stop: JobInterrupted, context: WorkerContext,
                  message: dict) -> None:
    """Stop a unit that must not finish: remove the job's files if it was cancelled or
    deleted; send the unit again if its worker stops."""
    if stop.reason in ("cancelled", "deleted"):
        context.storage.delete_job(job_id)
        SplitStore(context.jobs.redis).drop(job_id)
    elif stop.reason == "stopping":
        def hand_back() -> None:
            sent = SplitStore(context.jobs.redis).requeue(job_id, attempt, unit, lost=False)
            queue = job_queue(context.jobs.get(job_id), context)
            send_unit(context.celery, queue, job_id, attempt, unit, sent or message)
        try:
            retry_while_redis_is_down(hand_back)
        except (JobNotFound, IllegalTransition):
            pass
    else:
        context.storage.clear_split(job_id, attempt)
    log.info("job %s %s of attempt %d stopped: %s", job_id, unit, attempt, stop)


def _fail(job_id: str, attempt: int, unit: str, exc: Exception, context: WorkerContext) -> bool:
    """A unit failed: the job fails with its error (fenced), its files of this attempt go.
    Returns True when the failure is unexpected (a bug), for the caller to re-raise."""
    unexpected = False
    if isinstance(exc, DemixError):
        log.warning("job %s %s of attempt %d failed: %s", job_id, unit, attempt, exc.message)
        error = exc
    elif (disk_full := disk_full_error(exc)) is not None:  # an expected failure, not a bug
        log.error("job %s %s of attempt %d failed: %s", job_id, unit, attempt, disk_full.message)
        error = disk_full
    else:
        log.exception("job %s %s of attempt %d failed unexpectedly", job_id, unit, attempt)
        error, unexpected = SeparationFailed(f"separation failed: {type(exc).__name__}: {exc}"), True
    context.storage.clear_split(job_id, attempt)
    context.storage.clear_stems(job_id, attempt)
    record_outcome(job_id, attempt, context, lambda: context.jobs.mark_failed(job_id, error, attempt))
    SplitStore(context.jobs.redis).drop(job_id)
    return unexpected
