"""A workflow run whole in this process by the worker's own code (`demix.worker.runner.run_job`,
which hands its units to `demix.worker.workflow_units`, for every unit it sends, in order), over a local folder and over a real S3 bucket: the same stems either way,
the runs' intermediate files gone once the job succeeded, nothing left in scratch.

(Real worker processes, kills and cancels: tests/workflows/test_workflow_jobs.py.)
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import soundfile as sf

from demix.jobs.records import JobStatus
from demix.worker.attempt import WorkerContext
from demix.workflows.runs import unit_id
from testkit.synthetic_audio import write_wav
from testkit.tiny_models import TINY_MODEL, write_tiny_repo
from tests.support.workflows import run_workflow, worker_context

pytestmark = pytest.mark.slow

SECOND = "tiny_seed1"

WORKFLOW = {"steps": [{"name": "a", "models": [TINY_MODEL, SECOND], "ensemble": "max_fft"},
                      {"name": "b", "input": "a/no_vocals", "models": [TINY_MODEL]}],
            "outputs": {"vocals": "a/vocals", "drums": "b/drums", "rest": "b/no_drums"}}


def stems(context: WorkerContext, job_id: str) -> dict[str, np.ndarray]:
    job = context.jobs.get(job_id)
    assert job.status is JobStatus.SUCCEEDED, job.error
    found = {}
    for name in job.outputs:
        with context.storage.stem(job_id, name, "wav", job.attempts).open() as stream:
            found[name] = sf.read(io.BytesIO(stream.read()), dtype="float32")[0]
    return found


@pytest.fixture(scope="module")
def second_model(tiny_model_repo) -> str:
    write_tiny_repo(tiny_model_repo, SECOND, seed=1)
    return SECOND


def test_a_workflow_gives_the_same_stems_from_a_bucket_as_from_a_folder(
        second_model, s3_settings, settings, redis_client, tmp_path):
    mix = write_wav(tmp_path / "mix.wav", 44100, 2, 2.5, subtype="FLOAT")
    served = dict(models=f"{TINY_MODEL},{second_model}", split_s=0)
    local = worker_context(dataclasses.replace(settings, data_dir=tmp_path / "folder", **served), redis_client)
    bucket = worker_context(dataclasses.replace(s3_settings, **served), redis_client)

    from_folder = stems(local, run_workflow(local, mix, WORKFLOW))
    job_id = run_workflow(bucket, mix, WORKFLOW)
    from_bucket = stems(bucket, job_id)
    assert set(from_folder) == {"vocals", "drums", "rest"}
    for name in from_folder:
        assert np.array_equal(from_folder[name], from_bucket[name]), name

    # The runs' stems were steps on the way: only the job's own files stay.
    runs = bucket.jobs.children(job_id)
    assert len(runs) == 6  # a's two runs and its ensemble, b's run and its complement, the outputs
    assert [key for run in runs for key in bucket.storage.list_keys(f"jobs/{run}")] == []
    assert list(bucket.storage.scratch_root.iterdir()) == []
    # The chained run read its input from the bucket as its own (a server-side copy).
    assert bucket.jobs.get(unit_id(job_id, f"b/{TINY_MODEL}")).status is JobStatus.SUCCEEDED
