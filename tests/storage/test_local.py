"""The local-folder storage backend (`demix.storage.local.JobStorage`) and the key layout both
backends share: files visible only once complete, one folder per attempt, a deleted job
never recreated by a late writer, deletion that outlasts a writer, and disk-full errors
recognised wherever they were raised from.

The S3 backend runs the same contract in tests/storage/test_s3.py."""
from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import pytest

from demix.storage import local as storage_module
from demix.atomic_files import is_temporary
from demix.errors import DiskFull
from demix.storage.local import JobStorage, attempt_of, disk_full_error, is_disk_full, split_key, stem_key, stems_key


@pytest.fixture
def storage(tmp_path) -> JobStorage:
    return JobStorage(tmp_path / "data")


def accepted(storage: JobStorage, job_id: str, content: bytes = b"RIFF-mix") -> Path:
    """Stage `content` as an upload and accept it as `job_id`'s input."""
    with storage.open_upload() as upload:
        upload.write(content)
    storage.accept_upload(Path(upload.name), job_id)
    return Path(upload.name)


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def test_keys_name_each_attempt_and_attempt_0_is_the_folder_from_before_attempts():
    assert stems_key("j", 0) == "jobs/j/stems"
    assert stems_key("j", 3) == "jobs/j/stems-3"
    assert stem_key("j", "vocals", "flac", attempt=2) == "jobs/j/stems-2/vocals.flac"
    assert split_key("j", 1) == "jobs/j/split-1"
    assert [attempt_of(name) for name in ("stems", "stems-3", "split-12", "input.wav", "stems-x",
                                          "split", "split-", "other-4")] == \
        [("stems", 0), ("stems", 3), ("split", 12), None, None, None, None, None]


def test_an_accepted_upload_leaves_the_staging_folder_and_becomes_the_input(storage):
    staged = accepted(storage, "job1", b"the mix")
    assert not staged.exists() and list(storage.incoming_dir.iterdir()) == []
    with storage.input_file("job1") as path:
        assert path.read_bytes() == b"the mix"


def test_a_job_without_input_raises_file_not_found(storage):
    with pytest.raises(FileNotFoundError):
        with storage.input_file("never-submitted"):
            pass


def test_a_stem_is_visible_under_its_name_only_once_committed(storage):
    accepted(storage, "job1")
    pending = storage.pending_stem("job1", "vocals", "flac", attempt=1)
    pending.temporary.write_bytes(b"0123456789")
    assert is_temporary(pending.temporary)
    with pytest.raises(FileNotFoundError):
        storage.stem("job1", "vocals", "flac", attempt=1).size()
    pending.commit()
    stem = storage.stem("job1", "vocals", "flac", attempt=1)
    assert stem.name == "vocals.flac" and stem.size() == 10
    assert stem.local_path == storage.root / "jobs/job1/stems-1/vocals.flac"
    assert files_under(storage.stems_dir("job1", 1)) == ["vocals.flac"]  # no temporary left
    assert list(stem.read_range(2, 9, chunk_bytes=3)) == [b"234", b"567", b"8"]
    assert list(stem.read_range(8, 100)) == [b"89"]  # past the end: what there is
    assert stem.presigned_url("vocals.flac", "audio/flac") is None


def test_a_job_deleted_meanwhile_is_never_recreated_by_its_late_run(storage):
    accepted(storage, "job1")
    storage.delete_job("job1")
    with pytest.raises(FileNotFoundError):
        storage.pending_stem("job1", "vocals", attempt=1)
    with pytest.raises(FileNotFoundError):
        storage.begin_split("job1", 1)
    assert not storage.job_dir("job1").exists()


def test_split_files_are_published_whole_and_a_failed_write_leaves_nothing(storage):
    accepted(storage, "job1")
    files = storage.begin_split("job1", 2)
    files.write_text("plan.json", '{"parts": 3}')
    assert storage.split_files("job1", 2).read_text("plan.json") == '{"parts": 3}'
    with pytest.raises(UnicodeEncodeError):  # fails mid-write: the temporary is discarded
        files.write_text("part-1.json", "\udcff")
    assert files_under(storage.split_dir("job1", 2)) == ["plan.json"]
    with pytest.raises(FileNotFoundError):
        files.open("part-1.json")


