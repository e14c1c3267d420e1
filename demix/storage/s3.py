"""Jobs' files in an S3-compatible bucket (`DEMIX_STORAGE=s3://BUCKET/PREFIX`).

The keys are `demix.storage.local`'s, under PREFIX. The API, the gRPC server and every worker
then share nothing but Redis and the bucket: each keeps only local files under its
`DEMIX_DATA_DIR`, all bounded:

- `incoming/`: uploads being received (removed once sent to the bucket; those a killed
  process left are swept after an hour, by the process staging the next upload).
- `scratch/<host>-<pid>/`: one process's working files (the input of the attempt it
  runs, the stems and part files being written), each removed once used, the whole
  folder emptied at the start and end of every attempt, and removed by the maintenance
  sweep once its process is gone (`sweep_dead_scratch`). A job's input is fetched only
  when it fits above `DEMIX_MIN_FREE_MB`, else the job fails with `disk_full`.

- An upload is received into a local staging file (probed there), then sent as a
  multipart upload in bounded parts; a stem or part file is written to scratch and
  uploaded the same way when complete. An object exists only once its upload completed,
  so no reader ever sees half a file; an upload a crash left unfinished is aborted by
  `sweep_abandoned_uploads` (and by the bucket's lifecycle rule).
- Reads stream: a stem in pieces, with byte ranges; the mix and the part files in
  blocks through ranged GETs (`ObjectReader`), never whole in memory.
- botocore retries each request with backoff (`RETRIES`); a store still failing then
  raises `StorageUnavailable` (`storage_unavailable`), which fails the job with that code.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
import typing as tp
import uuid
from pathlib import Path
from urllib.parse import urlparse

import boto3
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from demix.errors import DiskFull, StorageUnavailable
from demix.host_processes import is_gone_here, this_host
from demix.storage.local import (DEFAULT_EXTENSION, INPUT_NAME, MIB, SplitFiles, Storage, StoredFile, attempt_of,
                                 cache_key, disk_free_bytes, job_key, split_key, stem_key, stems_key, sweep_orphaned_uploads)

log = logging.getLogger(__name__)

RETRIES = 8
"""Tries of one request (botocore's standard mode: exponential backoff with jitter, ~20 s in all)."""

PART_BYTES = 8 * 1024 * 1024
"""Size of a multipart upload's parts, and of a read's ranged pieces: what one transfer holds in memory."""

TRANSFER = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=2,
                          use_threads=True)

PRESIGN_EXPIRY_S = 3600
"""How long a presigned stem link stays valid."""

DELETE_BATCH = 1000
"""Keys per DeleteObjects request (the S3 limit)."""

STORE_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)

INCOMING_SWEEP_INTERVAL_S = 60.0
"""Least time between two sweeps of the staging folder by one process staging uploads."""


