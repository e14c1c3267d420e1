"""Retention: finished jobs and files nobody owns are deleted after a while.

Plain functions, run periodically by every worker (`DEMIX_SWEEP_INTERVAL_S`). Each is
safe to run in several workers at once: deleting what another worker just deleted is a
no-op, and nothing a live job needs is ever taken.
"""
from __future__ import annotations

import logging
import shutil
import time
import typing as tp
from datetime import datetime, timezone

from demix import redis_keys as keys
from demix.errors import JobNotFound
from demix.jobs.records import Job, JobStore, is_valid_job_id
from demix.jobs.lifecycle import delete_job
from demix.storage.local import ORPHAN_AGE_S, Storage

log = logging.getLogger(__name__)



def expiry_time(job: Job, retention_s: int) -> tp.Optional[float]:
    """When a job is deleted (Unix time), or None while it runs or when kept forever."""
    if not retention_s or not job.status.is_finished or job.finished_at is None:
        return None
    return job.finished_at + retention_s


def expires_at(job: Job, retention_s: int) -> tp.Optional[str]:
    """`expiry_time` as the API shows times (ISO 8601, UTC, milliseconds)."""
    when = expiry_time(job, retention_s)
    if when is None:
        return None
    return datetime.fromtimestamp(when, tz=timezone.utc).isoformat(timespec="milliseconds")


def sweep_expired_jobs(store: JobStore, storage: Storage, retention_s: int,
                       now: tp.Optional[float] = None) -> list[str]:
    """Delete every job that finished more than `retention_s` ago; returns their ids.

    Only jobs created before the cutoff can have finished before it, so the scan reads the
    creation index up to there, not every job. `delete_job` removes the record before the
    files: a crash in between leaves a folder without a record, which
    `sweep_orphaned_job_folders` removes, never a record without its files.
    """
    if retention_s <= 0:
        return []
    now = time.time() if now is None else now
    cutoff = now - retention_s
    deleted = []
    for raw_id in store.redis.zrangebyscore(keys.jobs_index_key(), "-inf", cutoff):
        job_id = raw_id.decode()
        try:
            job = store.get(job_id)
        except JobNotFound:  # a record deleted without its index entry
            store.delete(job_id)
            continue
        expiry = expiry_time(job, retention_s)
        if expiry is not None and expiry <= now:
            try:
                delete_job(store, storage, job_id)
            except JobNotFound:  # another worker's sweep deleted it first
                continue
            deleted.append(job_id)
    if deleted:
        log.info("retention: deleted %d job(s) finished more than %ds ago", len(deleted), retention_s)
    return deleted


def sweep_abandoned_uploads(storage: Storage, max_age_s: float = ORPHAN_AGE_S) -> int:
    """Abort multipart uploads into the object store that a crash left unfinished for
    `max_age_s` (a local folder has none); returns how many."""
    aborted = storage.sweep_abandoned_uploads(max_age_s)
    if aborted:
        log.info("retention: aborted %d unfinished object upload(s)", aborted)
    return aborted


def sweep_dead_scratch(storage: Storage) -> list[str]:
    """Remove the local scratch folders of this machine's processes that are gone (a worker
    killed mid-attempt leaves its job's input and the files it was writing); returns their
    names. A live process's folder is never taken: it empties its own after each attempt."""
    removed = storage.sweep_dead_scratch()
    if removed:
        log.info("retention: removed the scratch folder(s) of %d process(es) that are gone: %s",
                 len(removed), ", ".join(removed))
    return removed


def sweep_orphaned_job_folders(store: JobStore, storage: Storage, now: tp.Optional[float] = None,
                               max_age_s: float = ORPHAN_AGE_S) -> list[str]:
    """Delete job folders that have no job record and were untouched for `max_age_s`;
    returns their job ids.

    The API moves an upload into its job's folder a moment before it writes the job's
    record, so a young folder without a record may be a submit in progress: only folders
    idle for `max_age_s` are taken (left by a crash between the move and the record, or
    between deleting a record and its files).
    """
    now = time.time() if now is None else now
    removed = []
    for job_id, last_modified in storage.stored_jobs():
        if not is_valid_job_id(job_id) or store.redis.exists(keys.job_key(job_id)):
            continue
        if now - last_modified < max_age_s:
            continue
        # Checked again just before deleting: the record must still be absent.
        if store.redis.exists(keys.job_key(job_id)):
            continue
        storage.delete_job(job_id)
        removed.append(job_id)
    if removed:
        log.info("retention: deleted %d job folder(s) without a job record", len(removed))
    return removed

