"""Where uploads, job inputs, split jobs' working files and stems live: one interface,
two backends.

Every file of a job has a *key*, the same under both backends::

    jobs/<id>/input.wav
    jobs/<id>/stems-<attempt>/<name>.<wav|flac|mp3>
    jobs/<id>/split-<attempt>/<file>   a split job's mix, plan and parts, while it runs
    cache/<entry>/<source>.wav         a result cache entry (`demix.jobs.result_cache`)

`JobStorage` keeps them in a local folder (`DEMIX_DATA_DIR`, the default: one machine, or
many sharing that folder); `demix.storage.s3.ObjectStorage` in an S3-compatible
bucket (`DEMIX_STORAGE=s3://bucket/prefix`), so that machines share nothing but Redis
and the bucket. Uploads are received into a local staging folder (`incoming/`) under
either, and accepted into storage once complete.

Each run (attempt) of a job writes its own stem folder, and the job record names the
attempt whose stems are the job's: a late run of a worker presumed dead can never
replace or corrupt the stems of the run that replaced it.

Files become visible under their final key only when complete (locally `demix.atomic_files`:
written under a hidden temporary name, flushed, renamed; in a bucket, an object exists
only once its upload completed), so no reader ever sees half a file.
"""
from __future__ import annotations

import abc
import contextlib
import errno
import logging
import os
import shutil
import tempfile
import time
import typing as tp
from pathlib import Path

from demix.atomic_files import PendingFile, publish_file
from demix.errors import DiskFull

log = logging.getLogger(__name__)

MIB = 1024 * 1024

ORPHAN_AGE_S = 3600
"""Age (since last modified) after which an upload in `incoming/`, or a job folder without a
record, is taken to be left over by a crash (1 hour: no live request or job is that idle)."""

DEFAULT_EXTENSION = "wav"

DELETE_TRIES = 20
"""Attempts at removing a job's folder while a worker may still be writing into it."""

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
"""`OSError` numbers meaning "no room left": the disk is full, or the user's quota is."""

INPUT_NAME = "input.wav"


def job_key(job_id: str) -> str:
    """The key prefix of every file of one job."""
    return f"jobs/{job_id}"


def stems_key(job_id: str, attempt: int) -> str:
    """The key prefix of one attempt's stems (0: jobs recorded before attempts existed)."""
    return f"{job_key(job_id)}/" + (f"stems-{attempt}" if attempt else "stems")


def stem_key(job_id: str, name: str, extension: str = DEFAULT_EXTENSION, attempt: int = 0) -> str:
    return f"{stems_key(job_id, attempt)}/{name}.{extension}"


def split_key(job_id: str, attempt: int) -> str:
    """The key prefix of one attempt's split working files."""
    return f"{job_key(job_id)}/split-{attempt}"


def cache_key(entry: str) -> str:
    """The key prefix of one result cache entry's files."""
    return f"cache/{entry}"


def attempt_of(folder: str) -> tp.Optional[tuple[str, int]]:
    """`("stems" | "split", attempt)` for a folder name under a job (`stems`: attempt 0),
    or None for anything else."""
    kind, _, suffix = folder.partition("-")
    if folder == "stems":
        return "stems", 0
    if kind in ("stems", "split") and suffix.isdigit():
        return kind, int(suffix)
    return None


class StoredFile(abc.ABC):
    """A complete file in storage, to read (a stem)."""

    name: str  # its file name, e.g. `vocals.wav`
    local_path: tp.Optional[Path] = None  # where it is on this machine's disk, if it is

    @abc.abstractmethod
    def size(self) -> int:
        """Its length in bytes.

        Raises:
            FileNotFoundError: it does not exist.
        """

    @abc.abstractmethod
    def open(self) -> tp.BinaryIO:
        """A binary reader from its start (seekable)."""

    def read_range(self, start: int, stop: int, chunk_bytes: int = 1 << 20) -> tp.Iterator[bytes]:
        """Bytes `[start, stop)`, in pieces of at most `chunk_bytes`."""
        with self.open() as file:
            file.seek(start)
            while start < stop and (piece := file.read(min(chunk_bytes, stop - start))):
                start += len(piece)
                yield piece

    def presigned_url(self, download_name: str, mimetype: str) -> tp.Optional[str]:
        """A time-limited URL a client can fetch it from directly, or None (not in a bucket,
        or presigned links are off)."""
        return None


