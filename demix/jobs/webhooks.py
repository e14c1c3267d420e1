"""Webhooks: when a job with a `callback_url` finishes, POST its JSON there.

**The promise: at least once.** A finished job's webhook is attempted until its receiver
answers 2xx or `DEMIX_WEBHOOK_ATTEMPTS` attempts have failed. A receiver may see a delivery
more than once (a sender killed after the receiver answered and before it recorded the
answer), always with the same `X-Demix-Delivery` id and body, so it can drop repeats by it.
The tests hold more: every job's webhook reaches a healthy receiver exactly once, whatever the
other receivers do (trickle, fail, hang, redirect) and with senders killed mid-delivery.

A finished job's delivery is written to Redis (a hash per delivery, expiring a day after its
last possible attempt, and a sorted set of delivery ids by when each is next due) by the job
store's `on_finished` hook, which only writes to Redis and so never makes a separation wait for
a receiver. A `WebhookSender` (in every worker's background process, `demix.worker.background`)
claims due deliveries, POSTs them from a thread pool (one hanging receiver holds one thread,
not the others), and reschedules failures with exponential backoff.

Every change to a delivery is one Lua script, so none can undo another:

- a claim takes the due deliveries and, for each, moves its due time past the end of the
  attempt (a lease: a sender that dies mid-delivery loses nothing, the delivery is due again
  when the lease runs out), numbers the attempt and returns the record, all at once;
- an outcome (delivered, retry later, give up) is written only if the record still exists and
  its attempt number is still the caller's: an attempt whose lease ran out and was taken over
  changes nothing (it is logged), so a removed record never comes back.

Each attempt ends by its deadline, `DEMIX_WEBHOOK_TIMEOUT_S` after it started, whatever the
receiver does: `requests`' timeout bounds each read, not their sum (a receiver trickling its
status line a byte a second would hold an attempt for ever), so at the deadline the attempt's
socket is shut down. An attempt therefore ends well within its lease.

A record that does not parse is logged and dropped; the sender's loop survives any error (it
logs it and pauses a moment); the background process starts the sender's thread again if it
dies all the same; and a running sender beats a heartbeat in Redis, which `/metrics`
(`demix_webhook_senders`, `demix_webhooks_overdue`) and `demix up` read to tell when deliveries
wait and no sender is alive (`demix.jobs.webhook_health`).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import threading
import time
import typing as tp
import uuid

import redis
import requests

from demix import redis_keys as keys
from demix.config import Settings
from demix.errors import AddressNotAllowed, BadRequest
from demix.host_processes import this_host
from demix.jobs.job_json import job_json
from demix.jobs.records import Job
from demix.jobs.webhook_health import HEARTBEAT_S, beat, forget_sender
from demix.outbound import (MAX_URL_LENGTH, OutboundSession, check_url_syntax, connection_refusal,
                             outbound_session)

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Demix-Signature"
"""`sha256=<hex of HMAC-SHA256(DEMIX_WEBHOOK_SECRET, body)>`."""
DELIVERY_HEADER = "X-Demix-Delivery"
"""The delivery's id, the same on every attempt: receivers can drop repeats by it."""
ATTEMPT_HEADER = "X-Demix-Attempt"
"""1 for the first attempt, 2 for the second, ... (an attempt whose sender died counts)."""

MAX_CALLBACK_URL_LENGTH = MAX_URL_LENGTH
MAX_BACKOFF_S = 3600.0
"""Longest wait between two attempts, whatever DEMIX_WEBHOOK_BACKOFF_S and the attempt count."""
LEASE_MARGIN_S = 5.0
"""How long past its attempt's deadline a claimed delivery stays claimed (time enough to record
the outcome); then another sender may attempt it (its sender died or stalled)."""
RECORD_GRACE_S = 24 * 3600.0
"""How long past its last possible attempt a delivery's record is kept, for a service whose
senders all stopped (every worker down); then it expires."""
SENDER_THREADS = 8
"""Deliveries one sender makes at once."""
POLL_INTERVAL_S = 0.5
"""How often an idle sender looks for due deliveries."""
ERROR_PAUSE_S = 1.0
"""How long a sender waits after an error (Redis unreachable, a bug) before it goes on."""

