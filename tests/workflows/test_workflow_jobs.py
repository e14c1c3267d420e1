"""Workflow jobs end to end: the real API, real `demix worker` processes on a Redis of their
own, a tiny HT-Demucs and two tiny one-source vocals RoFormers (Mel-Band and BS, random
weights), one queue per model.

What a workflow returns is checked against the engine run by hand on the same samples: an
ensemble equals MSST's semantics (`demix.separation.ensemble.ensemble_arrays`, itself checked
against a whole-array reference in tests/separation/test_ensemble.py) and a chained step
equals its model run by hand on the stem the step before gave.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import typing as tp
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import requests
import soundfile as sf

from demix.cli.processes import popen_child, stop_process
from demix.cli.redis_server import RedisServer, free_port
from testkit.synthetic_audio import write_wav
from testkit.tiny_models import TINY_MODEL, TINY_VOCALS, write_tiny_repo, write_tiny_roformer
from tests.support.demix_up import DEMIX
from tests.support.live import LiveServer
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.timeout(900), pytest.mark.processes]

TINY_VOCALS_BS = "tiny_vocals_bs"
MODELS = f"{TINY_MODEL},{TINY_VOCALS},{TINY_VOCALS_BS}"
QUEUE = "flows"

CHAIN = {"steps": [{"name": "voc", "input": "mix", "models": [TINY_VOCALS, TINY_VOCALS_BS],
                    "ensemble": "avg_fft", "weights": [2, 1]},
                   {"name": "band", "input": "voc/no_vocals", "models": [TINY_MODEL]}],
         "outputs": {"vocals": "voc/vocals", "instrumental": "voc/no_vocals", "drums": "band/drums",
                     "bass": "band/bass", "other": "band/other"}}


@dataclasses.dataclass
class Deployment:
    url: str
    env: dict
    root: Path
    repo: Path
    workers: dict[str, subprocess.Popen]

    def start_worker(self, name: str, models: str = MODELS) -> subprocess.Popen:
        with open(self.root / "logs" / f"{name}.log", "ab") as log:
            process = popen_child([DEMIX, "worker", "--models", models, "--loglevel", "INFO"], env=self.env,
                                  stdout=log, stderr=subprocess.STDOUT)
        self.workers[name] = process
        return process

    def job(self, job_id: str) -> dict:
        return requests.get(f"{self.url}/v1/jobs/{job_id}", timeout=30).json()

    def submit(self, path: Path, workflow: tp.Any, **fields: str) -> requests.Response:
        with open(path, "rb") as file:
            return requests.post(f"{self.url}/v1/jobs", files={"file": file},
                                 data={"workflow": json.dumps(workflow), **fields}, timeout=60)

    def finished(self, job_id: str, timeout: float = 600) -> dict:
        return wait_for(lambda: (lambda job: job if job["status"] in ("succeeded", "failed", "cancelled")
                                 else None)(self.job(job_id)), f"job {job_id} to finish", timeout,
                        log=self.root / "logs")

    def stems(self, job: dict) -> dict[str, np.ndarray]:
        return {name: sf.read(io.BytesIO(requests.get(url, timeout=60).content), dtype="float32",
                              always_2d=True)[0]
                for name, url in job["outputs"].items()}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> tp.Iterator[Deployment]:
    from demix.api import create_app
    from demix.config import Settings
    from demix.separation.weights.checkpoints import add_checkpoint

    root = tmp_path_factory.mktemp("workflows")
    repo = write_tiny_repo(root / "models")
    add_checkpoint(TINY_VOCALS, *write_tiny_roformer(root / "given", "mel_band_roformer", ["vocals", "other"],
                                                     target="vocals"), repo)
    add_checkpoint(TINY_VOCALS_BS, *write_tiny_roformer(root / "given", "bs_roformer", ["vocals", "other"],
                                                        target="vocals", seed=1), repo)
    (root / "logs").mkdir()
    with RedisServer(root / "redis", port=free_port(), persist=False) as redis_server:
        env = {**os.environ, "DEMIX_REDIS_URL": redis_server.url, "DEMIX_DATA_DIR": str(root / "data"),
               "DEMIX_MODEL_REPO": str(repo), "DEMIX_MODELS": MODELS, "DEMIX_QUEUE": QUEUE,
               "DEMIX_TORCH_THREADS": "1", "DEMIX_LEASE_S": "6",
               # The result cache on (the session turns it off): every test but the cache's
               # own sends a song of a length no other test sends, so its models run.
               "DEMIX_CACHE_MB": "512"}
        env.pop("DEMIX_WORKER_MODELS", None)
        with LiveServer(create_app({"SETTINGS": Settings.from_env(env)})) as server:
            deployment = Deployment(server.url, env, root, repo, {})
            deployment.start_worker("all")
            try:
                wait_for(lambda: all(model["available"] for model in requests.get(
                    f"{server.url}/v1/models", timeout=30).json()["models"]), "the worker to be warm",
                    timeout=300, log=root / "logs")
                yield deployment
            finally:
                for name in list(deployment.workers):
                    stop_process(deployment.workers.pop(name), timeout=60, sig=signal.SIGKILL)


def by_hand(deployment: Deployment, model_name: str, path: Path) -> dict[str, np.ndarray]:
    """The engine run in this process on a float32 WAV, as a run of a workflow runs it."""
    import torch

    from demix.audio.io import read_info
    from demix.audio.output_formats import default_output
    from demix.separation import ModelCache, ModelSpec, SeparationOptions, separate_file
    from testkit.memory_sink import MemorySink

    torch.set_num_threads(1)  # as the workers: the same sums in the same order
    model = ModelCache().get(ModelSpec(model_name, str(deployment.repo), "cpu",
                                       cache=str(deployment.root / "data" / "models")))
    sink = MemorySink()
    separate_file(model, path, "all", sink, SeparationOptions(device="cpu"), output=default_output(read_info(path)))
    return {name: sink.stem(name) for name in sink.formats}


def float_wav(path: Path, samples: np.ndarray) -> Path:
    sf.write(path, samples, 44100, subtype="FLOAT")
    return path


def test_a_chain_of_an_ensemble_and_a_model_equals_the_engine_run_by_hand(deployment, tmp_path):
    from demix.separation.ensemble import ensemble_arrays

    mix = write_wav(tmp_path / "mix.wav", 44100, 2, 3.3, subtype="FLOAT")
    response = deployment.submit(mix, CHAIN)
    assert response.status_code == 202, response.text
    job = deployment.finished(response.json()["id"])
    assert job["status"] == "succeeded", job
    stems = deployment.stems(job)
    assert set(stems) == {"vocals", "instrumental", "drums", "bass", "other"}

    # Step 1: each vocals model on the mix, their avg_fft ensemble weighted 2:1, and its complement.
    mix_samples = sf.read(mix, dtype="float32", always_2d=True)[0]
    runs = [by_hand(deployment, model, mix) for model in (TINY_VOCALS, TINY_VOCALS_BS)]
    vocals = ensemble_arrays([run["vocals"].T for run in runs], "avg_fft", [2, 1]).T.astype(np.float32)
    assert np.abs(stems["vocals"] - vocals).max() <= 1e-5
    assert np.array_equal(stems["instrumental"], mix_samples - stems["vocals"])
    # Step 2: the Demucs model by hand on the stem step 1 gave: the very same samples.
    band = by_hand(deployment, TINY_MODEL, float_wav(tmp_path / "instrumental.wav", stems["instrumental"]))
    for name in ("drums", "bass", "other"):
        assert np.array_equal(stems[name], band[name]), name

    steps = job["workflow"]["steps"]
    assert [(step["name"], step["status"], step["progress"]) for step in steps] == [
        ("voc", "succeeded", 1.0), ("band", "succeeded", 1.0)]
    assert [run["model"] for run in steps[0]["runs"]] == [TINY_VOCALS, TINY_VOCALS_BS]
    assert all(run["status"] == "succeeded" and run["attempts"] == 1 for step in steps for run in step["runs"])
    assert (job["progress"], job["model"], job["workflow"]["outputs"]) == (1.0, "workflow", CHAIN["outputs"])
    spec = requests.get(f"{deployment.url}/openapi.json", timeout=30).json()
    jsonschema.validate(job, spec["components"]["schemas"]["Job"])


def test_the_shipped_presets_run_with_the_served_models(deployment, tmp_path):
    listed = {preset["name"]: preset for preset in
              requests.get(f"{deployment.url}/v1/workflows", timeout=30).json()["workflows"]}
    assert listed["best_vocals"]["models"] == [{"name": name, "served": True, "workers": 1}
                                               for name in (TINY_MODEL, TINY_VOCALS, TINY_VOCALS_BS)]
    assert listed["vocals_then_band"]["available"] and listed["vocals_then_band"]["workflow"]["steps"][1] == \
        {"name": "band", "input": "vocals/no_vocals", "models": [TINY_MODEL]}
    mix = write_wav(tmp_path / "mix.wav", 44100, 2, 2.0)
    for preset, stems in (("best_vocals", {"vocals", "instrumental"}),
                          ("vocals_then_band", {"vocals", "drums", "bass", "other"})):
        with open(mix, "rb") as file:
            submitted = requests.post(f"{deployment.url}/v1/jobs", files={"file": file}, data={"preset": preset},
                                      timeout=60)
        assert submitted.status_code == 202, submitted.text
        job = deployment.finished(submitted.json()["id"])
        assert job["status"] == "succeeded" and set(job["outputs"]) == stems, job
        assert job["output"]["sample_format"] == "pcm16"  # the input's own format, as for any job


def test_a_workers_kill_9_mid_workflow_redoes_only_the_run_it_was_running(deployment, tmp_path):
    mix = write_wav(tmp_path / "mix.wav", 44100, 2, 90.0, subtype="FLOAT")
    workflow = {"steps": [{"name": "voc", "models": [TINY_VOCALS]},
                          {"name": "band", "input": "voc/no_vocals", "models": [TINY_MODEL]}]}
    job_id = deployment.submit(mix, workflow).json()["id"]

    def band_mid_run() -> tp.Optional[dict]:
        run = deployment.job(job_id)["workflow"]["steps"][1]["runs"][0]
        return run if run["status"] == "running" and 0 < run["progress"] < 0.5 else None

    wait_for(band_mid_run, "the chained run to be under way", timeout=600, log=deployment.root / "logs")
    os.killpg(deployment.workers["all"].pid, signal.SIGKILL)
    deployment.workers.pop("all").wait(30)
    deployment.start_worker("all")
    job = deployment.finished(job_id)
    assert job["status"] == "succeeded", job
    voc, band = job["workflow"]["steps"]
    assert voc["runs"][0]["attempts"] == 1  # finished before the kill: never run again
    assert band["runs"][0]["attempts"] == 2  # the killed run, and the run that finished it


def test_cancelling_a_workflow_stops_every_run_and_keeps_no_file(deployment, tmp_path):
    from demix.storage.local import job_key
    from demix.workflows.runs import unit_id

    mix = write_wav(tmp_path / "mix.wav", 44100, 2, 60.0, subtype="FLOAT")
    job_id = deployment.submit(mix, CHAIN).json()["id"]
    wait_for(lambda: any(run["status"] == "running" for run in deployment.job(job_id)["workflow"]["steps"][0]["runs"]),
             "a run to start", timeout=300, log=deployment.root / "logs")
    response = requests.post(f"{deployment.url}/v1/jobs/{job_id}/cancel", timeout=30)
    assert response.status_code == 200, response.text
    job = deployment.job(job_id)
    assert job["status"] == "cancelled"
    assert {run["status"] for step in job["workflow"]["steps"] for run in step["runs"]} <= {"cancelled", "waiting"}
    units = ["voc", f"voc/{TINY_VOCALS}", f"voc/{TINY_VOCALS_BS}", "band", f"band/{TINY_MODEL}", "outputs"]
    folders = [deployment.root / "data" / job_key(job_id)] + \
        [deployment.root / "data" / job_key(unit_id(job_id, unit)) for unit in units]
    wait_for(lambda: not any(folder.exists() for folder in folders), "every file of the job and its runs to go",
             timeout=120, log=deployment.root / "logs")
    # The worker is free again: a plain job after it runs.
    with open(mix, "rb") as file:
        plain = requests.post(f"{deployment.url}/v1/jobs", files={"file": file}, timeout=60).json()
    assert deployment.finished(plain["id"])["status"] == "succeeded"


def test_a_workflows_runs_are_not_jobs_of_the_api(deployment, tmp_path):
    from demix.workflows.runs import unit_id

    mix = write_wav(tmp_path / "mix.wav", 44100, 2, 1.0, subtype="FLOAT")
    job = deployment.finished(deployment.submit(mix, {"steps": [{"name": "v", "models": [TINY_VOCALS]}]}).json()["id"])
    assert job["status"] == "succeeded" and set(job["outputs"]) == {"vocals", "no_vocals"}
    run_id = unit_id(job["id"], f"v/{TINY_VOCALS}")
    assert requests.get(f"{deployment.url}/v1/jobs/{run_id}", timeout=30).status_code == 404
    assert requests.post(f"{deployment.url}/v1/jobs/{run_id}/cancel", timeout=30).status_code == 404


def test_a_json_body_runs_a_workflow_on_a_url_input(deployment, tmp_path):
    from tests.support.file_server import FileServer

    mix = write_wav(tmp_path / "mix.flac", 44100, 2, 2.0, subtype="PCM_16", format="FLAC")
    workflow = {"steps": [{"name": "voc", "models": [TINY_VOCALS, TINY_VOCALS_BS], "ensemble": "max_wave"}]}
    with FileServer() as files:
        files.routes["/song.flac"] = (200, {"Content-Type": "audio/flac"}, mix.read_bytes())
        response = requests.post(f"{deployment.url}/v1/jobs", json={"url": f"{files.base}/song.flac",
                                                                   "workflow": workflow, "format": "flac"}, timeout=60)
        assert response.status_code == 202, response.text
        submitted = response.json()
        assert (submitted["stage"], submitted["samplerate"]) == ("downloading", 0)
        job = deployment.finished(submitted["id"])
    assert job["status"] == "succeeded", job
    assert (job["samplerate"], job["channels"], job["input_format"], job["output"]["format"]) == \
        (44100, 2, "FLAC/PCM_16", "flac")
    assert set(job["outputs"]) == {"vocals", "no_vocals"}
    assert job["download"]["received_bytes"] == mix.stat().st_size
    stems = deployment.stems(job)
    assert stems["vocals"].shape == (88200, 2)


def test_a_json_body_is_refused_clearly_when_it_is_not_an_object_of_fields(deployment):
    for body, words in (("[1]", "a JSON body is an object"), ("{", "not valid JSON"),
                        ('{"url": "https://example.test/a.wav", "model": {"x": 1}}', "model: expected a string")):
        response = requests.post(f"{deployment.url}/v1/jobs", data=body, headers={"Content-Type": "application/json"},
                                 timeout=30)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json", response.text
        assert words in response.json()["error"]["message"]


def test_a_long_run_of_a_workflow_is_split_into_parts_on_the_workers(deployment, tmp_path):
    """A run longer than DEMIX_SPLIT_S runs as parts and a merge, as a long plain job does
    (here on a worker whose split length is 2 s; the module's worker is back afterwards)."""
    from demix.workflows.runs import unit_id

    stop_process(deployment.workers.pop("all"), timeout=60)
    split_worker = dataclasses.replace(deployment, env={**deployment.env, "DEMIX_SPLIT_S": "2"})
    split_worker.start_worker("split")
    try:
        mix = write_wav(tmp_path / "mix.wav", 44100, 2, 25.0, subtype="FLOAT")
        workflow = {"steps": [{"name": "voc", "models": [TINY_VOCALS]},
                              {"name": "band", "input": "voc/no_vocals", "models": [TINY_MODEL]}]}
        job = deployment.finished(deployment.submit(mix, workflow).json()["id"])
        assert job["status"] == "succeeded", job
        run_id = unit_id(job["id"], f"band/{TINY_MODEL}")
        log = (deployment.root / "logs" / "split.log").read_text()
        assert f"job {run_id} attempt 1: split into parts, sent to the workers" in log
        parts = re.search(f"job {run_id} succeeded on attempt 1 from ([0-9]+) parts", log)
        assert parts and int(parts.group(1)) >= 2, log[-2000:]
        assert set(job["outputs"]) == {"drums", "bass", "other", "vocals"}
    finally:
        stop_process(split_worker.workers.pop("split"), timeout=60)
        deployment.start_worker("all")


def test_a_repeated_workflow_and_a_plain_job_on_its_song_are_served_from_the_result_cache(deployment, tmp_path):
    mix = write_wav(tmp_path / "mix.wav", 44100, 2, 4.5, subtype="FLOAT", seed=7)
    first, second = (deployment.finished(deployment.submit(mix, CHAIN).json()["id"]) for _ in range(2))
    bypass = deployment.finished(deployment.submit(mix, CHAIN, cache="false").json()["id"])
    for job, cached in ((first, False), (second, True), (bypass, False)):
        assert job["status"] == "succeeded", job
        assert [run["cached"] for step in job["workflow"]["steps"] for run in step["runs"]] == [cached] * 3
    stems = [deployment.stems(job) for job in (first, second, bypass)]
    for name in stems[0]:
        assert np.array_equal(stems[0][name], stems[1][name]) and np.array_equal(stems[0][name], stems[2][name])
    # Plain jobs on the song asking `vocals` (+ `no_vocals`) in PCM16 of a model a workflow ran
    # on it: a one-source RoFormer (step 1 of the chain) and the 4-stem Demucs (run here).
    band = {"steps": [{"name": "band", "models": [TINY_MODEL]}]}
    assert deployment.finished(deployment.submit(mix, band).json()["id"])["status"] == "succeeded"
    for model in (TINY_VOCALS, TINY_MODEL):
        with open(mix, "rb") as file:
            plain = requests.post(f"{deployment.url}/v1/jobs", files={"file": file}, timeout=60,
                                  data={"model": model, "stems": "vocals", "sample_format": "pcm16"}).json()
        plain = deployment.finished(plain["id"])
        assert plain["status"] == "succeeded" and plain["cached"] is True, plain
        assert set(plain["outputs"]) == {"vocals", "no_vocals"}