def parse_location(location: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> `("bucket", "some/prefix/")` (prefix "" or ending in /).

    Raises:
        ValueError: not an s3:// URL with a bucket.
    """
    parsed = urlparse(location)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"DEMIX_STORAGE={location!r} is not s3://BUCKET[/PREFIX]")
    prefix = parsed.path.strip("/")
    return parsed.netloc, f"{prefix}/" if prefix else ""


def _is_missing(exc: BaseException) -> bool:
    if not isinstance(exc, botocore.exceptions.ClientError):
        return False
    return exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def _unavailable(action: str, exc: BaseException) -> StorageUnavailable:
    return StorageUnavailable(f"the object store failed to {action}: {exc}")


def _read_failure(key: str, exc: BaseException) -> Exception:
    """What a failed read of object `key` raises: FileNotFoundError when the store says there
    is no such object (the caller's business), StorageUnavailable for any other failure."""
    if _is_missing(exc):
        return FileNotFoundError(f"no object {key}")
    return _unavailable(f"read {key}", exc)


class ObjectStorage(Storage):
    """Jobs' files as objects `PREFIX + key` in `bucket`, with a local scratch folder."""

    def __init__(self, client: tp.Any, bucket: str, prefix: str, local_dir: Path, presign: bool = False,
                 min_free_mb: int = 0):
        self.client, self.bucket, self.prefix = client, bucket, prefix
        self.local_dir = Path(local_dir)
        self.presign = presign
        self.min_free_mb = min_free_mb
        self._next_incoming_sweep = 0.0

    @classmethod
    def from_settings(cls, settings: tp.Any) -> "ObjectStorage":
        bucket, prefix = parse_location(settings.storage)
        client = boto3.client(
            "s3", endpoint_url=settings.s3_endpoint_url or None,
            config=Config(retries={"max_attempts": RETRIES, "mode": "standard"}, connect_timeout=5,
                          read_timeout=60, signature_version="s3v4", s3={"addressing_style": "path"}))
        return cls(client, bucket, prefix, settings.data_dir, presign=bool(settings.s3_presign),
                   min_free_mb=settings.min_free_mb)

    # Keys and the scratch folder

    def object_key(self, key: str) -> str:
        return self.prefix + key

    @property
    def incoming_dir(self) -> Path:
        return self.local_dir / "incoming"

    @property
    def scratch_root(self) -> Path:
        """The scratch folders of every process using this data dir, one each."""
        return self.local_dir / "scratch"

    @property
    def scratch_dir(self) -> Path:
        """This process's scratch folder, `scratch/<host>-<pid>`: named when used, so that
        each process a prefork pool forks off gets its own."""
        return self.scratch_root / f"{this_host()}-{os.getpid()}"

    def scratch_file(self, name: str) -> Path:
        """A fresh path in this process's scratch folder for a file called `name` (its folder exists)."""
        folder = self.scratch_dir / uuid.uuid4().hex
        folder.mkdir(parents=True)
        return folder / name

    def ensure_scratch_room(self, incoming_bytes: int, what: str) -> None:
        """Refuse to start a scratch file when the free space on the scratch folder's disk,
        less `incoming_bytes` to be written, is under `DEMIX_MIN_FREE_MB` (0: no check).

        Raises:
            DiskFull: not enough room (`disk_full`); the message names the folder and the setting.
        """
        if self.min_free_mb <= 0:
            return
        self.scratch_root.mkdir(parents=True, exist_ok=True)
        free = disk_free_bytes(self.scratch_root)
        if free - incoming_bytes >= self.min_free_mb * MIB:
            return
        needed = f" for {what} ({incoming_bytes / MIB:.1f} MiB)" if incoming_bytes else f" to write {what}"
        raise DiskFull(
            f"this worker's scratch folder {self.scratch_dir} has too little room{needed}: {free / MIB:.0f} MiB "
            f"free, and it keeps at least {self.min_free_mb} MiB free (DEMIX_MIN_FREE_MB); nothing was kept. "
            "Free some space under that worker's DEMIX_DATA_DIR, then submit the job again.",
            details={"free_mb": free // MIB, "min_free_mb": self.min_free_mb, "needed_mb": -(-incoming_bytes // MIB)})

    def clear_scratch(self) -> None:
        shutil.rmtree(self.scratch_dir, ignore_errors=True)

    def sweep_dead_scratch(self) -> list[str]:
        # Only this machine's processes can be told dead; another machine sharing the folder
        # sweeps its own. A live process's folder is never taken, whatever its age.
        try:
            folders = list(self.scratch_root.iterdir())
        except FileNotFoundError:
            return []
        removed = []
        for folder in folders:
            host, _, pid = folder.name.rpartition("-")
            if is_gone_here(host, pid):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        return removed

    def free_bytes(self) -> int:
        self.local_dir.mkdir(parents=True, exist_ok=True)
        return disk_free_bytes(self.local_dir)

    # Objects

    def put_file(self, path: Path, key: str) -> None:
        """Upload a complete local file as object `key` (multipart past `PART_BYTES`)."""
        try:
            self.client.upload_file(str(path), self.bucket, self.object_key(key), Config=TRANSFER)
        except (*STORE_ERRORS, boto3.exceptions.S3UploadFailedError) as exc:
            raise _unavailable(f"store {key}", exc) from exc

    def get_file(self, key: str, path: Path) -> None:
        """Download object `key` into local file `path`.

        Raises:
            FileNotFoundError: no such object.
        """
        try:
            self.client.download_file(self.bucket, self.object_key(key), str(path), Config=TRANSFER)
        except STORE_ERRORS as exc:
            raise _read_failure(key, exc) from exc

    def size_of(self, key: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))["ContentLength"])
        except STORE_ERRORS as exc:
            raise _read_failure(key, exc) from exc

    def exists(self, key: str) -> bool:
        try:
            self.size_of(key)
            return True
        except FileNotFoundError:
            return False

    def open_object(self, key: str, buffer_bytes: int = 1 << 20) -> tp.BinaryIO:
        """A seekable reader of object `key` through ranged GETs.

        Raises:
            FileNotFoundError: no such object.
        """
        size = self.size_of(key)
        return tp.cast(tp.BinaryIO, io.BufferedReader(ObjectReader(self, key, size), buffer_size=buffer_bytes))

    def list_keys(self, key_prefix: str) -> tp.Iterator[dict]:
        """Every object under `key_prefix` (a key prefix, without PREFIX), as S3 lists them."""
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.object_key(key_prefix))
            for page in pages:
                yield from page.get("Contents", [])
        except STORE_ERRORS as exc:
            raise _unavailable(f"list {key_prefix}", exc) from exc

    def delete_prefix(self, key_prefix: str) -> None:
        """Delete every object under `key_prefix` and abort uploads into it."""
        keys = [item["Key"] for item in self.list_keys(key_prefix)]
        try:
            for first in range(0, len(keys), DELETE_BATCH):
                self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": key} for key in keys[first:first + DELETE_BATCH]], "Quiet": True})
        except STORE_ERRORS as exc:
            raise _unavailable(f"delete {key_prefix}", exc) from exc
        self.abort_uploads(key_prefix)

    def abort_uploads(self, key_prefix: str, older_than: tp.Optional[float] = None) -> int:
        """Abort unfinished multipart uploads under `key_prefix` (started before Unix time
        `older_than`, if given); returns how many."""
        aborted = 0
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.object_key(key_prefix))
            for page in pages:
                for upload in page.get("Uploads", []) or []:
                    if older_than is not None and upload["Initiated"].timestamp() > older_than:
                        continue
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                       UploadId=upload["UploadId"])
                    aborted += 1
        except STORE_ERRORS as exc:
            raise _unavailable(f"abort uploads under {key_prefix}", exc) from exc
        return aborted

    # The storage interface

    def open_upload(self) -> tp.BinaryIO:
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        self._sweep_incoming_now_and_then()
        return tp.cast(tp.BinaryIO, tempfile.NamedTemporaryFile(
            dir=self.incoming_dir, prefix="upload-", suffix=".part", delete=False))

    def accept_upload(self, upload_path: Path, job_id: str) -> None:
        try:
            self.put_file(Path(upload_path), f"{job_key(job_id)}/{INPUT_NAME}")
        finally:
            Path(upload_path).unlink(missing_ok=True)

    def _sweep_incoming_now_and_then(self) -> None:
        """Remove the uploads a killed process left in `incoming/` (idle for an hour), at most
        every `INCOMING_SWEEP_INTERVAL_S`. With a bucket, the API's and the gRPC server's
        folders are their own (no worker's maintenance loop sweeps them): the processes
        that stage uploads there sweep them, when they stage the next ones."""
        now = time.monotonic()
        if now < self._next_incoming_sweep:
            return
        self._next_incoming_sweep = now + INCOMING_SWEEP_INTERVAL_S
        sweep_orphaned_uploads(self)

    @contextlib.contextmanager
    def input_file(self, job_id: str) -> tp.Iterator[Path]:
        with self._downloaded(f"{job_key(job_id)}/{INPUT_NAME}", "the job's input") as path:
            yield path

    @contextlib.contextmanager
    def _downloaded(self, key: str, what: str) -> tp.Iterator[Path]:
        """Object `key` as a file of this process's scratch folder for the block (`what` it is
        names it when the scratch disk lacks room)."""
        self.ensure_scratch_room(self.size_of(key), what)
        path = self.scratch_file(key.rsplit("/", 1)[-1])
        try:
            self.get_file(key, path)
            yield path
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)

    def _server_copy(self, source: str, target: str) -> None:
        """Copy object `source` to `target` in the bucket: the samples never travel through
        this machine."""
        try:
            self.client.copy({"Bucket": self.bucket, "Key": self.object_key(source)}, self.bucket,
                             self.object_key(target), Config=TRANSFER)
        except STORE_ERRORS as exc:
            raise _read_failure(source, exc) from exc

    def _require_job(self, job_id: str) -> None:
        # As the local folder's writers fail once the job's folder is gone, so that a run
        # outliving its job's deletion writes nothing more.
        if not self.exists(f"{job_key(job_id)}/{INPUT_NAME}"):
            raise FileNotFoundError(f"job {job_id} has no input any more (deleted or cancelled)")

    def pending_stem(self, job_id: str, name: str, extension: str = DEFAULT_EXTENSION,
                     attempt: int = 0) -> "PendingObject":
        self._require_job(job_id)
        return PendingObject(self, stem_key(job_id, name, extension, attempt))

    def stem(self, job_id: str, name: str, extension: str = DEFAULT_EXTENSION, attempt: int = 0) -> StoredFile:
        return ObjectFile(self, stem_key(job_id, name, extension, attempt))

    def stored_input(self, job_id: str) -> StoredFile:
        return ObjectFile(self, f"{job_key(job_id)}/{INPUT_NAME}")

    def copy_input(self, job_id: str, source: StoredFile) -> None:
        if not isinstance(source, ObjectFile):
            return super().copy_input(job_id, source)
        self._server_copy(source.key, f"{job_key(job_id)}/{INPUT_NAME}")

    def begin_split(self, job_id: str, attempt: int) -> "ObjectSplitFiles":
        self._require_job(job_id)
        return ObjectSplitFiles(self, split_key(job_id, attempt))

    def split_files(self, job_id: str, attempt: int) -> "ObjectSplitFiles":
        return ObjectSplitFiles(self, split_key(job_id, attempt))

    def clear_split(self, job_id: str, attempt: int) -> None:
        self.delete_prefix(split_key(job_id, attempt) + "/")

    def clear_stems(self, job_id: str, attempt: int) -> None:
        self.delete_prefix(stems_key(job_id, attempt) + "/")

    def attempts_stored(self, job_id: str) -> list[int]:
        folders = set()
        base = job_key(job_id) + "/"
        for item in self.list_keys(base):
            folder = item["Key"][len(self.object_key(base)):].split("/", 1)[0]
            if (found := attempt_of(folder)) is not None:
                folders.add(found[1])
        return sorted(folders)

    def delete_job(self, job_id: str) -> None:
        self.delete_prefix(job_key(job_id) + "/")

    def stored_jobs(self) -> tp.Iterator[tuple[str, float]]:
        return self._folders_by_age("jobs/")

    def _folders_by_age(self, prefix: str) -> tp.Iterator[tuple[str, float]]:
        """Each "folder" under key prefix `prefix` and when its newest object was written."""
        latest: dict[str, float] = {}
        base = self.object_key(prefix)
        for item in self.list_keys(prefix):
            folder = item["Key"][len(base):].split("/", 1)[0]
            latest[folder] = max(latest.get(folder, 0.0), item["LastModified"].timestamp())
        yield from latest.items()

    def sweep_abandoned_uploads(self, max_age_s: float) -> int:
        return self.abort_uploads("", older_than=time.time() - max_age_s)

    def store_cache_entry(self, entry: str, files: tp.Mapping[str, StoredFile]) -> int:
        # Each object exists only once complete; the entry is used only once the result
        # cache's index in Redis names it, after every object is stored.
        size = 0
        for name, source in files.items():
            key = f"{cache_key(entry)}/{name}"
            if isinstance(source, ObjectFile):
                self._server_copy(source.key, key)
            else:
                with source.open() as stream:
                    try:
                        self.client.upload_fileobj(stream, self.bucket, self.object_key(key), Config=TRANSFER)
                    except (*STORE_ERRORS, boto3.exceptions.S3UploadFailedError) as exc:
                        raise _unavailable(f"store {key}", exc) from exc
            size += self.size_of(key)
        return size

    @contextlib.contextmanager
    def cached_copies(self, entry: str, names: tp.Sequence[str]) -> tp.Iterator[dict[str, Path]]:
        with contextlib.ExitStack() as downloads:
            yield {name: downloads.enter_context(self._downloaded(f"{cache_key(entry)}/{name}", f"the cached {name}"))
                   for name in names}

    def delete_cache_entry(self, entry: str) -> None:
        self.delete_prefix(f"{cache_key(entry)}/")

    def stored_cache_entries(self) -> tp.Iterator[tuple[str, float]]:
        return self._folders_by_age("cache/")