# Claims the deliveries due now, up to a number. Each due id whose record is gone (expired) is
# unlisted. A record that is not a hash, or whose `attempts` is not a count, is returned as
# 'malformed' and left as it is (the caller drops it). One whose attempts are used up (its last
# attempt never reported back) is removed and returned as 'exhausted'. Any other is leased (due
# again at the lease's end), its attempt count raised by one and returned as 'claimed' with that
# count: the attempt's number, which is also its lease token.
#   KEYS: due set; ARGV: now, lease end, most ids, record key prefix, most attempts
#   Returns {{id, outcome, attempt, {field, value, ...}}, ...}
_CLAIM_DUE = """
local claimed = {}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do
  local record = ARGV[4] .. id
  local kind = redis.call('TYPE', record).ok
  if kind == 'none' then
    redis.call('ZREM', KEYS[1], id)
  elseif kind ~= 'hash' then
    claimed[#claimed + 1] = {id, 'malformed', 0, {}}
  else
    local made = tonumber(redis.call('HGET', record, 'attempts'))
    if made == nil or made < 0 or made % 1 ~= 0 then
      claimed[#claimed + 1] = {id, 'malformed', 0, redis.call('HGETALL', record)}
    elseif made >= tonumber(ARGV[5]) then
      claimed[#claimed + 1] = {id, 'exhausted', made, redis.call('HGETALL', record)}
      redis.call('DEL', record)
      redis.call('ZREM', KEYS[1], id)
    else
      redis.call('HSET', record, 'attempts', made + 1)
      redis.call('ZADD', KEYS[1], ARGV[2], id)
      claimed[#claimed + 1] = {id, 'claimed', made + 1, redis.call('HGETALL', record)}
    end
  end
end
return claimed
"""

# Records an attempt's outcome if that attempt is still the delivery's current one (the record
# exists and its attempt count is the attempt's number): with a due time, the delivery is due
# again then; without, it is removed (delivered, or given up). Returns 1 if recorded, else 0.
#   KEYS: due set, record; ARGV: delivery id, the attempt's number, next due time ('' = remove)
_SETTLE = """
if redis.call('TYPE', KEYS[2]).ok ~= 'hash' or redis.call('HGET', KEYS[2], 'attempts') ~= ARGV[2] then
  return 0
end
if ARGV[3] == '' then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
end
return 1
"""

# Removes a delivery whatever its state (a record that does not parse).
#   KEYS: due set; ARGV: record key prefix, delivery id
_DROP = """
redis.call('DEL', ARGV[1] .. ARGV[2])
redis.call('ZREM', KEYS[1], ARGV[2])
return 1
"""


def validate_callback_url(value: tp.Optional[str]) -> tp.Optional[str]:
    """The `callback_url` form field, checked: an absolute http(s) URL, or None when absent.
    (Where it may point is checked at submission: `demix.outbound.check_public_url`.)

    Raises:
        BadRequest: (`invalid_callback_url`) not an absolute http or https URL.
    """
    if value is None or not value.strip():
        return None
    return check_url_syntax(value, "callback_url")


def signature(body: bytes, secret: str) -> str:
    """The `X-Demix-Signature` value for `body`: `sha256=` and the hex HMAC-SHA256 under `secret`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, header: str, secret: str) -> bool:
    """Whether `header` is the signature of `body` under `secret` (constant-time compare)."""
    return hmac.compare_digest(signature(body, secret), header or "")


def webhook_body(job: Job, settings: Settings) -> dict:
    """The job JSON the API shows for the finished `job`, with its links under `DEMIX_PUBLIC_URL`."""
    return job_json(job, f"{settings.effective_public_url}/v1/jobs/{job.id}",
                    retention_s=settings.retention_s, queue_position=None, now=time.time())


def backoff_s(failed_attempts: int, first_delay_s: float) -> float:
    """Wait after the `failed_attempts`-th failure: first_delay, 2x, 4x, ... at most an hour."""
    return min(first_delay_s * 2 ** min(failed_attempts - 1, 64), MAX_BACKOFF_S)  # 2**64: no float overflow


def delivery_lease_s(settings: Settings) -> float:
    """How long a claim holds a delivery: its attempt's deadline and `LEASE_MARGIN_S`."""
    return settings.webhook_timeout_s + LEASE_MARGIN_S


