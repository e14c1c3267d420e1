"""A model run through the result cache (`demix.jobs.result_cache`): served from an entry
without running the model, or stored as one after it ran.

`run_key` says whether a job's run can use the cache at all and under which entry key;
`serve_from_cache` writes the job's stems from the entry (a hit), `store_in_cache` keeps a
finished run's stems as an entry.
"""
from __future__ import annotations

import importlib.metadata
import logging
import typing as tp
from pathlib import Path

import torch

from demix.audio.io import read_info
from demix.audio.output_formats import OutputOptions
from demix.jobs.metrics import count_cache_lookup
from demix.jobs.records import Job
from demix.jobs.result_cache import ResultCache, audio_digest, entry_file, entry_key
from demix.stems import ALL

from demix.separation import (JobStemSink, ModelSpec, SeparationOptions, StemLayout, batch_segments, is_roformer,
                              write_cached_stems)
from demix.worker.attempt import AttemptLease, WorkerContext

log = logging.getLogger(__name__)


def result_cache(context: WorkerContext) -> ResultCache:
    """The result cache over the context's Redis and storage, bounded by `DEMIX_CACHE_MB`."""
    return ResultCache.from_settings(context.jobs.redis, context.storage, context.settings)


def run_key(job: Job, context: WorkerContext, model: torch.nn.Module, spec: ModelSpec,
            options: SeparationOptions, input_path: Path, layout: StemLayout) -> tp.Optional[str]:
    """The entry key of the job's model run, or None when the run cannot use the cache: it
    is off (`DEMIX_CACHE_MB=0`), the job asked `cache=false`, or its stems are not at the
    input's rate and channels (an entry holds exactly those)."""
    if not result_cache(context).enabled or not job.use_cache:
        return None
    info = read_info(input_path)
    if layout.matrix is not None or layout.output.samplerate != info.samplerate or layout.channels != info.channels:
        return None
    fields: dict[str, tp.Any] = {
        "input": audio_digest(input_path),
        "model": spec.name,
        "weights": context.models.digest(spec),
        "precision": options.precision,
        # A GPU's kernels round differently from a CPU's; which GPU of a kind does not matter.
        "device": torch.device(options.device).type,
        "torch": torch.__version__,
        "demix": importlib.metadata.version("demix"),
    }
    if not is_roformer(model):
        # Demucs' segment plan: shifts (and their seed) and overlap change the estimate, and
        # segments batched into one forward may round differently. A RoFormer's windows come
        # from its config, which the weights digest covers. Not in the key: the output
        # format, stems choice and clip mode (an entry holds every source as float32, put on
        # the job's grid when served), the thread count and split length (the engine's
        # results do not depend on them).
        fields.update(shifts=options.shifts, seed=options.seed, overlap=options.overlap,
                      batch_segments=batch_segments(options.batch_segments, options.device))
    return entry_key(fields)


def serve_from_cache(job: Job, attempt: int, context: WorkerContext, lease: AttemptLease, key: str,
                     input_path: Path, layout: StemLayout) -> tp.Optional[list[str]]:
    """Write the job's stems from entry `key` and mark the job `cached`; returns their names,
    or None on a miss (no such entry, or it went while it was being copied: the job then
    runs the model)."""
    cache = result_cache(context)
    entry = cache.lookup(key, job.id)
    info = read_info(input_path)
    if entry is None or not set(layout.sources) <= set(entry.sources) \
            or (entry.samplerate, entry.channels, entry.frames) != (info.samplerate, info.channels, info.frames):
        log.info("job %s: result cache miss (%s)", job.id, key[:12])
        count_cache_lookup(context.jobs.redis, hit=False)
        return None
    try:
        with context.storage.cached_copies(key, [entry_file(source) for source in layout.sources]) as copies:
            lease.check()
            context.jobs.update_running(job.id, attempt, cached=True)
            files = {source: copies[entry_file(source)] for source in layout.sources}
            sink = JobStemSink(context.storage, job.id, layout.output, attempt)
            names = write_cached_stems(files, input_path, layout.names, sink, layout.output,
                                       progress=lease.report_progress)
    except FileNotFoundError as exc:
        if not _input_exists(context, job.id):
            raise  # the job itself is gone: the caller stops it
        log.warning("job %s: result cache entry %s went while read (%s); running the model", job.id, key[:12], exc)
        context.storage.clear_stems(job.id, attempt)
        context.jobs.update_running(job.id, attempt, cached=False)
        cache.drop(key)
        count_cache_lookup(context.jobs.redis, hit=False)
        return None
    log.info("job %s: stems from the result cache (%s), no model run", job.id, key[:12])
    count_cache_lookup(context.jobs.redis, hit=True)
    return names


def _input_exists(context: WorkerContext, job_id: str) -> bool:
    try:
        context.storage.stored_input(job_id).size()
        return True
    except FileNotFoundError:
        return False


def store_in_cache(job: Job, attempt: int, context: WorkerContext, key: tp.Optional[str],
                   model: torch.nn.Module, names: tp.Sequence[str], layout: StemLayout) -> None:
    """Keep the stems a run just wrote as entry `key`, when they are an entry's: every
    source of the model, as float32 WAV at the input's rate and channels (a workflow's
    model run; a plain job with `stems=all`, `format=wav`, `sample_format=float32`). A
    failure to store is logged: the job's own stems are unaffected."""
    output: OutputOptions = layout.output
    if key is None or job.stems != ALL or output.format != "wav" or output.sample_format != "float32" \
            or not set(model.sources) <= set(names):
        return
    files = {source: context.storage.stem(job.id, source, output.extension, attempt) for source in model.sources}
    try:
        result_cache(context).store(key, job.id, job.model, files, output.samplerate, layout.channels, layout.frames)
    except Exception:
        log.exception("job %s: its stems could not be stored in the result cache", job.id)