class PendingObject:
    """A file written to scratch; `commit` uploads it as object `key` (complete, or not at all)."""

    def __init__(self, storage: ObjectStorage, key: str):
        self.storage, self.key = storage, key
        name = key.rsplit("/", 1)[-1]
        storage.ensure_scratch_room(0, name)  # its size is known only once written
        self.temporary = storage.scratch_file(name)

    def commit(self) -> str:
        try:
            self.storage.put_file(self.temporary, self.key)
        finally:
            self.discard()
        return self.key

    def discard(self) -> None:
        shutil.rmtree(self.temporary.parent, ignore_errors=True)


class ObjectSplitFiles(SplitFiles):
    """An attempt's split files as objects under its split key."""

    def __init__(self, storage: ObjectStorage, key: str):
        self.storage, self.key = storage, key

    def pending(self, name: str) -> PendingObject:
        return PendingObject(self.storage, f"{self.key}/{name}")

    def open(self, name: str) -> tp.BinaryIO:
        return self.storage.open_object(f"{self.key}/{name}")


class ObjectFile(StoredFile):
    """A published stem in the bucket."""

    def __init__(self, storage: ObjectStorage, key: str):
        self.storage, self.key = storage, key
        self.name = key.rsplit("/", 1)[-1]

    def size(self) -> int:
        return self.storage.size_of(self.key)

    def open(self) -> tp.BinaryIO:
        return self.storage.open_object(self.key)

    def read_range(self, start: int, stop: int, chunk_bytes: int = 1 << 20) -> tp.Iterator[bytes]:
        if start >= stop:
            return
        storage = self.storage
        try:
            body = storage.client.get_object(Bucket=storage.bucket, Key=storage.object_key(self.key),
                                             Range=f"bytes={start}-{stop - 1}")["Body"]
            try:
                yield from body.iter_chunks(chunk_bytes)
            finally:
                body.close()
        except STORE_ERRORS as exc:
            raise _unavailable(f"read {self.key}", exc) from exc

    def presigned_url(self, download_name: str, mimetype: str) -> tp.Optional[str]:
        if not self.storage.presign:
            return None
        storage = self.storage
        return storage.client.generate_presigned_url(
            "get_object", ExpiresIn=PRESIGN_EXPIRY_S,
            Params={"Bucket": storage.bucket, "Key": storage.object_key(self.key),
                    "ResponseContentDisposition": f'attachment; filename="{download_name}"',
                    "ResponseContentType": mimetype})