def delivery_life_s(settings: Settings) -> float:
    """Longest a delivery takes while senders run: every attempt's lease and every backoff."""
    attempts = max(settings.webhook_attempts, 1)
    return attempts * delivery_lease_s(settings) + sum(backoff_s(n, settings.webhook_backoff_s)
                                              for n in range(1, attempts))


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One pending webhook: where it goes, the exact bytes it sends, attempts made before this one."""
    id: str
    job_id: str
    url: str
    body: bytes
    attempts: int

    @property
    def attempt(self) -> int:
        """This attempt's number (`X-Demix-Attempt`), which is also its claim's lease token."""
        return self.attempts + 1


class WebhookQueue:
    """The pending deliveries in Redis: enqueue, claim what is due, record each outcome."""

    def __init__(self, client: redis.Redis, settings: Settings):
        self.redis = client
        self.settings = settings
        self._claim = client.register_script(_CLAIM_DUE)
        self._settle = client.register_script(_SETTLE)
        self._drop = client.register_script(_DROP)

    def on_job_finished(self, job: Job) -> None:
        """The job store's `on_finished` hook: queue a delivery if the job asked for one."""
        if job.callback_url:
            self.enqueue(job)

    def enqueue(self, job: Job) -> Delivery:
        """Queue the POST of `job`'s JSON to its `callback_url`, due now."""
        body = json.dumps(webhook_body(job, self.settings),
                          separators=(",", ":")).encode()
        delivery = Delivery(id=uuid.uuid4().hex, job_id=job.id, url=job.callback_url or "",
                            body=body, attempts=0)
        record = keys.webhook_key(delivery.id)
        pipe = self.redis.pipeline()  # MULTI: never a due id without its record
        pipe.hset(record, mapping={"job_id": delivery.job_id, "url": delivery.url, "body": delivery.body,
                                   "attempts": 0})
        pipe.expire(record, math.ceil(delivery_life_s(self.settings) + RECORD_GRACE_S))
        pipe.zadd(keys.webhooks_due_key(), {delivery.id: time.time()})
        pipe.execute()
        log.info("job %s: webhook %s queued for %s", job.id, delivery.id, delivery.url)
        return delivery

    def claim_due(self, limit: int) -> list[Delivery]:
        """Up to `limit` deliveries due now, leased to the caller until its attempt's deadline
        and `LEASE_MARGIN_S` have passed. A record that does not parse is logged and dropped."""
        now = time.time()
        claimed = self._claim(keys=[keys.webhooks_due_key()],
                              args=[now, now + delivery_lease_s(self.settings), limit, keys.webhook_key(""),
                                    self.settings.webhook_attempts])
        deliveries = []
        for raw_id, outcome, attempt, fields in claimed:
            record = dict(zip(fields[::2], fields[1::2]))
            if outcome == b"exhausted":
                log.warning("job %s: webhook %s to %s: attempt %d never reported back (its sender died "
                            "or stalled) and was the last (DEMIX_WEBHOOK_ATTEMPTS=%d); giving up",
                            _text(record.get(b"job_id")), _text(raw_id), _text(record.get(b"url")),
                            attempt, self.settings.webhook_attempts)
                continue
            try:
                if outcome != b"claimed":
                    raise ValueError("not a hash" if not record else
                                     f"attempts is {record.get(b'attempts')!r}, not a count")
                deliveries.append(delivery_from_record(raw_id, attempt, record))
            except (ValueError, BadRequest) as exc:
                log.error("webhook %s: malformed record (%s): dropped", _text(raw_id), exc)
                self._drop(keys=[keys.webhooks_due_key()], args=[keys.webhook_key(""), raw_id])
        return deliveries

    def pending(self) -> int:
        """Deliveries not yet delivered nor given up."""
        return self.redis.zcard(keys.webhooks_due_key())

    def succeeded(self, delivery: Delivery) -> None:
        """Record a 2xx answer: the delivery is done."""
        if self._settle_attempt(delivery, next_due=None):
            log.info("job %s: webhook %s delivered to %s", delivery.job_id, delivery.id, delivery.url)
        else:
            log.warning("job %s: webhook %s delivered to %s by attempt %d, after its lease had been "
                        "taken over: the receiver may see it again", delivery.job_id, delivery.id,
                        delivery.url, delivery.attempt)

    def failed(self, delivery: Delivery, reason: str) -> None:
        """Record a failed attempt: retry after a backoff, or give up after the last attempt."""
        attempt = delivery.attempt
        if attempt >= self.settings.webhook_attempts:
            if self._settle_attempt(delivery, next_due=None):
                log.warning("job %s: webhook %s to %s failed %d times (last: %s); giving up",
                            delivery.job_id, delivery.id, delivery.url, attempt, reason)
                return
        else:
            delay = backoff_s(attempt, self.settings.webhook_backoff_s)
            if self._settle_attempt(delivery, next_due=time.time() + delay):
                log.info("job %s: webhook %s to %s failed (%s); retry %d in %.1fs", delivery.job_id,
                         delivery.id, delivery.url, reason, attempt, delay)
                return
        log.info("job %s: webhook %s: attempt %d failed (%s) after its lease had been taken over "
                 "or the delivery had ended; nothing recorded", delivery.job_id, delivery.id, attempt, reason)

    def _settle_attempt(self, delivery: Delivery, next_due: tp.Optional[float]) -> bool:
        """Write the outcome of `delivery`'s attempt if it is still the current one; whether it was."""
        return self._settle(keys=[keys.webhooks_due_key(), keys.webhook_key(delivery.id)],
                            args=[delivery.id, delivery.attempt, "" if next_due is None else repr(next_due)]) == 1


