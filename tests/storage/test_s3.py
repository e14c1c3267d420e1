"""The object-store backend against a real S3 server (SeaweedFS on 127.0.0.1): files
appear only complete, reads stream with ranges, a job's deletion leaves nothing of it
(unfinished multipart uploads included), a split runs over the bucket to the unsplit
stems, and a store that is down fails with `storage_unavailable`."""
from __future__ import annotations

import time
import typing as tp
from pathlib import Path

import boto3
import numpy as np
import pytest
from botocore.config import Config

from demix.errors import StorageUnavailable
from demix.storage.s3 import ObjectStorage, parse_location
from demix.audio.output_formats import resolve_output
from demix.audio.io import read_info
from demix.jobs.retention import sweep_abandoned_uploads, sweep_orphaned_job_folders
from demix.services import make_storage
from testkit.synthetic_audio import write_wav
from testkit.memory_sink import MemorySink
from tests.support.memory_sink import max_difference, unsplit_run
from demix.separation.engine import SeparationOptions, stem_layout
from demix.separation.split import merge_split, prepare_split, read_frames, run_part


def bucket_keys(storage: ObjectStorage) -> list[str]:
    """Every object key in the bucket, under any prefix."""
    listed = storage.client.list_objects_v2(Bucket=storage.bucket)
    return sorted(item["Key"] for item in listed.get("Contents", []))


def open_uploads(storage: ObjectStorage) -> list[str]:
    listed = storage.client.list_multipart_uploads(Bucket=storage.bucket)
    return [upload["Key"] for upload in listed.get("Uploads", []) or []]


@pytest.fixture
def storage(s3_settings) -> ObjectStorage:
    built = make_storage(s3_settings)
    assert isinstance(built, ObjectStorage)
    return built


def accept(storage: ObjectStorage, tmp_path: Path, job_id: str, seconds: float = 1.0, **kwargs: tp.Any) -> Path:
    """Stage a WAV as an upload and accept it as `job_id`'s input; returns a copy of it."""
    source = write_wav(tmp_path / f"{job_id}-source.wav", 44100, 2, seconds, **kwargs)
    with storage.open_upload() as upload:
        upload.write(source.read_bytes())
    storage.accept_upload(Path(upload.name), job_id)
    assert not Path(upload.name).exists()  # sent, not kept: the staging folder stays empty
    return source