class PendingWrite(tp.Protocol):
    """A file being written to a local `temporary` path until `commit` publishes it under
    its key (complete or not at all) or `discard` drops it."""

    temporary: Path

    def commit(self) -> tp.Any: ...

    def discard(self) -> None: ...


class SplitFiles(abc.ABC):
    """The working files of one attempt of a split job (the mix, the plan, the parts)."""

    @abc.abstractmethod
    def pending(self, name: str) -> PendingWrite:
        """A new file `name`, written locally, published by `commit()`."""

    @abc.abstractmethod
    def open(self, name: str) -> tp.BinaryIO:
        """Read file `name` (seekable, read in blocks: never mapped or held whole).

        Raises:
            FileNotFoundError: it does not exist (not written yet, or removed).
        """

    def write_text(self, name: str, text: str) -> None:
        pending = self.pending(name)
        try:
            pending.temporary.write_text(text)
        except BaseException:
            pending.discard()
            raise
        pending.commit()

    def read_text(self, name: str) -> str:
        with self.open(name) as file:
            return file.read().decode()


class Storage(abc.ABC):
    """Uploads, inputs, split files and stems of jobs, wherever they are kept."""

    @abc.abstractmethod
    def open_upload(self) -> tp.BinaryIO:
        """A new local file in the staging folder to stream an upload into.

        The caller `accept_upload`s it; the API deletes unclaimed ones after each request.
        """

    @property
    @abc.abstractmethod
    def incoming_dir(self) -> Path:
        """The local staging folder of uploads being received."""

    @abc.abstractmethod
    def accept_upload(self, upload_path: Path, job_id: str) -> None:
        """Make a complete staged upload the job's input (the staged file is gone after)."""

    @abc.abstractmethod
    def input_file(self, job_id: str) -> tp.ContextManager[Path]:
        """The job's input as a local file for the length of the block.

        Raises:
            FileNotFoundError: the job has no input (it was deleted or cancelled).
        """

    @abc.abstractmethod
    def stored_input(self, job_id: str) -> StoredFile:
        """The job's input, to read or to copy (`copy_input`)."""

    def copy_input(self, job_id: str, source: StoredFile) -> None:
        """Make a copy of `source` (another job's stem or input) job `job_id`'s input: a
        workflow's run reads what an earlier run wrote as its own input, so it runs, splits,
        is redone and deleted as any job. (Storages override it with a cheaper copy.)"""
        with self.open_upload() as upload, source.open() as stream:
            shutil.copyfileobj(stream, upload, 1 << 20)
        self.accept_upload(Path(upload.name), job_id)

    @abc.abstractmethod
    def pending_stem(self, job_id: str, name: str, extension: str = DEFAULT_EXTENSION,
                     attempt: int = 0) -> PendingWrite:
        """A stem file of attempt `attempt` to write locally; `commit()` publishes it.

        Raises:
            FileNotFoundError: the job is gone (it was deleted or cancelled).
        """

    @abc.abstractmethod
    def stem(self, job_id: str, name: str, extension: str = DEFAULT_EXTENSION, attempt: int = 0) -> StoredFile:
        """A published stem, to read."""

    @abc.abstractmethod
    def begin_split(self, job_id: str, attempt: int) -> SplitFiles:
        """Attempt `attempt`'s split files, created for writing.

        Raises:
            FileNotFoundError: the job is gone (it was deleted or cancelled).
        """

    @abc.abstractmethod
    def split_files(self, job_id: str, attempt: int) -> SplitFiles:
        """Attempt `attempt`'s split files, as the first pass left them."""

    @abc.abstractmethod
    def clear_split(self, job_id: str, attempt: int) -> None:
        """Remove one attempt's split files (finished or partial)."""

    @abc.abstractmethod
    def attempts_stored(self, job_id: str) -> list[int]:
        """Attempts that have stems or split files stored (0: stems from before attempts existed)."""

    @abc.abstractmethod
    def clear_stems(self, job_id: str, attempt: int) -> None:
        """Remove one attempt's stems (finished or partial)."""

    def clear_other_attempts(self, job_id: str, keep: int) -> None:
        """Remove the stems and split files of every attempt but `keep` (leftovers of lost runs)."""
        for attempt in self.attempts_stored(job_id):
            if attempt != keep:
                self.clear_stems(job_id, attempt)
                self.clear_split(job_id, attempt)

    @abc.abstractmethod
    def delete_job(self, job_id: str) -> None:
        """Remove every file of the job: its input, all its attempts' stems and split files."""

    @abc.abstractmethod
    def stored_jobs(self) -> tp.Iterator[tuple[str, float]]:
        """`(job id, last modified as a Unix time)` of every job with files stored."""

    # The result cache's entries (`demix.jobs.result_cache` keeps their index in Redis).

    @abc.abstractmethod
    def store_cache_entry(self, entry: str, files: tp.Mapping[str, StoredFile]) -> int:
        """Publish `files` (file name -> a complete stored file, e.g. a job's stem) as the files
        of result cache entry `entry`: all of them or none become visible, and an entry
        already stored is kept as it is. Returns the entry's size in bytes."""

    @abc.abstractmethod
    def cached_copies(self, entry: str, names: tp.Sequence[str]) -> tp.ContextManager[dict[str, Path]]:
        """Local copies of files `names` of entry `entry` (name -> path) for the block, made
        before it starts (hard links in a local folder, downloads from a bucket): once made,
        the entry may be evicted or deleted without harm to the reader.

        Raises:
            FileNotFoundError: the entry or one of its files is gone (evicted, deleted).
        """

    @abc.abstractmethod
    def delete_cache_entry(self, entry: str) -> None:
        """Remove every file of result cache entry `entry` (nothing if it has none)."""

    @abc.abstractmethod
    def stored_cache_entries(self) -> tp.Iterator[tuple[str, float]]:
        """`(entry, last modified as a Unix time)` of every result cache entry with files
        stored (a local folder's entries being built too, under their temporary names)."""

    @abc.abstractmethod
    def free_bytes(self) -> int:
        """Free space on the local filesystem holding uploads being received and scratch, in bytes."""

    def sweep_abandoned_uploads(self, max_age_s: float) -> int:
        """Abort uploads into storage that a crash left unfinished for `max_age_s`; how many
        (a local folder has none: its files are renamed into place whole)."""
        return 0

    def clear_scratch(self) -> None:
        """Empty this process's local scratch folder (called at the start and end of every
        attempt; a local folder keeps none: its files are written in place)."""

    def sweep_dead_scratch(self) -> list[str]:
        """Remove the scratch folders of this machine's processes that are gone (killed
        mid-attempt); returns their names (a local folder keeps none)."""
        return []


