"""Model runs through the result cache, in this process with the worker's own code (`run_job`):
a cached run does no forward pass and gives exactly the stems a real run gives, for the same
job again, for `X` + `no_X` in PCM after a four-stem run, and for a workflow run again; a
job with `cache=false` neither reads nor writes it; an entry gone mid-read means running
the model; deleting the jobs deletes their entries.
"""
from __future__ import annotations

import dataclasses
import io
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from demix import redis_keys as keys
from demix.audio.io import read_info
from demix.audio.output_formats import resolve_output
from demix.jobs.lifecycle import delete_job
from demix.jobs.records import Job, JobStatus, new_job_id
from demix.jobs.result_cache import ResultCache
from demix.storage.local import JobStorage
from demix.worker.attempt import WorkerContext, job_model_spec
from demix.worker.runner import run_job
from testkit.synthetic_audio import write_wav
from testkit.tiny_models import TINY_MODEL
from tests.support.workflows import run_workflow, worker_context

pytestmark = pytest.mark.slow

WORKFLOW = {"steps": [{"name": "a", "models": [TINY_MODEL]},
                      {"name": "b", "input": "a/no_vocals", "models": [TINY_MODEL]}],
            "outputs": {"vocals": "a/vocals", "drums": "b/drums", "rest": "b/no_drums"}}


class ForwardCounter:
    """Counts the forward passes of the HT-Demucs networks in the context's loaded model."""

    def __init__(self, context: WorkerContext):
        from demucs.htdemucs import HTDemucs

        self.calls = 0
        model = context.models.get(job_model_spec(Job("x" * 32, JobStatus.QUEUED, "all", TINY_MODEL, 0, 0, 0, 0.0),
                                                  context.settings, "cpu"))
        for module in model.modules():
            if isinstance(module, HTDemucs):
                module.register_forward_hook(self._count)

    def _count(self, *_args) -> None:
        self.calls += 1

    def taken(self) -> int:
        """Forward passes since the last call."""
        calls, self.calls = self.calls, 0
        return calls


@pytest.fixture
def context(settings, redis_client, tiny_model_repo, tmp_path) -> WorkerContext:
    for key in redis_client.scan_iter(f"{keys.PREFIX}:cache:*"):  # this process's Redis: no other test's entries
        redis_client.delete(key)
    return worker_context(dataclasses.replace(settings, cache_mb=64, split_s=0), redis_client,
                          JobStorage(tmp_path / "data"))


def plain_job(context: WorkerContext, mix: Path, stems: str = "all", cache: bool = True, **form: str) -> str:
    job_id = new_job_id()
    context.storage.incoming_dir.mkdir(parents=True, exist_ok=True)
    upload = context.storage.incoming_dir / "upload.wav"
    upload.write_bytes(mix.read_bytes())
    info = read_info(upload)
    context.storage.accept_upload(upload, job_id)
    context.jobs.create(Job(id=job_id, status=JobStatus.QUEUED, stems=stems, model=TINY_MODEL,
                            samplerate=info.samplerate, channels=info.channels, frames=info.frames,
                            created_at=time.time(), output=resolve_output(form, info).to_dict(), use_cache=cache))
    run_job(job_id, context)
    return job_id


def workflow_job(context: WorkerContext, mix: Path, cache: bool = True) -> str:
    return run_workflow(context, mix, WORKFLOW, cache=cache)


def stems(context: WorkerContext, job_id: str) -> dict[str, np.ndarray]:
    job = context.jobs.get(job_id)
    assert job.status is JobStatus.SUCCEEDED, job.error
    extension = job.output["format"]
    found = {}
    for name in job.outputs:
        with context.storage.stem(job_id, name, extension, job.attempts).open() as stream:
            found[name] = sf.read(io.BytesIO(stream.read()), dtype="int32" if "pcm" in job.output["sample_format"]
                                  else "float32")[0]
    return found