def test_only_the_kept_attempt_survives_clearing_the_others(storage):
    accepted(storage, "job1")
    for attempt in (0, 1, 2):
        pending = storage.pending_stem("job1", "vocals", attempt=attempt)
        pending.temporary.write_bytes(b"x")
        pending.commit()
    storage.begin_split("job1", 3).write_text("plan.json", "{}")
    assert storage.attempts_stored("job1") == [0, 1, 2, 3]
    assert storage.attempts_on_disk("job1") == [0, 1, 2]  # stem folders only
    storage.clear_other_attempts("job1", keep=2)
    assert storage.attempts_stored("job1") == [2]
    assert files_under(storage.job_dir("job1")) == ["input.wav", "stems-2/vocals.wav"]
    assert storage.attempts_stored("unknown") == [] and storage.attempts_on_disk("unknown") == []


def test_deleting_a_job_tries_again_while_a_worker_writes_into_it(storage, monkeypatch):
    accepted(storage, "job1")
    real_rmtree, calls = shutil.rmtree, []

    def rmtree_racing_a_writer(path, ignore_errors=False):
        """The first removal leaves a file a worker created meanwhile (as a real race does)."""
        calls.append(path)
        real_rmtree(path, ignore_errors=ignore_errors)
        if len(calls) == 1:
            (Path(path) / "stems-1").mkdir(parents=True)
            (Path(path) / "stems-1" / "vocals.wav").write_bytes(b"late")

    monkeypatch.setattr(storage_module.shutil, "rmtree", rmtree_racing_a_writer)
    monkeypatch.setattr(storage_module.time, "sleep", lambda _s: None)
    storage.delete_job("job1")
    assert len(calls) == 2 and not storage.job_dir("job1").exists()


def test_a_folder_that_cannot_be_removed_is_given_up_on_with_a_warning(storage, monkeypatch, caplog):
    accepted(storage, "job1")
    calls = []
    monkeypatch.setattr(storage_module.shutil, "rmtree", lambda path, ignore_errors=False: calls.append(path))
    monkeypatch.setattr(storage_module.time, "sleep", lambda _s: None)
    with caplog.at_level(logging.WARNING, logger="demix.storage.local"):
        storage.delete_job("job1")  # returns: a DELETE never hangs on it
    assert len(calls) == storage_module.DELETE_TRIES
    assert "could not be removed completely" in caplog.text


def test_stored_jobs_are_dated_by_their_newest_file(storage):
    assert list(storage.stored_jobs()) == []  # no jobs folder yet
    accepted(storage, "old")
    accepted(storage, "fresh")
    pending = storage.pending_stem("fresh", "drums", attempt=1)
    pending.temporary.write_bytes(b"x")
    pending.commit()
    for path in [storage.job_dir("old"), *storage.job_dir("old").rglob("*"),
                 storage.job_dir("fresh"), *storage.job_dir("fresh").rglob("*")]:
        os.utime(path, (1000.0, 1000.0))
    os.utime(storage.stem_path("fresh", "drums", attempt=1), (5000.0, 5000.0))  # deep inside
    assert dict(storage.stored_jobs()) == {"old": 1000.0, "fresh": 5000.0}


def test_free_bytes_creates_the_data_dir_and_measures_its_filesystem(storage):
    assert not storage.root.exists()
    free = storage.free_bytes()
    assert storage.root.is_dir()
    assert 0 < free <= shutil.disk_usage(storage.root).total
    assert storage.sweep_abandoned_uploads(max_age_s=0) == 0  # a folder has no unfinished uploads


def test_a_full_disk_is_recognised_through_the_exceptions_raised_from_it():
    full, quota = OSError(errno.ENOSPC, "No space left"), OSError(errno.EDQUOT, "Quota exceeded")
    assert is_disk_full(full) and is_disk_full(quota)
    assert not is_disk_full(OSError(errno.EACCES, "denied")) and not is_disk_full(None)

    try:
        try:
            raise full
        except OSError as exc:
            raise RuntimeError("the encoder failed") from exc
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)  # the cause
        error = disk_full_error(wrapped)
    assert isinstance(error, DiskFull) and "DEMIX_DATA_DIR" in error.message

    try:
        try:
            raise quota
        except OSError:
            raise ValueError("while cleaning up")  # raised during handling: the context
    except ValueError as during:
        assert is_disk_full(during)

    looped = RuntimeError("a")
    looped.__context__ = ValueError("b")
    looped.__context__.__context__ = looped  # a cycle ends the walk, never hangs it
    assert not is_disk_full(looped) and disk_full_error(looped) is None