def test_the_location_names_a_bucket_and_a_prefix():
    assert parse_location("s3://bucket/a/b/") == ("bucket", "a/b/")
    assert parse_location("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError, match="s3://BUCKET"):
        parse_location("/srv/demix")


def test_an_upload_becomes_the_input_and_a_stem_is_visible_only_once_committed(storage, tmp_path):
    source = accept(storage, tmp_path, "job-a", seconds=3.0)
    assert bucket_keys(storage) == ["tests/jobs/job-a/input.wav"]
    with storage.input_file("job-a") as local:
        assert local.read_bytes() == source.read_bytes()
        assert local.is_relative_to(storage.scratch_dir)
    assert not any(storage.scratch_dir.iterdir())  # scratch emptied after the use

    pending = storage.pending_stem("job-a", "drums", "wav", attempt=2)
    pending.temporary.write_bytes(bytes(range(256)) * 40000)  # > one multipart part
    stem = storage.stem("job-a", "drums", "wav", attempt=2)
    with pytest.raises(FileNotFoundError):
        stem.size()  # written, not committed: not there
    pending.commit()
    assert stem.size() == 256 * 40000
    assert b"".join(stem.read_range(1000, 300000)) == (bytes(range(256)) * 40000)[1000:300000]
    with stem.open() as file:
        file.seek(256 * 39999 + 10)
        assert file.read() == bytes(range(256))[10:]
    assert storage.attempts_stored("job-a") == [2]


def test_a_job_deleted_meanwhile_gets_no_new_files(storage, tmp_path):
    accept(storage, tmp_path, "job-b")
    storage.delete_job("job-b")
    with pytest.raises(FileNotFoundError):
        storage.pending_stem("job-b", "drums")
    with pytest.raises(FileNotFoundError):
        storage.begin_split("job-b", 1)
    with pytest.raises(FileNotFoundError):
        with storage.input_file("job-b"):
            pass


def test_deleting_a_job_removes_every_object_and_unfinished_upload(storage, tmp_path):
    accept(storage, tmp_path, "job-c")
    accept(storage, tmp_path, "job-keep")
    for attempt in (1, 2):
        pending = storage.pending_stem("job-c", "bass", "flac", attempt)
        pending.temporary.write_bytes(b"fLaC")
        pending.commit()
    storage.begin_split("job-c", 2).write_text("plan.json", "{}")
    storage.client.create_multipart_upload(Bucket=storage.bucket, Key="tests/jobs/job-c/stems-3/bass.flac")
    assert storage.attempts_stored("job-c") == [1, 2]

    storage.clear_other_attempts("job-c", keep=2)
    assert storage.attempts_stored("job-c") == [2]
    storage.delete_job("job-c")
    assert bucket_keys(storage) == ["tests/jobs/job-keep/input.wav"]
    assert open_uploads(storage) == []


def test_the_sweep_aborts_uploads_a_crash_left_and_orphaned_jobs_go(storage, store, tmp_path):
    storage.client.create_multipart_upload(Bucket=storage.bucket, Key="tests/jobs/crashed/input.wav")
    assert sweep_abandoned_uploads(storage, max_age_s=3600) == 0  # young: maybe still uploading
    assert sweep_abandoned_uploads(storage, max_age_s=0) == 1
    assert open_uploads(storage) == []

    accept(storage, tmp_path, "0" * 32)  # a job id with files but no record
    assert sweep_orphaned_job_folders(store, storage, now=time.time() + 7200) == ["0" * 32]
    assert bucket_keys(storage) == []


@pytest.fixture
def store(redis_client):
    from demix.jobs.records import JobStore
    return JobStore(redis_client)


def test_split_files_are_read_in_blocks_through_ranges(storage, tmp_path):
    accept(storage, tmp_path, "job-d")
    files = storage.begin_split("job-d", 1)
    rows = np.arange(3000 * 4, dtype=np.float32).reshape(3000, 4)
    pending = files.pending("part-0.sum.f32")
    pending.temporary.write_bytes(rows.tobytes())
    pending.commit()
    with files.open("part-0.sum.f32") as file:
        blocks = list(read_frames(file, 700, 2900, 4, block_frames=512))
    assert [len(block) for block in blocks] == [512, 512, 512, 512, 152]
    assert np.array_equal(np.concatenate(blocks), rows[700:2900])
    storage.clear_split("job-d", 1)
    assert bucket_keys(storage) == ["tests/jobs/job-d/input.wav"]


def test_a_split_run_through_the_bucket_equals_the_unsplit_run(storage, tmp_path):
    from demucs.apply import BagOfModels
    from testkit.tiny_models import make_tiny_htdemucs

    model = BagOfModels([make_tiny_htdemucs()], segment=1.0)
    accept(storage, tmp_path, "job-e", seconds=6.3, subtype="FLOAT")
    with storage.input_file("job-e") as path:
        output = resolve_output({"sample_format": "float32"}, read_info(path))
        layout = stem_layout(model, path, "all", output)
        plan = prepare_split(model, path, layout, 0.25, int(1.6 * 44100), storage.begin_split("job-e", 1))
        reference = unsplit_run(model, path, "all")
    assert len(plan.parts) == 4
    for index in reversed(range(len(plan.parts))):  # each part as if on another machine
        run_part(model, layout, plan, index, storage.split_files("job-e", 1), SeparationOptions())
    merged = MemorySink()
    with storage.input_file("job-e") as path:
        merge_split(model, path, layout, plan, storage.split_files("job-e", 1), merged)
    assert max_difference(merged, reference) < 1e-5


def test_a_store_that_stays_down_fails_with_storage_unavailable(storage, tmp_path):
    from testkit.s3_server import free_ports

    down = ObjectStorage(boto3.client("s3", endpoint_url=f"http://127.0.0.1:{free_ports(1)[0]}",
                                      config=Config(retries={"max_attempts": 2, "mode": "standard"},
                                                    connect_timeout=1)),
                         storage.bucket, storage.prefix, tmp_path / "down")
    with pytest.raises(StorageUnavailable) as failed:
        with down.input_file("job-f"):
            pass
    assert failed.value.code == "storage_unavailable" and "object store" in failed.value.message
    upload = tmp_path / "upload.wav"
    upload.write_bytes(b"RIFF")
    with pytest.raises(StorageUnavailable):
        down.accept_upload(upload, "job-f")
