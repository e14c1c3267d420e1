"""The job JSON: what `GET /v1/jobs/<id>` answers and what a webhook POSTs, built in one place.

The record's own fields (`Job.to_public`), when it will be deleted (`expires_at`), where it
stands (`queue_position`, `eta_s`) and its links, all under the job's own URL.
"""
from __future__ import annotations

import dataclasses
import typing as tp

from demix.jobs.estimates import eta_seconds
from demix.jobs.records import Job, JobStatus
from demix.audio.output_formats import OutputOptions
from demix.jobs.retention import expires_at


def job_json(job: Job, url: str, *, retention_s: int, queue_position: tp.Optional[int],
             now: float, model_served: tp.Optional[bool] = None,
             workflow: tp.Optional[tp.Mapping[str, tp.Any]] = None) -> dict:
    """The public view of `job`, whose own URL (`GET /v1/jobs/<id>`) is `url`.

    `queue_position` is the job's place in its queue (None when it is not queued); `now`
    is the time its `eta_s` is estimated at; `model_served` whether a warm worker serves
    the job's model (None: not asked, as for a finished job). A workflow job's `workflow`
    is its steps' view (`demix.workflows.runs.workflow_progress`), its progress the job's.
    """
    if workflow is not None:
        job = dataclasses.replace(job, progress=workflow["progress"], download=workflow["download"] or job.download)
    body = job.to_public()
    if workflow is not None:
        body["workflow"] = {"steps": workflow["steps"], "outputs": workflow["outputs"]}
    body["expires_at"] = expires_at(job, retention_s)
    body["queue_position"] = queue_position
    body["waiting_for"] = waiting_for(job, model_served)
    body["eta_s"] = eta_seconds(job, now)
    body["url"] = url
    if job.status is JobStatus.SUCCEEDED:
        extension = OutputOptions.from_dict(job.output).extension
        body["outputs"] = {name: f"{url}/stems/{name}.{extension}" for name in job.outputs}
        body["result_url"] = f"{url}/result"
        body["zip_url"] = f"{url}/stems.zip"
    else:
        body["outputs"] = None
    return body


def waiting_for(job: Job, model_served: tp.Optional[bool]) -> tp.Optional[str]:
    """Why a queued job cannot start yet, when it is known: no worker serves its model."""
    if job.status is not JobStatus.QUEUED or model_served is not False:
        return None
    return (f"no worker serves model {job.model!r} yet; the job waits in queue {job.queue!r} "
            f"until one does (`demix worker --models {job.model}`)")
