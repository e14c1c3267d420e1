"""The result cache's keys and index, over a real Redis and both storages (a local folder and a
real S3 bucket): entries stored whole, least recently used ones evicted past the bound, a
reader's copies surviving an eviction, and an entry deleted with the last job using it
(deleted by the user or by retention)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from demix import redis_keys as keys
from demix.jobs.lifecycle import delete_job
from demix.jobs.records import Job, JobStatus, JobStore, new_job_id
from demix.jobs.result_cache import ResultCache, audio_digest, entry_file, entry_key, sweep_orphaned_entries
from demix.jobs.retention import sweep_expired_jobs
from demix.services import make_storage
from demix.storage.local import JobStorage
from testkit.synthetic_audio import music_like, write_wav

SOURCES = ["drums", "bass", "other", "vocals"]


@pytest.fixture
def jobs(redis_client) -> JobStore:
    for key in redis_client.scan_iter(f"{keys.PREFIX}:cache:*"):  # this process's Redis: no other test's entries
        redis_client.delete(key)
    return JobStore(redis_client)


def finished_job(jobs: JobStore, storage, tmp_path: Path, seconds: float = 0.5, seed: int = 0) -> str:
    """A succeeded job whose attempt-1 stems are float32 WAVs of `seconds` each."""
    job_id = new_job_id()
    storage.incoming_dir.mkdir(parents=True, exist_ok=True)
    storage.accept_upload(write_wav(storage.incoming_dir / "in.wav", 44100, 2, seconds, seed=seed), job_id)
    for index, source in enumerate(SOURCES):
        pending = storage.pending_stem(job_id, source, "wav", 1)
        sf.write(str(pending.temporary), music_like(44100, 2, seconds, seed=seed + index), 44100,
                 subtype="FLOAT", format="WAV")
        pending.commit()
    jobs.create(Job(id=job_id, status=JobStatus.SUCCEEDED, stems="all", model="tiny", samplerate=44100, channels=2,
                    frames=int(44100 * seconds), created_at=time.time(), finished_at=time.time(), attempts=1))
    return job_id


def store(cache: ResultCache, job_id: str, key: str):
    files = {source: cache.storage.stem(job_id, source, "wav", 1) for source in SOURCES}
    return cache.store(key, job_id, "tiny", files, 44100, 2, 22050)


def test_the_input_digest_is_of_the_samples_not_the_file(tmp_path):
    wav = write_wav(tmp_path / "a.wav", 44100, 2, 0.5)
    flac = tmp_path / "a.flac"
    sf.write(str(flac), sf.read(str(wav), dtype="int16")[0], 44100, subtype="PCM_16", format="FLAC")
    assert wav.read_bytes() != flac.read_bytes()
    assert np.array_equal(sf.read(str(wav))[0], sf.read(str(flac))[0])
    assert audio_digest(wav) == audio_digest(flac)
    assert audio_digest(write_wav(tmp_path / "b.wav", 44100, 2, 0.5, seed=1)) != audio_digest(wav)
    assert audio_digest(write_wav(tmp_path / "c.wav", 48000, 2, 0.5)) != audio_digest(wav)


def test_every_field_is_in_the_key():
    fields = {"input": "a" * 64, "model": "htdemucs", "weights": "b" * 64, "precision": "fp32", "device": "cpu",
              "shifts": 0, "overlap": 0.25}
    assert entry_key(fields) == entry_key(dict(reversed(fields.items())))
    for name, other in [("input", "c" * 64), ("weights", "d" * 64), ("precision", "bf16"), ("device", "cuda"),
                        ("shifts", 1), ("overlap", 0.5), ("model", "htdemucs_ft")]:
        assert entry_key({**fields, name: other}) != entry_key(fields), name


@pytest.mark.parametrize("backend", ["folder", "bucket"])
def test_an_entry_is_stored_looked_up_and_read_from_its_own_copies(backend, jobs, settings, tmp_path, request):
    storage = JobStorage(tmp_path / "data") if backend == "folder" else make_storage(request.getfixturevalue(
        "s3_settings"))
    cache = ResultCache(jobs.redis, storage, 64 << 20)
    job_id = finished_job(jobs, storage, tmp_path)
    assert cache.lookup("k" * 64, job_id) is None
    entry = store(cache, job_id, "k" * 64)
    assert entry.sources == SOURCES and entry.size > 4 * 22050 * 2 * 4
    user = finished_job(jobs, storage, tmp_path, seed=7)
    assert cache.lookup("k" * 64, user) == entry
    assert jobs.redis.smembers(keys.cache_entry_jobs_key("k" * 64)) == {job_id.encode(), user.encode()}
    names = [entry_file(source) for source in SOURCES]
    with storage.cached_copies("k" * 64, names) as copies:
        # Evicted while its copies are read: the copies stay whole.
        assert cache.drop("k" * 64)
        assert cache.lookup("k" * 64, user) is None
        with storage.stem(job_id, "vocals", "wav", 1).open() as original:
            assert copies["vocals.wav"].read_bytes() == original.read()
    with pytest.raises(FileNotFoundError):
        with storage.cached_copies("k" * 64, names):
            pass


def test_least_recently_used_entries_are_evicted_past_the_bound(jobs, tmp_path):
    storage = JobStorage(tmp_path / "data")
    job_ids = [finished_job(jobs, storage, tmp_path, seed=seed) for seed in range(4)]
    size = store(ResultCache(jobs.redis, storage, 64 << 20), job_ids[0], "0" * 64).size
    cache = ResultCache(jobs.redis, storage, 3 * size)  # room for three entries
    for index in (1, 2):
        store(cache, job_ids[index], str(index) * 64)
    assert cache.lookup("0" * 64, job_ids[3])  # now the most recently used
    store(cache, job_ids[3], "3" * 64)
    assert cache.entries() == ["2" * 64, "0" * 64, "3" * 64]  # 1 was the least recently used
    assert cache.total_bytes() == 3 * size <= cache.limit_bytes
    assert sorted(path.name for path in (storage.root / "cache").iterdir()) == sorted(cache.entries())
    # Larger than the whole cache: not stored.
    assert store(ResultCache(jobs.redis, storage, size - 1), job_ids[1], "9" * 64) is None
    assert not (storage.root / "cache" / ("9" * 64)).exists()


def test_an_entry_goes_with_the_last_job_using_it(jobs, tmp_path):
    storage = JobStorage(tmp_path / "data")
    cache = ResultCache(jobs.redis, storage, 64 << 20)
    first, second = finished_job(jobs, storage, tmp_path), finished_job(jobs, storage, tmp_path, seed=1)
    store(cache, first, "e" * 64)
    cache.lookup("e" * 64, second)
    delete_job(jobs, storage, first)  # the user's DELETE
    assert cache.entries() == ["e" * 64] and (storage.root / "cache" / ("e" * 64)).is_dir()
    # Retention deletes the other one: nothing of the song stays.
    # (Created and finished long ago: the sweep looks at no other test's jobs.)
    jobs.redis.zadd(keys.jobs_index_key(), {second: 1000.0})
    jobs.redis.hset(keys.job_key(second), "finished_at", "1001.0")
    assert sweep_expired_jobs(jobs, storage, retention_s=3600, now=1001.0 + 3600) == [second]
    assert cache.entries() == [] and not (storage.root / "cache" / ("e" * 64)).exists()
    assert not jobs.redis.exists(keys.job_cache_entries_key(second), keys.cache_entry_key("e" * 64))


def test_an_entry_of_a_job_deleted_while_it_ran_is_not_kept(jobs, tmp_path):
    storage = JobStorage(tmp_path / "data")
    cache = ResultCache(jobs.redis, storage, 64 << 20)
    job_id = finished_job(jobs, storage, tmp_path)
    jobs.delete(job_id)  # the record went while the run stored its stems
    assert store(cache, job_id, "f" * 64) is None
    assert cache.entries() == [] and not (storage.root / "cache" / ("f" * 64)).exists()


@pytest.mark.parametrize("backend", ["folder", "bucket"])
def test_entry_files_the_index_does_not_name_are_swept_once_old(backend, jobs, tmp_path, request):
    storage = JobStorage(tmp_path / "data") if backend == "folder" else make_storage(request.getfixturevalue(
        "s3_settings"))
    cache = ResultCache(jobs.redis, storage, 64 << 20)
    job_id = finished_job(jobs, storage, tmp_path)
    store(cache, job_id, "a" * 64)
    # Files of an entry never recorded: its process was killed between storing and recording it.
    storage.store_cache_entry("b" * 64, {"vocals.wav": storage.stem(job_id, "vocals", "wav", 1)})
    assert sorted(entry for entry, _ in storage.stored_cache_entries()) == ["a" * 64, "b" * 64]
    assert sweep_orphaned_entries(jobs.redis, storage) == []  # young: it may be being recorded
    assert sweep_orphaned_entries(jobs.redis, storage, now=time.time() + 7200) == ["b" * 64]
    assert [entry for entry, _ in storage.stored_cache_entries()] == ["a" * 64]


def test_a_cache_of_zero_bytes_is_off(jobs, settings):
    storage = JobStorage(Path("/nonexistent"))
    assert not ResultCache.from_settings(jobs.redis, storage, dataclasses.replace(settings, cache_mb=0)).enabled
    assert ResultCache.from_settings(jobs.redis, storage, dataclasses.replace(settings, cache_mb=1)).limit_bytes \
        == 1 << 20