def delivery_from_record(raw_id: bytes, attempt: int, record: tp.Mapping[bytes, bytes]) -> Delivery:
    """The delivery a claim returned, checked.

    Raises:
        ValueError: a field is missing or not text.
        BadRequest: its URL is not an http(s) URL.
    """
    missing = [name for name in ("job_id", "url", "body") if name.encode() not in record]
    if missing:
        raise ValueError(f"no {' and no '.join(missing)}")
    url = check_url_syntax(record[b"url"].decode(), "callback_url")
    return Delivery(id=raw_id.decode(), job_id=record[b"job_id"].decode(), url=url, body=record[b"body"],
                    attempts=attempt - 1)


def _text(value: tp.Optional[bytes]) -> str:
    """Bytes from Redis, for a log line (whatever they hold)."""
    return "?" if value is None else value.decode(errors="replace")


class AttemptDeadline:
    """The end of one attempt, `seconds` after it began: then its session is aborted
    (`OutboundSession.abort`): every connection it made is shut down (a read blocked on it
    returns at once) and a new one is refused.

    `requests`' timeout bounds each socket read, not their sum: a receiver sending its status
    line a byte a second would hold an attempt, and outlive its lease, for as long as it likes.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._passed = threading.Event()

    @property
    def passed(self) -> bool:
        return self._passed.is_set()

    @contextlib.contextmanager
    def watching(self, session: OutboundSession) -> tp.Iterator["AttemptDeadline"]:
        """Hold what `session` does inside the block to the deadline."""

        def expire() -> None:
            self._passed.set()
            session.abort()

        timer = threading.Timer(self.seconds, expire)
        timer.daemon = True
        timer.start()
        try:
            yield self
        finally:
            timer.cancel()
            timer.join()


def post_delivery(delivery: Delivery, settings: Settings) -> tp.Optional[str]:
    """Make one attempt, over within DEMIX_WEBHOOK_TIMEOUT_S whatever the receiver does;
    returns None on a 2xx answer, else why it failed.

    Redirects are not followed (a 3xx is a failure): the body is signed for the URL given.
    """
    headers = {"Content-Type": "application/json", "User-Agent": "demix-webhooks",
               DELIVERY_HEADER: delivery.id, ATTEMPT_HEADER: str(delivery.attempt)}
    if settings.webhook_secret:
        headers[SIGNATURE_HEADER] = signature(delivery.body, settings.webhook_secret)
    timeout_s = settings.webhook_timeout_s
    deadline = AttemptDeadline(timeout_s)
    try:
        with outbound_session(settings.allow_private_urls) as session, deadline.watching(session), session.post(
                delivery.url, data=delivery.body, headers=headers, allow_redirects=False,
                timeout=timeout_s, stream=True) as response:
            if 200 <= response.status_code < 300:
                return None
            return f"HTTP {response.status_code}"
    except Exception as exc:
        # At the deadline, whatever the shut-down socket made `requests` raise, or its own
        # timeout of one read if that came first.
        if deadline.passed or isinstance(exc, requests.Timeout):
            return f"no complete answer within {timeout_s:g}s (DEMIX_WEBHOOK_TIMEOUT_S)"
        if not isinstance(exc, (requests.RequestException, AddressNotAllowed)):
            raise
        refusal = connection_refusal(exc)
        return f"{refusal.code}: {refusal.message}" if refusal is not None else f"{type(exc).__name__}: {exc}"


class WebhookSender:
    """Drains the queue: claims due deliveries and POSTs them from a thread pool; says it runs
    with a heartbeat in Redis (`demix.jobs.webhook_health`)."""

    def __init__(self, queue: WebhookQueue, threads: int = SENDER_THREADS,
                 poll_interval_s: float = POLL_INTERVAL_S):
        self.queue = queue
        self.poll_interval_s = poll_interval_s
        self.id = f"{this_host()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="webhook")
        self._free = threading.Semaphore(threads)
        self._stop = threading.Event()
        self._thread: tp.Optional[threading.Thread] = None
        self._next_heartbeat = 0.0

    @property
    def running(self) -> bool:
        """Whether its claiming thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "WebhookSender":
        self._thread = threading.Thread(target=self.run, name="webhook-sender", daemon=True)
        self._thread.start()
        return self

    def ensure_running(self) -> bool:
        """Start the claiming thread again if it died (its loop survives any error, so it
        should not); returns whether it had to."""
        if self._thread is None or self._stop.is_set() or self.running:
            return False
        log.error("webhook sender: its thread died; starting it again")
        self.start()
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop claiming; attempts in flight finish or time out (unfinished ones are retried later)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(redis.RedisError):
            forget_sender(self.queue.redis, self.id)
        self.queue.redis.close()

    def run(self) -> None:
        """Claim and start due deliveries until stopped; no error ends it (each is logged)."""
        while not self._stop.is_set():
            try:
                self.heartbeat()
                claimed = self.drain_once()
            except redis.RedisError as exc:
                log.warning("webhook sender: Redis unreachable (%s); retrying in %gs", exc, ERROR_PAUSE_S)
                self._stop.wait(ERROR_PAUSE_S)
                continue
            except Exception:
                log.exception("webhook sender: unexpected error; going on in %gs", ERROR_PAUSE_S)
                self._stop.wait(ERROR_PAUSE_S)
                continue
            if not claimed:
                self._stop.wait(self.poll_interval_s)

    def heartbeat(self) -> None:
        """Record that this sender runs, every `HEARTBEAT_S`."""
        now = time.time()
        if now < self._next_heartbeat:
            return
        beat(self.queue.redis, self.id, now)
        self._next_heartbeat = now + HEARTBEAT_S

    def drain_once(self) -> int:
        """Claim as many due deliveries as there are free threads and start them; returns how many."""
        free = 0
        while self._free.acquire(blocking=False):
            free += 1
        started = 0
        try:
            for delivery in self.queue.claim_due(free) if free else []:
                self._pool.submit(self._attempt, delivery)
                started += 1
        finally:
            for _ in range(free - started):
                self._free.release()
        return started

    def _attempt(self, delivery: Delivery) -> None:
        try:
            try:
                reason = post_delivery(delivery, self.queue.settings)
            except Exception as exc:  # our bug, not the receiver's doing: a failed attempt all the same
                log.exception("webhook %s: unexpected error in attempt %d", delivery.id, delivery.attempt)
                reason = f"unexpected {type(exc).__name__}: {exc}"
            if reason is None:
                self.queue.succeeded(delivery)
            else:
                self.queue.failed(delivery, reason)
        except Exception:  # Redis unreachable: the lease brings the delivery back
            log.exception("webhook %s: the outcome of attempt %d was not recorded; it is due again when "
                          "its lease runs out", delivery.id, delivery.attempt)
        finally:
            self._free.release()


def start_sender(client: redis.Redis, settings: Settings) -> WebhookSender:
    """A sender on `client` (a connection of its own), running in a background thread."""
    return WebhookSender(WebhookQueue(client, settings)).start()
