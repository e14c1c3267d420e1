"""The worker's background process (`demix.worker.background`): the maintenance sweeps and the
webhook sender, beside a worker's main process and never in it; restarted when it dies,
stopped with the worker, and gone when the worker is killed outright."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import socket
import time
import typing as tp

import pytest
import redis

from demix import redis_keys as keys
from demix.config import Settings
from demix.jobs.records import Job, JobStatus
from demix.host_processes import process_is_gone
from demix.readiness import mark_ready
from demix.jobs.webhooks import WebhookQueue
from tests.support.service_state import database_url
from tests.support.waiting import wait_for
from tests.support.webhook_receiver import WebhookReceiver
from demix.worker.background import BackgroundProcess

pytestmark = pytest.mark.processes


@pytest.fixture
def own_db(redis_server, monkeypatch, settings) -> tp.Iterator[redis.Redis]:
    """Database 2 of the test Redis, which the background processes started here use (they
    read DEMIX_REDIS_URL): the session's worker has its own on database 0."""
    url = database_url(redis_server, 2)
    monkeypatch.setenv("DEMIX_REDIS_URL", url)
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def due_webhook(client: redis.Redis, settings: Settings, url: str, job_id: str) -> None:
    """A delivery due now, as the job store queues one for a finished job."""
    now = time.time()
    job = Job(id=job_id, status=JobStatus.SUCCEEDED, stems="vocals", model="tiny", samplerate=44100,
              channels=2, frames=44100, created_at=now - 5, started_at=now - 4, finished_at=now,
              progress=1.0, outputs=["vocals", "no_vocals"], output={"format": "flac"}, callback_url=url)
    WebhookQueue(client, settings).enqueue(job)


def test_the_background_process_sweeps_and_sends_webhooks_is_restarted_and_stops(own_db, settings, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    mark_ready(own_db, {"model": "tiny"}, worker=f"{socket.gethostname()}:{dead.pid}")
    background = BackgroundProcess()
    caplog.set_level(logging.INFO, logger="demix.worker.background")
    with WebhookReceiver([200, 200]) as receiver:
        background.start()
        try:
            first = background.process
            # Its sweeps run: a dead pool process's readiness entry goes.
            wait_for(lambda: not own_db.hexists(keys.warm_workers_key(), f"{socket.gethostname()}:{dead.pid}"),
                     "the dead process's readiness entry swept", timeout=60)
            # Its sender runs: a due webhook is delivered.
            due_webhook(own_db, settings, receiver.url, "before-the-kill")
            [posted] = receiver.wait_for(1, timeout=60)
            assert json.loads(posted.body)["id"] == "before-the-kill"
            os.kill(first.pid, signal.SIGKILL)
            first.wait(10)
            background.check()
            assert background.process is not first and background.process.poll() is None
            assert background.restarts == 1
            assert f"the background process (pid {first.pid}) exited with -9; starting it again" in caplog.text
            due_webhook(own_db, settings, receiver.url, "after-the-kill")
            assert [json.loads(hook.body)["id"] for hook in receiver.wait_for(2, timeout=60)][1] == "after-the-kill"
        finally:
            process = background.process
            background.stop()
    assert process.poll() is not None and process.returncode == 0  # stopped on SIGTERM, not killed


def test_the_background_process_ends_when_its_worker_is_killed_outright():
    """Linux's parent-death signal: no background process outlives its worker, even one
    killed with SIGKILL (which runs no clean-up)."""
    code = ("import os, subprocess, time\n"
            "from demix.worker.background import background_argv\n"
            "child = subprocess.Popen(background_argv(os.getpid()))\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(600)\n")
    worker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        background_pid = int(worker.stdout.readline())
        wait_for(lambda: _started(background_pid), "the background process running", timeout=60)
        worker.kill()
        worker.wait(10)
        wait_for(lambda: process_is_gone(background_pid), "the background process gone", timeout=30)
    finally:
        worker.kill()
        worker.wait()
        worker.stdout.close()


def _started(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return b"demix.worker.background" in cmdline.read()
    except OSError:
        return False
