"""Models chosen per job, end to end: a deployment serving a tiny HT-Demucs and two tiny
RoFormers (a drum-parts BS-RoFormer and a one-source vocals Mel-Band RoFormer, written
at test time and added with `demix models add`'s code) behind the real API, real
`demix worker --models ...` processes on a Redis of their own, one queue per model.

The module's workers: one serving the HT-Demucs and the drum-parts model from the start;
the vocals model's worker is started (and stopped) by the tests that need it.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import requests

from demix.cli.processes import popen_child, stop_process
from demix.cli.redis_server import RedisServer, free_port
from testkit.synthetic_audio import write_wav
from tests.support.live import LiveServer
from tests.support.http_api import decode_result
from tests.support.demix_up import DEMIX
from testkit.tiny_models import (TINY_DRUM_PARTS, TINY_DRUMSEP, TINY_MODEL, TINY_SOURCES, TINY_VOCALS,
                                 write_tiny_repo, write_tiny_roformer)
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.timeout(900), pytest.mark.processes]

QUEUE = "routing"
MODELS = f"{TINY_MODEL},{TINY_DRUMSEP},{TINY_VOCALS}"


@dataclasses.dataclass
class Deployment:
    url: str
    env: dict
    logs: Path
    redis: RedisServer
    workers: dict[str, subprocess.Popen]

    def start_worker(self, name: str, models: str) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "ab") as log:
            process = popen_child([DEMIX, "worker", "--models", models, "--loglevel", "INFO"], env=self.env,
                                  stdout=log, stderr=subprocess.STDOUT)
        self.workers[name] = process
        return process

    def stop_worker(self, name: str) -> None:
        """Stop a worker gracefully (SIGTERM to its main process, as `docker compose stop` does)."""
        process = self.workers.pop(name)
        process.send_signal(signal.SIGTERM)
        process.wait(120)

    def models(self) -> dict[str, dict]:
        return {model["name"]: model for model in requests.get(f"{self.url}/v1/models", timeout=30).json()["models"]}

    def job(self, job_id: str) -> dict:
        return requests.get(f"{self.url}/v1/jobs/{job_id}", timeout=30).json()

    def submit(self, path: Path, **fields: str) -> requests.Response:
        with open(path, "rb") as file:
            return requests.post(f"{self.url}/v1/jobs", files={"file": file}, data=fields, timeout=60)

    def finished(self, job_id: str, timeout: float = 600) -> dict:
        return wait_for(lambda: (lambda job: job if job["status"] in ("succeeded", "failed", "cancelled")
                                 else None)(self.job(job_id)), f"job {job_id} to finish", timeout, log=self.logs)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> tp.Iterator[Deployment]:
    from demix.api import create_app
    from demix.config import Settings
    from demix.separation.weights.checkpoints import add_checkpoint

    root = tmp_path_factory.mktemp("routing")
    repo = write_tiny_repo(root / "models")  # the HT-Demucs, and the RoFormers beside it
    add_checkpoint(TINY_DRUMSEP, *write_tiny_roformer(root / "given", "bs_roformer", TINY_DRUM_PARTS), repo,
                   licence="the drum model's own terms")
    add_checkpoint(TINY_VOCALS, *write_tiny_roformer(root / "given", "mel_band_roformer", ["vocals", "other"],
                                                     target="vocals"), repo)
    logs = root / "logs"
    logs.mkdir()
    with RedisServer(root / "redis", port=free_port(), persist=False) as redis_server:
        env = {**os.environ, "DEMIX_REDIS_URL": redis_server.url, "DEMIX_DATA_DIR": str(root / "data"),
               "DEMIX_MODEL_REPO": str(repo), "DEMIX_MODELS": MODELS, "DEMIX_QUEUE": QUEUE,
               "DEMIX_TORCH_THREADS": "1", "DEMIX_LEASE_S": "6"}
        env.pop("DEMIX_WORKER_MODELS", None)
        settings = Settings.from_env(env)
        with LiveServer(create_app({"SETTINGS": settings})) as server:
            deployment = Deployment(server.url, env, logs, redis_server, {})
            deployment.start_worker("main", f"{TINY_MODEL},{TINY_DRUMSEP}")
            try:
                wait_for(lambda: deployment.models()[TINY_DRUMSEP]["available"], "the main worker to be warm",
                         timeout=300, log=logs)
                yield deployment
            finally:
                for name in list(deployment.workers):
                    stop_process(deployment.workers.pop(name), timeout=60)


def test_the_catalogue_lists_every_served_model_and_who_serves_it(deployment):
    models = deployment.models()
    assert list(models) == [TINY_MODEL, TINY_DRUMSEP, TINY_VOCALS]
    tiny, drums, vocals = models[TINY_MODEL], models[TINY_DRUMSEP], models[TINY_VOCALS]
    assert (tiny["default"], tiny["architecture"], tiny["sources"], tiny["queue"]) == \
        (True, "demucs", TINY_SOURCES, QUEUE)  # reported by the warm worker that loaded it
    assert (drums["architecture"], drums["stems"], drums["samplerate"], drums["queue"], drums["licence"]) == \
        ("bs_roformer", ["all", *TINY_DRUM_PARTS], 44100, f"{QUEUE}.{TINY_DRUMSEP}", "the drum model's own terms")
    assert drums["sha256"] and len(drums["sha256"]) == 64 and drums["origin"].startswith("added from ")
    assert (vocals["architecture"], vocals["stems"], vocals["queue"]) == \
        ("mel_band_roformer", ["all", "vocals"], f"{QUEUE}.{TINY_VOCALS}")
    assert [m["available"] for m in models.values()] == [True, True, False]
    assert [m["workers"] for m in models.values()] == [1, 1, 0]
    health = requests.get(f"{deployment.url}/healthz", timeout=30).json()
    assert (health["model"], health["models"]) == (TINY_MODEL, MODELS.split(","))


def test_a_job_for_a_roformer_separates_with_it(deployment, tmp_path):
    song = write_wav(tmp_path / "song.wav", 44100, 2, seconds=2.0)
    response = deployment.submit(song, model=TINY_DRUMSEP, stems="snare")
    assert response.status_code == 202, response.text
    job = deployment.finished(response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert (job["model"], list(job["outputs"])) == (TINY_DRUMSEP, ["snare", "no_snare"])
    stems = decode_result(requests.get(job["result_url"], timeout=60).json())
    original, _ = __import__("soundfile").read(str(song), dtype="float64", always_2d=True)
    assert np.abs(stems["snare"][0] + stems["no_snare"][0] - original).max() <= 1 / 2 ** 15
    everything = deployment.finished(deployment.submit(song, model=TINY_DRUMSEP).json()["id"])
    assert list(everything["outputs"]) == TINY_DRUM_PARTS


def test_without_a_model_the_default_one_separates(deployment, tmp_path):
    job = deployment.finished(deployment.submit(write_wav(tmp_path / "s.wav", 44100, 1, seconds=1.0)).json()["id"])
    assert (job["status"], job["model"], list(job["outputs"])) == ("succeeded", TINY_MODEL, TINY_SOURCES)


def test_a_stem_the_model_lacks_or_an_unknown_model_is_a_400_and_nothing_is_queued(deployment, tmp_path):
    import redis

    from demix import redis_keys as keys

    song = write_wav(tmp_path / "song.wav", 44100, 2, seconds=0.5)
    client = redis.Redis.from_url(deployment.redis.url)
    try:
        before = client.zcard(keys.jobs_index_key())
        lacking = deployment.submit(song, model=TINY_DRUMSEP, stems="vocals")
        assert lacking.status_code == 400 and lacking.json()["error"] == {
            "code": "invalid_stems",
            "message": f"unknown stems value 'vocals'; model '{TINY_DRUMSEP}' offers all, kick, snare, cymbals"}
        unknown = deployment.submit(song, model="htdemucs_ft")
        assert unknown.status_code == 400 and unknown.json()["error"] == {
            "code": "unknown_model",
            "message": f"unknown model 'htdemucs_ft'; this service serves {MODELS.replace(',', ', ')}"}
        assert client.zcard(keys.jobs_index_key()) == before
    finally:
        client.close()


def test_a_job_for_a_model_no_worker_serves_waits_in_its_queue_until_one_does(deployment, tmp_path):
    song = write_wav(tmp_path / "song.wav", 44100, 2, seconds=1.0)
    first, second = (deployment.submit(song, model=TINY_VOCALS, stems="vocals").json() for _ in range(2))
    assert (first["status"], first["queue_position"], second["queue_position"]) == ("queued", 1, 2)
    assert requests.get(f"{deployment.url}/healthz", timeout=30).json()["queue_length"] == 2  # every model's queue
    assert first["waiting_for"] == (f"no worker serves model '{TINY_VOCALS}' yet; the job waits in queue "
                                    f"'{QUEUE}.{TINY_VOCALS}' until one does (`demix worker --models {TINY_VOCALS}`)")
    # The other worker keeps serving its own models meanwhile.
    other = deployment.finished(deployment.submit(song, model=TINY_DRUMSEP).json()["id"])
    assert other["status"] == "succeeded" and deployment.job(first["id"])["status"] == "queued"

    deployment.start_worker("vocals", TINY_VOCALS)
    for queued in (first, second):
        job = deployment.finished(queued["id"])
        assert (job["status"], job["model"], list(job["outputs"])) == ("succeeded", TINY_VOCALS, ["vocals", "no_vocals"])
        assert job["waiting_for"] is None
    assert deployment.models()[TINY_VOCALS]["available"]


def test_a_roformer_job_reports_progress_can_be_cancelled_and_is_handed_back_by_a_stopping_worker(
        deployment, tmp_path):
    if "vocals" not in deployment.workers:
        deployment.start_worker("vocals", TINY_VOCALS)
    wait_for(lambda: deployment.models()[TINY_VOCALS]["available"], "the vocals worker", log=deployment.logs)
    long_song = write_wav(tmp_path / "long.wav", 44100, 2, seconds=60.0)

    def mid_run(job_id: str) -> dict:
        return wait_for(lambda: (lambda job: job if job["status"] == "running" and 0 < job["progress"] else None)(
            deployment.job(job_id)), f"job {job_id} mid-run", log=deployment.logs, timeout=300)

    cancelled = deployment.submit(long_song, model=TINY_VOCALS).json()["id"]
    assert mid_run(cancelled)["progress"] < 1
    assert requests.post(f"{deployment.url}/v1/jobs/{cancelled}/cancel", timeout=30).json()["status"] == "cancelled"

    handed = deployment.submit(long_song, model=TINY_VOCALS).json()["id"]
    mid_run(handed)
    deployment.stop_worker("vocals")  # a graceful stop gives the running job back to its model's queue
    job = deployment.job(handed)
    assert (job["status"], job["queue_position"], job["attempts"]) == ("queued", 1, 1)
    assert "no worker serves model" in job["waiting_for"]
    deployment.start_worker("vocals", TINY_VOCALS)
    job = deployment.finished(handed)
    assert (job["status"], job["attempts"], list(job["outputs"])) == ("succeeded", 2, ["vocals", "no_vocals"])
    assert deployment.job(cancelled)["status"] == "cancelled"


def test_a_roformer_job_whose_worker_is_killed_is_requeued_on_its_models_queue(deployment, tmp_path):
    """kill -9 of the only worker serving the model: the other worker's sweeps requeue the
    job (its lease expired) on the model's queue and forget the dead processes, so the job
    says it waits; a new worker for the model finishes it."""
    if "vocals" not in deployment.workers:
        deployment.start_worker("vocals", TINY_VOCALS)
    wait_for(lambda: deployment.models()[TINY_VOCALS]["available"], "the vocals worker", log=deployment.logs)
    job_id = deployment.submit(write_wav(tmp_path / "long.wav", 44100, 2, seconds=60.0), model=TINY_VOCALS).json()["id"]
    wait_for(lambda: (lambda job: job["status"] == "running" and job["progress"] > 0)(deployment.job(job_id)),
             "the job mid-run", log=deployment.logs)
    process = deployment.workers.pop("vocals")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(60)
    job = wait_for(lambda: (lambda job: job if job["status"] == "queued" and job["waiting_for"] else None)(
        deployment.job(job_id)), "the job requeued, waiting for a worker of its model", log=deployment.logs)
    assert (job["attempts"], job["queue_position"]) == (1, 1)
    assert not deployment.models()[TINY_VOCALS]["available"]
    deployment.start_worker("vocals", TINY_VOCALS)
    job = deployment.finished(job_id)
    assert (job["status"], job["attempts"], list(job["outputs"])) == ("succeeded", 2, ["vocals", "no_vocals"])
