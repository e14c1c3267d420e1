"""Turning an accepted upload into a queued job."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from shared.audio import AudioInfo
from shared.celery_app import SEPARATE_TASK
from shared.errors import ServiceUnavailable
from shared.jobs import Job, JobStatus, new_job_id
from shared.output import OutputOptions

log = logging.getLogger(__name__)


def submit_job(upload: Path, info: AudioInfo, stems: str, output: OutputOptions, services) -> Job:
    """Store the upload as a new job's input, record the job and enqueue it.

    Either all three happen or none: if the record or the message cannot be written,
    the job's files and record are removed again and the caller gets a 503.

    Raises:
        ServiceUnavailable: Redis or the broker is unreachable.
    """
    job = Job(id=new_job_id(), status=JobStatus.QUEUED, stems=stems, model=services.settings.model,
              samplerate=info.samplerate, channels=info.channels, frames=info.frames,
              created_at=time.time(), input_format=f"{info.container}/{info.subtype}",
              output=output.to_dict())
    upload_bytes = upload.stat().st_size
    services.storage.accept_upload(upload, job.id)
    try:
        services.jobs.create(job, upload_bytes=upload_bytes)
        # Only the id travels through the broker; the audio stays in storage.
        services.celery.send_task(SEPARATE_TASK, args=[job.id], task_id=job.id,
                                  queue=services.settings.queue)
    except Exception as exc:
        log.error("could not enqueue job %s: %s", job.id, exc)
        _roll_back(job.id, services)
        raise ServiceUnavailable("the job queue (Redis) is unreachable; the upload was not kept, "
                                 "try again shortly") from exc
    log.info("queued job %s (%s, %.1fs, %d Hz, %d ch)", job.id, stems, job.duration,
             job.samplerate, job.channels)
    return job


def _roll_back(job_id: str, services) -> None:
    services.storage.delete_job(job_id)
    try:
        services.jobs.delete(job_id)
    except Exception:  # the store is what failed; nothing more to undo there
        pass
