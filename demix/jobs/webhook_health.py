"""Whether webhooks go out: every running webhook sender beats a heartbeat in Redis, and the
counts of live senders and of pending and overdue deliveries tell `/metrics`
(`demix.jobs.metrics`) and `demix up` when deliveries wait with no sender alive.

The heartbeats are one sorted set (sender id -> time of its last beat), so counting the live
senders is one command, not a scan of the keyspace.
"""
from __future__ import annotations

import dataclasses
import time
import typing as tp

from demix import redis_keys as keys

HEARTBEAT_S = 5.0
"""How often a running sender records in Redis that it runs."""
SENDER_LIVE_S = 30.0
"""A sender whose last heartbeat is older than this is not counted alive."""
FORGET_SENDER_S = 3600.0
"""A sender silent this long (killed: it could not say it stopped) is taken off the set."""
OVERDUE_S = 60.0
"""A delivery due this long ago and still unclaimed is overdue: no sender is alive, or all are
busy (a claimed delivery is due again only when its lease runs out)."""


@dataclasses.dataclass(frozen=True)
class WebhookHealth:
    """Senders alive, deliveries pending, and the overdue ones among them."""
    senders: int
    pending: int
    overdue: int

    @property
    def stalled(self) -> bool:
        """Deliveries are overdue and no sender is alive to make them."""
        return self.overdue > 0 and self.senders == 0


def webhook_health(client: tp.Any, now: tp.Optional[float] = None) -> WebhookHealth:
    """The senders whose heartbeat is under `SENDER_LIVE_S` old, the pending deliveries and
    those due over `OVERDUE_S` ago."""
    now = time.time() if now is None else now
    pipe = client.pipeline(transaction=False)
    pipe.zcount(keys.webhook_senders_key(), now - SENDER_LIVE_S, "+inf")
    pipe.zcard(keys.webhooks_due_key())
    pipe.zcount(keys.webhooks_due_key(), "-inf", now - OVERDUE_S)
    senders, pending, overdue = pipe.execute()
    return WebhookHealth(senders=senders, pending=pending, overdue=overdue)


def beat(client: tp.Any, sender_id: str, now: tp.Optional[float] = None) -> None:
    """Record that sender `sender_id` runs (and forget the ones long silent)."""
    now = time.time() if now is None else now
    pipe = client.pipeline(transaction=False)
    pipe.zadd(keys.webhook_senders_key(), {sender_id: now})
    pipe.zremrangebyscore(keys.webhook_senders_key(), "-inf", now - FORGET_SENDER_S)
    pipe.execute()


def forget_sender(client: tp.Any, sender_id: str) -> None:
    """Sender `sender_id` stopped: no longer counted alive."""
    client.zrem(keys.webhook_senders_key(), sender_id)
