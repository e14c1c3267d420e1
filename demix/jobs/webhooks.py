"""Webhooks: when a job with a `callback_url` finishes, POST its JSON there.

A finished job's delivery is written to Redis (a hash per delivery, and a sorted set of
delivery ids by when each is next due) by the job store's `on_finished` hook, which only
writes to Redis and so never makes a separation wait for a receiver. A `WebhookSender`
(in every worker's background process, `demix.worker.background`) claims due deliveries, POSTs
them from a thread pool (one hanging receiver holds one thread, not the others), and
reschedules failures with exponential backoff until `DEMIX_WEBHOOK_ATTEMPTS` is reached.

A claim moves the delivery's due time a lease into the future instead of removing it,
so a sender that dies mid-delivery loses nothing: the delivery becomes due again when
the lease runs out. Receivers may therefore see a delivery more than once; its
`X-Demix-Delivery` id stays the same across attempts, so they can ignore repeats.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import hmac
import json
import logging
import threading
import time
import typing as tp
import uuid

import redis
import requests

from demix import redis_keys as keys
from demix.config import Settings
from demix.errors import AddressNotAllowed
from demix.jobs.job_json import job_json
from demix.jobs.records import Job
from demix.outbound import MAX_URL_LENGTH, check_url_syntax, connection_refusal, outbound_session

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Demix-Signature"
"""`sha256=<hex of HMAC-SHA256(DEMIX_WEBHOOK_SECRET, body)>`."""
DELIVERY_HEADER = "X-Demix-Delivery"
"""The delivery's id, the same on every attempt: receivers can drop repeats by it."""
ATTEMPT_HEADER = "X-Demix-Attempt"
"""1 for the first attempt, 2 for the first retry, ..."""

MAX_CALLBACK_URL_LENGTH = MAX_URL_LENGTH
MAX_BACKOFF_S = 3600.0
"""Longest wait between two attempts, whatever DEMIX_WEBHOOK_BACKOFF_S and the attempt count."""
LEASE_MARGIN_S = 30.0
"""How long past its timeout a claimed delivery stays claimed before another sender may retry it."""
SENDER_THREADS = 8
"""Deliveries one sender makes at once."""
POLL_INTERVAL_S = 0.5
"""How often an idle sender looks for due deliveries."""

