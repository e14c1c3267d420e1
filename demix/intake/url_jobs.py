"""A `url` job's first step in its worker: fetch the input, run the intake checks an
upload gets, and record what it is, before separation starts.

It runs inside the job's attempt, so a worker lost mid-fetch is noticed and the job is
run again like any other (fetching again), and a cancel stops the fetch."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from demix.intake.inspection import inspect_upload
from demix.jobs.records import Job
from demix.audio.output_formats import resolve_output
from demix.intake.uploads import ensure_room_for_upload
from demix.intake.url_fetch import fetch_url

log = logging.getLogger(__name__)

DOWNLOAD_WRITE_INTERVAL_S = 0.5
"""Least time between two writes of a fetch's progress to the job record."""


def fetch_input(job: Job, context, lease) -> Job:
    """Fetch `job.source_url` into the job's input and record its facts (rate, channels,
    length, format, resolved output options); returns the updated running job.

    Raises:
        DemixError: the fetch or the intake checks failed (the job fails with its code).
        JobInterrupted: the job was cancelled or deleted, or its worker stops.
    """
    storage, settings, attempt = context.storage, context.settings, job.attempts
    ensure_room_for_upload(context)
    last_write = [-float("inf")]
    last_confirm = [-float("inf")]

    def progress(received: int, total: int | None) -> None:
        lease.check()
        now = time.monotonic()
        if now - last_write[0] >= DOWNLOAD_WRITE_INTERVAL_S or (total is not None and received >= total):
            last_write[0] = now
            context.jobs.update_running(job.id, attempt,
                                        download={"received_bytes": received, "total_bytes": total})

    def check_interrupted() -> None:
        # Asked while the server sends nothing too: a write is what learns of a cancel, so
        # renew the lease when no progress was written lately.
        lease.check()
        now = time.monotonic()
        if now - max(last_write[0], last_confirm[0]) >= DOWNLOAD_WRITE_INTERVAL_S:
            last_confirm[0] = now
            lease.confirm()

    started = time.monotonic()
    with storage.open_upload() as file:
        path = Path(file.name)
    try:
        with path.open("wb") as file:
            received = fetch_url(job.source_url, file, settings, progress, check_interrupted)
        lease.confirm()
        info = inspect_upload(path, settings)
        # The model and stems were checked at submission; what the input decides is the output.
        output = resolve_output(job.request_fields, info)
        storage.accept_upload(path, job.id)
    finally:
        path.unlink(missing_ok=True)  # already moved into the job's folder when accepted
    log.info("job %s: fetched %d bytes in %.1fs (%.1fs of audio)", job.id, received,
             time.monotonic() - started, info.duration)
    return context.jobs.update_running(
        job.id, attempt, samplerate=info.samplerate, channels=info.channels, frames=info.frames,
        input_format=info.input_format, output=output.to_dict(),
        download={"received_bytes": received, "total_bytes": received})
