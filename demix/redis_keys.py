"""Every Redis key name the service uses, in one place."""
from __future__ import annotations

PREFIX = "demix"


def job_key(job_id: str) -> str:
    """Hash holding one job's record."""
    return f"{PREFIX}:job:{job_id}"


def jobs_index_key() -> str:
    """Sorted set of job ids scored by creation time (newest last)."""
    return f"{PREFIX}:jobs"


def idempotency_key(owner: str, key_digest: str) -> str:
    """String holding the job id a submit's `Idempotency-Key` (as a sha256 digest) created,
    per owner (the API key's owner; one shared owner without API keys)."""
    return f"{PREFIX}:idempotency:{owner}:{key_digest}"


def running_jobs_key() -> str:
    """Set of the ids of jobs in state `running` (the lease sweep walks it)."""
    return f"{PREFIX}:running"


def lease_key(job_id: str) -> str:
    """String `"<attempt> <holder>"` with a TTL: the running attempt's lease on the job."""
    return f"{PREFIX}:lease:{job_id}"


def worker_stopping_key(node: str) -> str:
    """Set while the Celery worker `node` shuts down: its running jobs hand themselves back."""
    return f"{PREFIX}:stopping:{node}"


def metrics_counters_key() -> str:
    """Hash of service-wide counters (`submitted`, `succeeded`, `failed:<code>`, ...)."""
    return f"{PREFIX}:metrics:counters"


def metrics_histogram_key(name: str) -> str:
    """Hash of one histogram: a count per bucket bound (`+Inf` too), `count` and `sum`."""
    return f"{PREFIX}:metrics:histogram:{name}"


def queued_jobs_key(queue: str) -> str:
    """Sorted set of the ids of jobs in state `queued` for Celery queue `queue`, scored by
    the time each entered the queue: a job's rank is its place in the queue."""
    return f"{PREFIX}:queued:{queue}"


def owner_active_jobs_key(owner: str) -> str:
    """Set of the ids of an API key owner's jobs that may still be queued or running
    (finished ones are pruned when the owner submits)."""
    return f"{PREFIX}:owner:{owner}:active"


def webhooks_due_key() -> str:
    """Sorted set of pending webhook delivery ids scored by when each is next due (epoch s)."""
    return f"{PREFIX}:webhooks:due"


def webhook_key(delivery_id: str) -> str:
    """Hash holding one pending webhook delivery: its job id, URL, body and attempts so far
    (claims made; the last one's number is its lease token), expiring after its life."""
    return f"{PREFIX}:webhook:{delivery_id}"


def webhook_senders_key() -> str:
    """Sorted set of webhook sender ids (`<host>:<pid>:<random>`) scored by the time of each
    one's last heartbeat (epoch s): the senders alive are the recent ones."""
    return f"{PREFIX}:webhooks:senders"


def queue_keys(queue: str) -> list[str]:
    """The lists kombu's Redis transport keeps a Celery queue in, one per priority step.

    kombu stores priority 0 under the queue's own name and the other steps under
    `<queue>\\x06\\x16<priority>`; counting all of them gives the true backlog.
    """
    return [queue] + [f"{queue}\x06\x16{priority}" for priority in (3, 6, 9)]


def broker_unacked_key() -> str:
    """Hash kombu's Redis transport keeps the messages delivered to workers in until they are
    acknowledged: delivery tag -> JSON `[message, exchange, routing key]`."""
    return "unacked"


def broker_unacked_index_key() -> str:
    """Sorted set of the delivery tags in `broker_unacked_key`, scored by delivery time (epoch s)."""
    return "unacked_index"


def split_key(job_id: str) -> str:
    """Hash of a split job's parts: its attempt, part count, each part's state, windows
    done and tries, and what its Celery message carried (to send it again)."""
    return f"{PREFIX}:split:{job_id}"


def split_jobs_key() -> str:
    """Set of the ids of jobs whose parts are in flight (the part sweep walks it)."""
    return f"{PREFIX}:splits"


def unit_lease_key(job_id: str, unit: str) -> str:
    """String `"<attempt> <holder>"` with a TTL: the lease of one part (`part:<n>`) or of
    the merge (`merge`) of a split job, held by the process running it."""
    return f"{PREFIX}:lease:{job_id}:{unit}"


def job_children_key(job_id: str) -> str:
    """Set of the ids of a workflow job's child jobs (its runs); they live and die with it."""
    return f"{PREFIX}:children:{job_id}"


def workflows_key() -> str:
    """Set of the ids of workflow jobs not finished yet (the workflow sweep advances them)."""
    return f"{PREFIX}:workflows"


def cache_entry_key(entry: str) -> str:
    """Hash of one result cache entry (`demix.jobs.result_cache`): its model, sources, frames,
    rate, channels and byte size."""
    return f"{PREFIX}:cache:entry:{entry}"


def cache_recency_key() -> str:
    """Sorted set of result cache entry keys scored by when each was last stored or used (epoch s)."""
    return f"{PREFIX}:cache:recency"


def cache_sizes_key() -> str:
    """Hash from result cache entry key to its size in bytes (their sum is the cache's size)."""
    return f"{PREFIX}:cache:sizes"


def cache_entry_jobs_key(entry: str) -> str:
    """Set of the ids of the jobs that stored or used a result cache entry; an entry no job
    refers to any more is deleted."""
    return f"{PREFIX}:cache:jobs:{entry}"


def job_cache_entries_key(job_id: str) -> str:
    """Set of the result cache entry keys a job stored or used (released when it is deleted)."""
    return f"{PREFIX}:cache:of:{job_id}"


def warm_workers_key() -> str:
    """Hash from worker process id (`<host>:<pid>`) to a JSON note written when that
    process has loaded and warmed its model (see `demix.readiness`)."""
    return f"{PREFIX}:workers:warm"