class _LocalFile(StoredFile):
    def __init__(self, path: Path):
        self.path, self.name, self.local_path = path, path.name, path

    def size(self) -> int:
        return self.path.stat().st_size

    def open(self) -> tp.BinaryIO:
        return open(self.path, "rb")


class FolderSplitFiles(SplitFiles):
    """Split files in a local folder (which must exist), published with `demix.atomic_files`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def pending(self, name: str) -> PendingFile:
        return PendingFile(self.folder / name)

    def open(self, name: str) -> tp.BinaryIO:
        return open(self.folder / name, "rb")


class JobStorage(Storage):
    """Jobs' files in a local folder, `<data_dir>/<key>`; uploads are staged in
    `<data_dir>/incoming/` (same filesystem, so accepting one is a rename, never a copy)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def incoming_dir(self) -> Path:
        return self.root / "incoming"

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_key(job_id)

    def input_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / INPUT_NAME

    def stems_dir(self, job_id: str, attempt: int) -> Path:
        """The stem folder of one attempt (0: jobs recorded before attempts existed)."""
        return self.root / stems_key(job_id, attempt)

    def stem_path(self, job_id: str, name: str, extension: str = DEFAULT_EXTENSION,
                  attempt: int = 0) -> Path:
        return self.root / stem_key(job_id, name, extension, attempt)

    def split_dir(self, job_id: str, attempt: int) -> Path:
        """The working folder of one attempt of a split job: its model-rate mix, its plan
        and its parts' sums (removed when the job finishes)."""
        return self.root / split_key(job_id, attempt)

    def make_split_dir(self, job_id: str, attempt: int) -> Path:
        """Create attempt `attempt`'s split folder (its files are written with `demix.atomic_files`).

        Raises:
            FileNotFoundError: the job's folder is gone (the job was deleted or cancelled).
        """
        # Not `parents=True`: a run that outlived its job's deletion must not recreate its folder.
        folder = self.split_dir(job_id, attempt)
        folder.mkdir(exist_ok=True)
        return folder

    def begin_split(self, job_id: str, attempt: int) -> FolderSplitFiles:
        return FolderSplitFiles(self.make_split_dir(job_id, attempt))

    def split_files(self, job_id: str, attempt: int) -> FolderSplitFiles:
        return FolderSplitFiles(self.split_dir(job_id, attempt))

    def clear_split(self, job_id: str, attempt: int) -> None:
        shutil.rmtree(self.split_dir(job_id, attempt), ignore_errors=True)

    def open_upload(self) -> tp.BinaryIO:
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        return tempfile.NamedTemporaryFile(dir=self.incoming_dir, prefix="upload-", suffix=".part",
                                           delete=False)

    def accept_upload(self, upload_path: Path, job_id: str) -> Path:
        """Move a complete upload into its job's folder; returns the input's final path."""
        target = self.input_path(job_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        return publish_file(Path(upload_path), target)

    def stored_input(self, job_id: str) -> StoredFile:
        return _LocalFile(self.input_path(job_id))

    def copy_input(self, job_id: str, source: StoredFile) -> None:
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        staged = self.incoming_dir / f"link-{os.getpid()}-{time.monotonic_ns()}.part"
        _link_or_copy(source, staged)  # a hard link: the same samples, no copy
        self.accept_upload(staged, job_id)

    @contextlib.contextmanager
    def input_file(self, job_id: str) -> tp.Iterator[Path]:
        path = self.input_path(job_id)
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "the job has no input", str(path))
        yield path

    def pending_stem(self, job_id: str, name: str, extension: str = DEFAULT_EXTENSION,
                     attempt: int = 0) -> PendingFile:
        # Not `parents=True`: a run that outlived its job's deletion must not recreate its folder.
        self.stems_dir(job_id, attempt).mkdir(exist_ok=True)
        return PendingFile(self.stem_path(job_id, name, extension, attempt))

    def stem(self, job_id: str, name: str, extension: str = DEFAULT_EXTENSION, attempt: int = 0) -> StoredFile:
        return _LocalFile(self.stem_path(job_id, name, extension, attempt))

    def attempts_stored(self, job_id: str) -> list[int]:
        try:
            names = os.listdir(self.job_dir(job_id))
        except FileNotFoundError:
            return []
        return sorted({found[1] for found in map(attempt_of, names) if found is not None})

    def attempts_on_disk(self, job_id: str) -> list[int]:
        """Attempts that have a stem folder (0: a folder from before attempts existed)."""
        try:
            names = os.listdir(self.job_dir(job_id))
        except FileNotFoundError:
            return []
        return sorted(found[1] for found in map(attempt_of, names) if found is not None and found[0] == "stems")

    def clear_stems(self, job_id: str, attempt: int) -> None:
        shutil.rmtree(self.stems_dir(job_id, attempt), ignore_errors=True)

    def delete_job(self, job_id: str) -> None:
        """Remove every file of the job.

        A worker still running the job may create a file while the tree is being removed
        (the folder is then not empty when its turn comes), so this tries again until the
        folder is gone; anything the worker writes after that it removes itself when it
        stops at its next segment.
        """
        folder = self.job_dir(job_id)
        for _ in range(DELETE_TRIES):
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                return
            time.sleep(0.05)
        log.warning("job %s: its folder %s could not be removed completely", job_id, folder)

    def stored_jobs(self) -> tp.Iterator[tuple[str, float]]:
        return _folders_by_age(self.root / "jobs")

    def cache_dir(self, entry: str) -> Path:
        return self.root / cache_key(entry)

    def store_cache_entry(self, entry: str, files: tp.Mapping[str, StoredFile]) -> int:
        target = self.cache_dir(entry)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built beside its final place, then renamed into it whole: a reader sees all or nothing.
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{entry}-"))
        try:
            for name, source in files.items():
                _link_or_copy(source, staging / name)
            size = sum(path.stat().st_size for path in staging.iterdir())
            try:
                os.rename(staging, target)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                # Another job stored the same entry first: its files are the same samples.
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return size

    @contextlib.contextmanager
    def cached_copies(self, entry: str, names: tp.Sequence[str]) -> tp.Iterator[dict[str, Path]]:
        # Hard links in the staging folder (the same filesystem): the samples stay readable
        # through them however the entry's own names are removed meanwhile.
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.incoming_dir, prefix="cached-") as folder:
            copies = {}
            for name in names:
                copies[name] = Path(folder) / name
                os.link(self.cache_dir(entry) / name, copies[name])
            yield copies

    def delete_cache_entry(self, entry: str) -> None:
        shutil.rmtree(self.cache_dir(entry), ignore_errors=True)

    def stored_cache_entries(self) -> tp.Iterator[tuple[str, float]]:
        return _folders_by_age(self.root / "cache")

    def free_bytes(self) -> int:
        """Free space on the filesystem holding the data dir, in bytes (for unprivileged users)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return disk_free_bytes(self.root)


def _link_or_copy(source: StoredFile, target: Path) -> None:
    """Make `target` a hard link to `source` (files are never rewritten in place), or a copy
    when it is elsewhere."""
    if source.local_path is not None:
        try:
            os.link(source.local_path, target)
            return
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise
    with source.open() as stream, open(target, "wb") as copy:
        shutil.copyfileobj(stream, copy, 1 << 20)


def _folders_by_age(parent: Path) -> tp.Iterator[tuple[str, float]]:
    """Each folder in `parent` (none if it does not exist) and when anything in it last
    changed; one removed while being looked at is passed over."""
    try:
        folders = list(parent.iterdir())
    except FileNotFoundError:
        return
    for folder in folders:
        try:
            yield folder.name, _last_modified(folder)
        except FileNotFoundError:
            continue


def _last_modified(folder: Path) -> float:
    """Latest modification time of a folder and everything in it."""
    latest = folder.lstat().st_mtime
    for path in folder.rglob("*"):
        try:
            latest = max(latest, path.lstat().st_mtime)
        except FileNotFoundError:
            continue
    return latest


def disk_free_bytes(path: Path) -> int:
    """Bytes an unprivileged process can still write on `path`'s filesystem."""
    return shutil.disk_usage(path).free


def is_disk_full(exc: tp.Optional[BaseException]) -> bool:
    """Whether `exc` (or an exception it was raised from) is `OSError(ENOSPC/EDQUOT)`
    (audio writers raise it too: `demix.audio.io.disk_full_as_os_error`)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(exc: BaseException) -> tp.Optional[DiskFull]:
    """The `disk_full` job error for an exception caused by a full disk, else None."""
    if not is_disk_full(exc):
        return None
    return DiskFull("the disk holding DEMIX_DATA_DIR filled up while the stems were written; "
                    "no partial stems were kept. Free some space and submit the job again.")


def sweep_orphaned_uploads(storage: Storage, now: tp.Optional[float] = None,
                           max_age_s: float = ORPHAN_AGE_S) -> list[str]:
    """Delete uploads left in `incoming/` by a crash mid-request (untouched for `max_age_s`);
    returns their names. An upload still streaming in is written to, so it stays young."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(storage.incoming_dir.iterdir())
    except FileNotFoundError:
        return []
    for path in entries:
        try:
            if now - path.lstat().st_mtime < max_age_s:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # another worker swept it first
            continue
        removed.append(path.name)
    if removed:
        log.info("retention: deleted %d orphaned upload(s)", len(removed))
    return removed
