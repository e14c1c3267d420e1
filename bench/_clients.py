"""Client threads for the benches that load a running service (`load.py`, `soak.py`).

Not a bench itself (the leading underscore keeps `tests/test_bench.py` from running it as
one). C threads share N job numbers: each takes numbers while any are left and submits
them (the bench says how: one try, or retried), then polls its own jobs until every one is
finished, as a client of the HTTP API would.
"""
from __future__ import annotations

import dataclasses
import threading
import time
import typing as tp

import requests

FINISHED = ("succeeded", "failed", "cancelled")
PROGRESS_EVERY_S = 30.0


@dataclasses.dataclass
class Submission:
    number: int
    job_id: tp.Optional[str] = None
    """None: the service never accepted it."""
    latency_s: float = 0.0
    """From the first try to the answer that settled it."""
    answered_at: float = 0.0
    """`time.perf_counter()` of that answer."""
    http_status: int = 0
    """Of that answer (0: none at all)."""
    tries: int = 0
    final: tp.Optional[dict] = None
    """The finished job as the API returned it, or `{"status": "gone", "attempts": 0}` when
    the service no longer knows it; None while it runs (or if the bench ran out of time)."""


Submit = tp.Callable[[requests.Session, Submission], None]
"""Submits one job, recording the outcome in the `Submission` it is given."""


class Clients:
    """`clients` threads submitting `jobs` jobs to `url` between them with `submit`, each
    then polling its own every `poll_interval_s` until they finish (or `finish_timeout_s`)."""

    def __init__(self, url: str, jobs: int, clients: int, submit: Submit, poll_interval_s: float,
                 finish_timeout_s: float = 3600.0):
        self.url, self.submit, self.poll_interval_s = url, submit, poll_interval_s
        self.finish_timeout_s = finish_timeout_s
        self.results: list[Submission] = []
        """Every submission so far, in the order they were answered."""
        self.started = 0.0
        """`time.perf_counter()` when `run` started."""
        self._lock = threading.Lock()
        self._numbers = iter(range(jobs))
        self._clients = clients

    def finished(self) -> int:
        """Jobs seen finished so far."""
        with self._lock:
            return sum(1 for s in self.results if s.final is not None)

    def run(self) -> float:
        """Run the clients to the end, printing progress; returns the seconds it took."""
        self.started = time.perf_counter()
        deadline = time.monotonic() + self.finish_timeout_s
        threads = [threading.Thread(target=self._client, args=(deadline,), daemon=True)
                   for _ in range(self._clients)]
        for thread in threads:
            thread.start()
        while alive := [thread for thread in threads if thread.is_alive()]:
            # Join one that still runs: joining one already done returns at once, and the
            # loop would print without pause until the last client ends.
            alive[0].join(PROGRESS_EVERY_S)
            with self._lock:
                submitted = len(self.results)
            print(f"  {time.perf_counter() - self.started:.0f}s: {submitted} submitted, {self.finished()} finished",
                  flush=True)
        return time.perf_counter() - self.started

    def _client(self, deadline: float) -> None:
        session = requests.Session()
        mine: list[Submission] = []
        while True:
            with self._lock:
                number = next(self._numbers, None)
            if number is None:
                break
            submission = Submission(number)
            self.submit(session, submission)
            mine.append(submission)
            with self._lock:
                self.results.append(submission)
        self._poll(session, [s for s in mine if s.job_id], deadline)

    def _poll(self, session: requests.Session, pending: list[Submission], deadline: float) -> None:
        while pending and time.monotonic() < deadline:
            for submission in pending:
                try:
                    response = session.get(f"{self.url}/v1/jobs/{submission.job_id}", timeout=60)
                except requests.RequestException:
                    break  # no answer (the API restarting): the next pass asks again
                if response.status_code == 404:
                    submission.final = {"status": "gone", "attempts": 0}
                elif response.status_code == 200 and response.json()["status"] in FINISHED:
                    submission.final = response.json()
                else:
                    # Still running (or no good answer): jobs finish roughly in submit order,
                    # so the rest of the list is later still.
                    break
            pending = [s for s in pending if s.final is None]
            if pending:
                time.sleep(self.poll_interval_s)
