"""The one atomic-write helper: readers see no file or the whole file, failures leave nothing."""
from __future__ import annotations

import threading

import pytest

from demix.atomic_files import PendingFile, atomic_open, atomic_path, is_temporary, publish_file


def test_atomic_open_publishes_only_when_the_block_ends(tmp_path):
    final = tmp_path / "sub" / "stem.wav"
    final.parent.mkdir()
    with atomic_open(final) as file:
        file.write(b"first half ")
        assert not final.exists()  # nothing under the final name while writing
        [temporary] = list(final.parent.iterdir())
        assert is_temporary(temporary) and temporary.name.startswith(".stem.wav.")
        file.write(b"second half")
    assert final.read_bytes() == b"first half second half"
    assert list(final.parent.iterdir()) == [final]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    final = tmp_path / "model.th"
    final.write_bytes(b"old")
    with pytest.raises(ValueError):
        with atomic_open(final) as file:
            file.write(b"new but broken")
            raise ValueError("writer failed")
    assert final.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [final]


def test_atomic_path_hands_out_a_path_for_writers_that_open_files_themselves(tmp_path):
    final = tmp_path / "bag.yaml"
    with atomic_path(final) as temporary:
        assert temporary.parent == final.parent and is_temporary(temporary)
        temporary.write_text("models: []\n")
    assert final.read_text() == "models: []\n"


def test_concurrent_writers_never_share_a_temporary_name(tmp_path):
    final = tmp_path / "same.bin"
    names = set()
    barrier = threading.Barrier(8)

    def write(index: int) -> None:
        with atomic_path(final) as temporary:
            names.add(temporary.name)
            temporary.write_bytes(bytes([index]) * 1000)
            barrier.wait(timeout=30)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(names) == 8
    content = final.read_bytes()
    assert len(content) == 1000 and len(set(content)) == 1  # one whole file, never a mix
    assert list(tmp_path.iterdir()) == [final]


def test_pending_file_commit_and_discard(tmp_path):
    kept = PendingFile(tmp_path / "kept.wav")
    kept.temporary.write_bytes(b"x")
    assert kept.commit() == tmp_path / "kept.wav"
    dropped = PendingFile(tmp_path / "dropped.wav")
    dropped.temporary.write_bytes(b"y")
    dropped.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.wav"]


def test_publish_file_moves_a_complete_file_into_place(tmp_path):
    source = tmp_path / "incoming" / "upload-1"
    source.parent.mkdir()
    source.write_bytes(b"RIFF")
    target = tmp_path / "jobs" / "input.wav"
    target.parent.mkdir()
    assert publish_file(source, target) == target
    assert target.read_bytes() == b"RIFF" and not source.exists()


def test_a_writer_whose_folder_was_deleted_fails_instead_of_recreating_it(tmp_path):
    folder = tmp_path / "jobs" / "deleted-job"
    with pytest.raises(FileNotFoundError):
        with atomic_open(folder / "stem.wav") as file:
            file.write(b"late")
    assert not folder.exists()
