"""The result cache: a model's stems for an input, kept so that a later job running the same
model on the same audio reuses them instead of running the model.

An *entry* is every source a model wrote for one input, as float32 WAV at the input's rate
and channels (what a workflow's model run writes), stored through the `Storage` as
`cache/<entry>/<source>.wav`. Its key (`entry_key`) is a sha256 over the decoded input's
samples (`audio_digest`: the same song as WAV or FLAC is one key) and everything that
changes what the model computes (the worker builds those fields: `demix.worker.cached_runs`).

The index lives in Redis (`demix.redis_keys`): per entry its manifest, its size, when it
was last stored or used, and the jobs that stored or used it. The cache is bounded
(`DEMIX_CACHE_MB`): storing an entry evicts the least recently used ones until the total
fits. A job's deletion (the user's, or retention's) releases its entries, and an entry no
job refers to any more is deleted: the cache never keeps a song's stems after every job of
that song is gone.

Readers never hold an entry's files in place: they make local copies first
(`Storage.cached_copies`: hard links in a local folder), so an eviction or a deletion in
between removes only the entry's names; an entry found gone while copying is a miss (the
job runs the model), never a failure.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import typing as tp
from pathlib import Path

import redis

from demix import redis_keys as keys
from demix.audio.io import AudioReader
from demix.storage.local import ORPHAN_AGE_S, Storage, StoredFile

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Version of an entry's layout and key; a new one makes every older entry unreachable."""

DIGEST_BLOCK_FRAMES = 1 << 16
"""Frames hashed per read of the input (a block of float32 samples, ~0.5 MiB for stereo)."""


def audio_digest(path: Path) -> str:
    """The sha256 hex of an audio file's decoded samples (float32, read in blocks) with its
    rate, channels and length: the same audio in another container or encoding that decodes
    to the same samples has the same digest."""
    digest = hashlib.sha256()
    with AudioReader(path) as reader:
        digest.update(f"{reader.samplerate} {reader.channels} {reader.frames}\n".encode())
        while len(block := reader.read(DIGEST_BLOCK_FRAMES)):
            digest.update(block.astype("<f4", copy=False).tobytes())
    return digest.hexdigest()