def same_stems(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(np.array_equal(first[name], second[name]) for name in first)


def test_a_plain_job_again_is_served_from_the_cache_without_a_forward_pass(context, tmp_path):
    mix = write_wav(tmp_path / "mix.wav", 44100, 2, 2.0)
    counter = ForwardCounter(context)
    started = time.monotonic()
    first = plain_job(context, mix, sample_format="float32")
    uncached_s = time.monotonic() - started
    assert counter.taken() > 0 and not context.jobs.get(first).cached
    started = time.monotonic()
    second = plain_job(context, mix, sample_format="float32")
    cached_s = time.monotonic() - started
    assert counter.taken() == 0
    job = context.jobs.get(second)
    assert job.cached and job.to_public()["cached"] is True
    assert same_stems(stems(context, first), stems(context, second))
    started = time.monotonic()
    plain_job(context, mix, cache=False, sample_format="float32")  # the model warm, its digest known
    uncached_warm_s = time.monotonic() - started
    assert counter.taken() > 0
    print(f"2 s of audio: first run {uncached_s:.3f}s, cached {cached_s:.3f}s, uncached again {uncached_warm_s:.3f}s")


def test_vocals_and_no_vocals_in_pcm16_come_from_a_four_stem_run(context, tmp_path):
    mix = write_wav(tmp_path / "mix.wav", 44100, 2, 2.0)
    counter = ForwardCounter(context)
    plain_job(context, mix, sample_format="float32")  # stores every source
    assert counter.taken() > 0
    cached = plain_job(context, mix, stems="vocals", sample_format="pcm16")
    assert counter.taken() == 0 and context.jobs.get(cached).cached
    real = plain_job(context, mix, stems="vocals", cache=False, sample_format="pcm16")
    assert counter.taken() > 0 and not context.jobs.get(real).cached
    got = stems(context, cached)
    assert set(got) == {"vocals", "no_vocals"} and same_stems(got, stems(context, real))


def test_the_same_song_in_another_encoding_is_served_from_the_cache(context, tmp_path):
    mix = write_wav(tmp_path / "mix.wav", 44100, 2, 1.0)
    counter = ForwardCounter(context)
    plain_job(context, mix, sample_format="float32")
    assert counter.taken() > 0
    # Other bytes (float WAV, not 16-bit PCM), the same decoded samples: the cache keys on those.
    float_copy = tmp_path / "float.wav"
    sf.write(str(float_copy), sf.read(str(mix), dtype="float32")[0], 44100, subtype="FLOAT")
    assert float_copy.read_bytes() != mix.read_bytes()
    assert context.jobs.get(plain_job(context, float_copy, sample_format="float32")).cached
    assert counter.taken() == 0


def test_a_workflow_again_runs_no_model_and_gives_the_same_stems(context, tmp_path):
    mix = write_wav(tmp_path / "mix.wav", 44100, 2, 2.0, subtype="FLOAT")
    counter = ForwardCounter(context)
    first = workflow_job(context, mix)
    assert counter.taken() > 0
    second = workflow_job(context, mix)
    assert counter.taken() == 0
    assert same_stems(stems(context, first), stems(context, second))
    runs = [context.jobs.get(child) for child in context.jobs.children(second)]
    assert [run.cached for run in runs if run.workflow_unit["kind"] == "model"] == [True, True]
    # A plain job with the first step's model on the same song: served from the workflow's entry.
    assert context.jobs.get(plain_job(context, mix, sample_format="float32")).cached
    assert counter.taken() == 0


def test_a_workflow_again_over_a_bucket_runs_no_model(context, s3_settings, tmp_path):
    bucket = worker_context(dataclasses.replace(s3_settings, cache_mb=64, split_s=0), context.jobs.redis)
    mix = write_wav(tmp_path / "mix.wav", 44100, 2, 1.5, subtype="FLOAT")
    counter = ForwardCounter(bucket)
    first = workflow_job(bucket, mix)
    assert counter.taken() > 0
    cache = ResultCache.from_settings(bucket.jobs.redis, bucket.storage, bucket.settings)
    assert len(cache.entries()) == 2 and all(list(bucket.storage.list_keys(f"cache/{key}/")) for key in cache.entries())
    second = workflow_job(bucket, mix)
    assert counter.taken() == 0
    assert same_stems(stems(bucket, first), stems(bucket, second))
    for job_id in (first, second):
        delete_job(bucket.jobs, bucket.storage, job_id)
    assert cache.entries() == [] and list(bucket.storage.list_keys("cache/")) == []
    assert list(bucket.storage.scratch_root.iterdir()) == []


def test_a_job_with_cache_false_neither_reads_nor_writes_the_cache(context, tmp_path):
    mix = write_wav(tmp_path / "mix.wav", 44100, 2, 1.0)
    counter = ForwardCounter(context)
    plain_job(context, mix, cache=False, sample_format="float32")
    assert ResultCache.from_settings(context.jobs.redis, context.storage, context.settings).entries() == []
    plain_job(context, mix, sample_format="float32")
    assert counter.taken() > 0
    workflow_job(context, mix, cache=False)
    assert counter.taken() > 0
    again = plain_job(context, mix, cache=False, sample_format="float32")
    assert counter.taken() > 0 and not context.jobs.get(again).cached


def test_an_entry_gone_before_it_is_read_means_running_the_model(context, tmp_path):
    mix = write_wav(tmp_path / "mix.wav", 44100, 2, 1.0)
    counter = ForwardCounter(context)
    first = plain_job(context, mix, sample_format="float32")
    counter.taken()
    cache = ResultCache.from_settings(context.jobs.redis, context.storage, context.settings)
    [key] = cache.entries()
    context.storage.delete_cache_entry(key)  # its files gone under the index (evicted by another process)
    second = plain_job(context, mix, sample_format="float32")
    assert counter.taken() > 0
    job = context.jobs.get(second)
    assert job.status is JobStatus.SUCCEEDED and not job.cached
    assert same_stems(stems(context, first), stems(context, second))
    assert cache.entries() == [key] and (context.storage.cache_dir(key) / "vocals.wav").exists()  # stored again


def test_deleting_every_job_of_a_song_deletes_its_entries(context, tmp_path):
    mix = write_wav(tmp_path / "mix.wav", 44100, 2, 1.0, subtype="FLOAT")
    cache = ResultCache.from_settings(context.jobs.redis, context.storage, context.settings)
    workflow = workflow_job(context, mix)
    plain = plain_job(context, mix, sample_format="float32")
    assert context.jobs.get(plain).cached
    assert len(cache.entries()) == 2  # the song, and step a's no_vocals that step b ran on
    delete_job(context.jobs, context.storage, workflow)
    # The plain job still uses the song's entry; step b's input is nobody's any more.
    [kept] = cache.entries()
    assert sorted(path.name for path in (context.storage.root / "cache").iterdir()) == [kept]
    delete_job(context.jobs, context.storage, plain)
    assert cache.entries() == [] and cache.total_bytes() == 0
    assert list((context.storage.root / "cache").iterdir()) == []
