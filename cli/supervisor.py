"""`demix up`: the whole service in one command.

Starts a private Redis (unless `DEMIX_REDIS_URL` names one), one worker and the API,
prints the URL once both answer, and on Ctrl-C stops them in order (API first, so no
new job arrives; then the worker, which hands its running job back to the queue;
Redis last, which flushes its append-only file) leaving no process behind.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
import typing as tp
import urllib.request

from shared.config import Settings

from .processes import popen_child, stop_process
from .redis_server import RedisServer

READY_TIMEOUT_S = 300.0  # includes the worker's model load and warm-up
WORKER_STOP_TIMEOUT_S = 30.0
API_STOP_TIMEOUT_S = 10.0


class ServiceFailed(RuntimeError):
    """A part of the service did not start or died."""


@dataclasses.dataclass
class Service:
    settings: Settings
    redis: tp.Optional[RedisServer] = None
    worker: tp.Optional[subprocess.Popen] = None
    api: tp.Optional[subprocess.Popen] = None
    redis_url: str = ""
    worker_started_at: float = 0.0

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    def start(self, echo: tp.Callable[[str], None] = print) -> None:
        if self.settings.redis_url:
            self.redis_url = self.settings.redis_url
            echo(f"using Redis at {self.redis_url}")
        else:
            self.redis = RedisServer(self.settings.data_dir / "redis", persist=True).start()
            self.redis_url = self.redis.url
            echo(f"started private Redis ({self.redis.binary}) on port {self.redis.port}")
        env = {**os.environ, "DEMIX_REDIS_URL": self.redis_url}
        if not self.settings.model_repo:
            self._ensure_model(env, echo)
        self.worker_started_at = time.time()
        self.worker = popen_child([sys.executable, "-m", "cli.main", "worker"], env=env)
        self.api = popen_child([sys.executable, "-m", "cli.main", "api"], env=env)
        self._wait_ready()

    def _ensure_model(self, env: dict, echo: tp.Callable[[str], None]) -> None:
        """Fetch the model into the local cache before the first job needs it, with a
        progress bar here rather than a silent wait inside the worker."""
        pull = popen_child([sys.executable, "-m", "cli.main", "models", "pull", "--if-missing"], env=env)
        try:
            returncode = pull.wait()
        finally:
            stop_process(pull, timeout=5)  # on Ctrl-C mid-download
        if returncode != 0:
            echo(f"warning: model {self.settings.model!r} is not available yet; jobs will fail "
                 "with a message saying how to provide weights")

    def _wait_ready(self) -> None:
        from shared.celery_app import make_celery

        pinger = make_celery(dataclasses.replace(self.settings, redis_url=self.redis_url))
        deadline = time.monotonic() + READY_TIMEOUT_S
        api_ready = worker_ready = False
        while time.monotonic() < deadline and not (api_ready and worker_ready):
            self.check_alive()
            api_ready = api_ready or _http_ok(self.url + "/healthz")
            # Ready = answering pings and done loading and warming its model.
            worker_ready = worker_ready or (bool(pinger.control.ping(timeout=0.5))
                                            and _worker_warm(self.redis_url, self.worker_started_at))
            if not (api_ready and worker_ready):
                time.sleep(0.2)
        if not (api_ready and worker_ready):
            missing = " and ".join(n for n, ok in (("API", api_ready), ("worker", worker_ready)) if not ok)
            raise ServiceFailed(f"the {missing} did not become ready within {READY_TIMEOUT_S:.0f}s")

    def check_alive(self) -> None:
        for name, process in (("worker", self.worker), ("API", self.api),
                              ("Redis", self.redis.process if self.redis else None)):
            if process is not None and process.poll() is not None:
                raise ServiceFailed(f"the {name} exited with code {process.returncode}")

    def stop(self) -> None:
        if self.api is not None:
            stop_process(self.api, API_STOP_TIMEOUT_S)
        if self.worker is not None:
            # SIGTERM is Celery's warm shutdown; a job still running after the timeout is
            # killed and, never acknowledged, is redelivered when a worker next starts.
            stop_process(self.worker, WORKER_STOP_TIMEOUT_S)
        if self.redis is not None:
            self.redis.stop()


def _worker_warm(redis_url: str, since: float) -> bool:
    """Whether a worker process started after `since` has warmed its model (`shared.readiness`)."""
    import redis

    from shared.readiness import ready_workers

    try:
        with redis.Redis.from_url(redis_url, socket_timeout=2) as client:
            return bool(ready_workers(client, since))
    except redis.RedisError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except Exception:
        return False


def run_up(settings: Settings) -> int:
    """Run the service until Ctrl-C or SIGTERM; returns the process exit code."""
    service = Service(settings)

    def request_stop(_signum: int, _frame: tp.Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, request_stop)
    try:
        service.start()
        print(f"demix is ready: {service.url}  (POST {service.url}/v1/jobs; Ctrl-C stops)", flush=True)
        while True:
            service.check_alive()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping demix ...", flush=True)
        return 0
    except ServiceFailed as exc:
        print(f"demix up failed: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        service.stop()
        print("demix stopped", flush=True)
