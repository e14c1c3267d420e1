"""The app over real HTTP in a thread, and waiting for a job through it."""
from __future__ import annotations

import dataclasses
import threading
import typing as tp

from tests.support.waiting import wait_for


class LiveServer:
    """The app served over real HTTP by the service's own front (`demix.api.front`, as
    `demix api` serves it) in a background thread."""

    def __init__(self, app):
        from demix.api.front import make_server

        settings = app.config["SETTINGS"]
        self.app = app
        self.server = make_server(app, dataclasses.replace(settings, host="127.0.0.1", port=0))
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        self.thread = threading.Thread(target=self.server.run, name="demix-front", daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        from demix.api.front import close_server

        self.server.stop()
        self.thread.join(10)
        close_server(self.server)
        self.app.extensions["demix"].jobs.redis.close()
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