class ObjectReader(io.RawIOBase):
    """A seekable raw reader of one object: reading from a position opens a ranged GET
    from there to the end and streams it; a seek drops it. Memory: the HTTP stream's buffer."""

    def __init__(self, storage: ObjectStorage, key: str, size: int):
        self.storage, self.key, self.size = storage, key, size
        self.name = key
        self._position = 0
        self._body: tp.Any = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self._position + offset, io.SEEK_END: self.size + offset}[whence]
        if target != self._position:
            self._drop()
            self._position = max(0, target)
        return self._position

    def readinto(self, buffer: tp.Any) -> int:
        if self._position >= self.size or len(buffer) == 0:
            return 0
        storage = self.storage
        try:
            if self._body is None:
                self._body = storage.client.get_object(
                    Bucket=storage.bucket, Key=storage.object_key(self.key),
                    Range=f"bytes={self._position}-{self.size - 1}")["Body"]
            data = self._body.read(min(len(buffer), self.size - self._position))
        except (*STORE_ERRORS, OSError) as exc:  # OSError: the connection broke mid-stream
            self._drop()
            raise _unavailable(f"read {self.key}", exc) from exc
        if not data:
            raise _unavailable(f"read {self.key}", EOFError(f"it ended at byte {self._position} of {self.size}"))
        buffer[:len(data)] = data
        self._position += len(data)
        return len(data)

    def _drop(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    def close(self) -> None:
        self._drop()
        super().close()