_CLAIM_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return due
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
    return min(first_delay_s * 2 ** (failed_attempts - 1), MAX_BACKOFF_S)


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One pending webhook: where it goes, the exact bytes it sends, attempts made so far."""
    id: str
    job_id: str
    url: str
    body: bytes
    attempts: int


class WebhookQueue:
    """The pending deliveries in Redis: enqueue, claim what is due, record each outcome."""

    def __init__(self, client: redis.Redis, settings: Settings):
        self.redis = client
        self.settings = settings
        self._claim = client.register_script(_CLAIM_DUE)

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
        pipe = self.redis.pipeline()  # MULTI: never a due id without its record
        pipe.hset(keys.webhook_key(delivery.id),
                  mapping={"job_id": delivery.job_id, "url": delivery.url, "body": delivery.body,
                           "attempts": 0})
        pipe.zadd(keys.webhooks_due_key(), {delivery.id: time.time()})
        pipe.execute()
        log.info("job %s: webhook %s queued for %s", job.id, delivery.id, delivery.url)
        return delivery

    def claim_due(self, limit: int) -> list[Delivery]:
        """Up to `limit` deliveries due now, leased to the caller until its attempt times out."""
        now = time.time()
        lease_until = now + self.settings.webhook_timeout_s + LEASE_MARGIN_S
        ids = self._claim(keys=[keys.webhooks_due_key()], args=[now, lease_until, limit])
        deliveries = []
        for raw_id in ids:
            delivery_id = raw_id.decode()
            record = self.redis.hgetall(keys.webhook_key(delivery_id))
            if not record:  # the record is gone: drop the orphaned id
                self.redis.zrem(keys.webhooks_due_key(), delivery_id)
                continue
            deliveries.append(Delivery(id=delivery_id, job_id=record[b"job_id"].decode(),
                                       url=record[b"url"].decode(), body=record[b"body"],
                                       attempts=int(record[b"attempts"])))
        return deliveries

    def pending(self) -> int:
        """Deliveries not yet delivered nor given up on."""
        return self.redis.zcard(keys.webhooks_due_key())

    def succeeded(self, delivery: Delivery) -> None:
        self._forget(delivery)

    def failed(self, delivery: Delivery, reason: str) -> None:
        """Record a failed attempt: retry after a backoff, or give up after the last attempt."""
        attempts = delivery.attempts + 1
        if attempts >= self.settings.webhook_attempts:
            log.warning("job %s: webhook %s to %s failed %d times (last: %s); giving up",
                        delivery.job_id, delivery.id, delivery.url, attempts, reason)
            self._forget(delivery)
            return
        delay = backoff_s(attempts, self.settings.webhook_backoff_s)
        log.info("job %s: webhook %s to %s failed (%s); retry %d in %.1fs", delivery.job_id,
                 delivery.id, delivery.url, reason, attempts, delay)
        pipe = self.redis.pipeline()
        pipe.hset(keys.webhook_key(delivery.id), "attempts", attempts)
        pipe.zadd(keys.webhooks_due_key(), {delivery.id: time.time() + delay})
        pipe.execute()

    def _forget(self, delivery: Delivery) -> None:
        pipe = self.redis.pipeline()
        pipe.zrem(keys.webhooks_due_key(), delivery.id)
        pipe.delete(keys.webhook_key(delivery.id))
        pipe.execute()


def post_delivery(delivery: Delivery, settings: Settings) -> tp.Optional[str]:
    """Make one attempt; returns None on a 2xx answer, else why it failed.

    Redirects are not followed (a 3xx is a failure): the body is signed for the URL given.
    """
    headers = {"Content-Type": "application/json", "User-Agent": "demix-webhooks",
               DELIVERY_HEADER: delivery.id, ATTEMPT_HEADER: str(delivery.attempts + 1)}
    if settings.webhook_secret:
        headers[SIGNATURE_HEADER] = signature(delivery.body, settings.webhook_secret)
    try:
        with outbound_session(settings.allow_private_urls) as session, session.post(
                delivery.url, data=delivery.body, headers=headers, allow_redirects=False,
                timeout=settings.webhook_timeout_s, stream=True) as response:
            if 200 <= response.status_code < 300:
                return None
            return f"HTTP {response.status_code}"
    except (requests.RequestException, AddressNotAllowed) as exc:
        refusal = connection_refusal(exc)
        return f"{refusal.code}: {refusal.message}" if refusal is not None else f"{type(exc).__name__}: {exc}"


class WebhookSender:
    """Drains the queue: claims due deliveries and POSTs them from a thread pool."""

    def __init__(self, queue: WebhookQueue, threads: int = SENDER_THREADS,
                 poll_interval_s: float = POLL_INTERVAL_S):
        self.queue = queue
        self.poll_interval_s = poll_interval_s
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="webhook")
        self._free = threading.Semaphore(threads)
        self._threads = threads
        self._stop = threading.Event()
        self._thread: tp.Optional[threading.Thread] = None

    def start(self) -> "WebhookSender":
        self._thread = threading.Thread(target=self.run, name="webhook-sender", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop claiming; attempts in flight finish or time out (unfinished ones are retried later)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.queue.redis.close()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                claimed = self.drain_once()
            except redis.RedisError as exc:
                log.warning("webhook sender: Redis unreachable (%s); retrying", exc)
                claimed = 0
            if not claimed:
                self._stop.wait(self.poll_interval_s)

    def drain_once(self) -> int:
        """Claim as many due deliveries as there are free threads and start them; returns how many."""
        free = 0
        while self._free.acquire(blocking=False):
            free += 1
        deliveries = self.queue.claim_due(free) if free else []
        for _ in range(free - len(deliveries)):
            self._free.release()
        for delivery in deliveries:
            self._pool.submit(self._attempt, delivery)
        return len(deliveries)

    def _attempt(self, delivery: Delivery) -> None:
        try:
            reason = post_delivery(delivery, self.queue.settings)
            if reason is None:
                log.info("job %s: webhook %s delivered to %s", delivery.job_id, delivery.id, delivery.url)
                self.queue.succeeded(delivery)
            else:
                self.queue.failed(delivery, reason)
        except Exception:  # never let one delivery kill the pool; its lease brings it back
            log.exception("webhook %s: unexpected error", delivery.id)
        finally:
            self._free.release()


def start_sender(client: redis.Redis, settings: Settings) -> WebhookSender:
    """A sender on `client` (a connection of its own), running in a background thread."""
    return WebhookSender(WebhookQueue(client, settings)).start()
