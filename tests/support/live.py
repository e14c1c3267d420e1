"""The app over real HTTP in a thread, and waiting for a job through it."""
from __future__ import annotations

import threading
import typing as tp

from tests.support.waiting import wait_for


class LiveServer:
    """The app served over real HTTP by werkzeug in a background thread."""

    def __init__(self, app):
        from werkzeug.serving import make_server

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.thread.join(10)
        self.server.server_close()
        self.server.app.extensions["demix"].jobs.redis.close()
        # Not the Celery app's connection pool: kombu shares it between every app with the
        # same broker URL (the worker's included); the celery_worker fixture closes it.


def wait_for_job(base_url: str, job_id: str, timeout: float = 120.0,
                 on_poll: tp.Optional[tp.Callable[[dict], None]] = None) -> dict:
    """Poll a job until it is finished; returns its last JSON."""
    import requests

    last: dict = {}

    def finished() -> tp.Optional[dict]:
        last.update(requests.get(f"{base_url}/v1/jobs/{job_id}", timeout=10).json())
        if on_poll is not None:
            on_poll(dict(last))
        return dict(last) if last["status"] in ("succeeded", "failed", "cancelled") else None

    try:
        return wait_for(finished, f"job {job_id} finished", timeout=timeout)
    except AssertionError as error:
        raise AssertionError(f"{error}; last seen: {last}") from None