def entry_key(fields: tp.Mapping[str, tp.Any]) -> str:
    """The entry key of a model run described by `fields` (input digest, model, weights
    digest, engine options...): the sha256 hex of their canonical JSON."""
    canonical = json.dumps({"format": CACHE_FORMAT, **fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def entry_file(source: str) -> str:
    """The file name of source `source` in an entry."""
    return f"{source}.wav"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One entry's manifest."""
    key: str
    model: str
    sources: tp.List[str]
    samplerate: int
    channels: int
    frames: int
    size: int  # bytes

    def to_fields(self) -> dict[str, str]:
        return {"model": self.model, "sources": json.dumps(self.sources), "samplerate": str(self.samplerate),
                "channels": str(self.channels), "frames": str(self.frames), "size": str(self.size)}

    @classmethod
    def from_fields(cls, key: str, raw: tp.Mapping[bytes, bytes]) -> "Entry":
        values = {name.decode(): value.decode() for name, value in raw.items()}
        return cls(key=key, model=values["model"], sources=json.loads(values["sources"]),
                   samplerate=int(values["samplerate"]), channels=int(values["channels"]),
                   frames=int(values["frames"]), size=int(values["size"]))


# Records a stored entry, if the job storing it still exists. Returns 1 if recorded, else 0.
#   KEYS: entry hash, recency, sizes, entry's jobs, job's entries, job hash
#   ARGV: entry key, size, now, job id, then manifest field/value pairs
_REGISTER = """
if redis.call('EXISTS', KEYS[6]) == 0 then return 0 end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[4])
redis.call('SADD', KEYS[5], ARGV[1])
return 1
"""

# Uses an entry: marks it most recently used and notes the job among its users (if the
# job exists). Returns its manifest's field/value pairs, or nothing when there is no entry.
#   KEYS: entry hash, recency, entry's jobs, job's entries, job hash; ARGV: entry key, now, job id
_USE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('SADD', KEYS[3], ARGV[3])
  redis.call('SADD', KEYS[4], ARGV[1])
end
return redis.call('HGETALL', KEYS[1])
"""

# Drops an entry from the index: with ARGV[2] a job id, that job's use only, and the entry
# when no other job uses it; with ARGV[2] '', the entry whatever uses it (an eviction).
# Returns 1 when the entry was dropped (the caller then deletes its files), else 0.
#   KEYS: entry hash, recency, sizes, entry's jobs; ARGV: entry key, job id or ''
_DROP = """
if ARGV[2] ~= '' then
  redis.call('SREM', KEYS[4], ARGV[2])
  if redis.call('SCARD', KEYS[4]) > 0 then return 0 end
end
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[4])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return existed
"""


class ResultCache:
    """The result cache's index in Redis over its entries' files in `storage`, bounded by
    `limit_bytes` (0: the cache is off: nothing is looked up or stored)."""

    def __init__(self, client: redis.Redis, storage: Storage, limit_bytes: int):
        self.redis, self.storage, self.limit_bytes = client, storage, limit_bytes
        self._register = client.register_script(_REGISTER)
        self._use = client.register_script(_USE)
        self._drop = client.register_script(_DROP)

    @classmethod
    def from_settings(cls, client: redis.Redis, storage: Storage, settings: tp.Any) -> "ResultCache":
        return cls(client, storage, max(0, settings.cache_mb) * 1024 * 1024)

    @property
    def enabled(self) -> bool:
        return self.limit_bytes > 0

    def lookup(self, key: str, job_id: str) -> tp.Optional[Entry]:
        """Entry `key`'s manifest, marked used now and by job `job_id`, or None (a miss)."""
        raw = self._use(keys=[keys.cache_entry_key(key), keys.cache_recency_key(), keys.cache_entry_jobs_key(key),
                              keys.job_cache_entries_key(job_id), keys.job_key(job_id)],
                        args=[key, repr(time.time()), job_id])
        if not raw:
            return None
        return Entry.from_fields(key, dict(zip(raw[::2], raw[1::2])))

    def store(self, key: str, job_id: str, model: str, files: tp.Mapping[str, StoredFile], samplerate: int,
              channels: int, frames: int) -> tp.Optional[Entry]:
        """Store the stems `files` (source -> a complete float32 WAV, e.g. the job's own
        stem) of job `job_id` as entry `key`, then evict least recently used entries until
        the cache fits its bound. Returns the entry, or None when it was not kept (larger
        than the whole cache, or the job was deleted meanwhile)."""
        size = sum(stored.size() for stored in files.values())
        if size > self.limit_bytes:
            log.info("result cache: not storing %s of job %s (%d MiB, over DEMIX_CACHE_MB)", key[:12], job_id,
                     size >> 20)
            return None
        size = self.storage.store_cache_entry(key, {entry_file(source): stored for source, stored in files.items()})
        entry = Entry(key, model, list(files), samplerate, channels, frames, size)
        pairs = [item for pair in entry.to_fields().items() for item in pair]
        recorded = self._register(
            keys=[keys.cache_entry_key(key), keys.cache_recency_key(), keys.cache_sizes_key(),
                  keys.cache_entry_jobs_key(key), keys.job_cache_entries_key(job_id), keys.job_key(job_id)],
            args=[key, size, repr(time.time()), job_id, *pairs])
        if not recorded:  # the job was deleted while it ran: its entry is nobody's
            if not self.redis.exists(keys.cache_entry_key(key)):
                self.storage.delete_cache_entry(key)
            return None
        self.evict()
        return entry

    def total_bytes(self) -> int:
        """The size of every entry in the index."""
        return sum(int(size) for size in self.redis.hvals(keys.cache_sizes_key()))

    def entries(self) -> list[str]:
        """Every entry's key, least recently used first."""
        return [member.decode() for member in self.redis.zrange(keys.cache_recency_key(), 0, -1)]

    def evict(self) -> list[str]:
        """Drop least recently used entries until the cache fits `limit_bytes`; returns their keys."""
        evicted = []
        while self.total_bytes() > self.limit_bytes:
            oldest = self.redis.zrange(keys.cache_recency_key(), 0, 0)
            if not oldest:
                break
            key = oldest[0].decode()
            if self.drop(key):
                evicted.append(key)
        if evicted:
            log.info("result cache: evicted %d entr%s to stay under %d MiB", len(evicted),
                     "y" if len(evicted) == 1 else "ies", self.limit_bytes >> 20)
        return evicted

    def drop(self, key: str, job_id: str = "") -> bool:
        """Drop entry `key` (with `job_id`: that job's use of it, and the entry once no job
        uses it) from the index, then its files; True when the entry went. A process
        reading it meanwhile reads its own copies (`Storage.cached_copies`)."""
        dropped = bool(self._drop(keys=[keys.cache_entry_key(key), keys.cache_recency_key(), keys.cache_sizes_key(),
                                        keys.cache_entry_jobs_key(key)], args=[key, job_id]))
        if dropped:
            self.storage.delete_cache_entry(key)
        return dropped

    def release_job(self, job_id: str) -> list[str]:
        """Job `job_id` is deleted: it no longer uses its entries, and those no other job
        uses are deleted; returns their keys."""
        listing = keys.job_cache_entries_key(job_id)
        deleted = [key for key in sorted(member.decode() for member in self.redis.smembers(listing))
                   if self.drop(key, job_id)]
        self.redis.delete(listing)
        return deleted


def release_job_entries(client: redis.Redis, storage: Storage, job_id: str) -> list[str]:
    """`ResultCache.release_job` for a deleted job, whatever the cache's bound (entries it
    used are released even once the cache is turned off)."""
    return ResultCache(client, storage, 0).release_job(job_id)


def sweep_orphaned_entries(client: redis.Redis, storage: Storage, now: tp.Optional[float] = None,
                           max_age_s: float = ORPHAN_AGE_S) -> list[str]:
    """Delete the files of result cache entries the index does not name and that were
    untouched for `max_age_s` (left by a process killed between storing an entry's files and
    recording it, or while building one); returns their names. A younger one may be an entry
    being stored right now."""
    now = time.time() if now is None else now
    removed = []
    for entry, last_modified in storage.stored_cache_entries():
        if now - last_modified < max_age_s or client.exists(keys.cache_entry_key(entry)):
            continue
        storage.delete_cache_entry(entry)
        removed.append(entry)
    if removed:
        log.info("retention: deleted %d result cache entr%s without an index entry", len(removed),
                 "y" if len(removed) == 1 else "ies")
    return removed
