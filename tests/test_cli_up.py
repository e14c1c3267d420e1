"""`demix up` as a user runs it: one command, a private Redis, a worker, the API under
gunicorn; jobs go through; Ctrl-C leaves no process behind."""
from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import typing as tp
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests

from cli.redis_server import free_port
from tests.audio_factory import write_wav
from tests.conftest import wait_for_job
from tests.reference import demucs_separate
from tests.test_api_jobs import decode_result

DEMIX = str(Path(sys.executable).parent / "demix")


def processes_with_marker(marker: str) -> list[int]:
    """Pids of live processes whose environment carries `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                if "\nState:\tZ" not in (entry / "status").read_text():  # zombies are already dead
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


@contextlib.contextmanager
def demix_up(tmp_path: Path, ready_timeout: float = 120, **settings: str) -> tp.Iterator[tuple[str, list, str]]:
    """Run `demix up` with a fresh data dir until the block ends, then Ctrl-C it and
    check it exits 0 leaving no process behind. Yields (url, output lines, marker)."""
    marker_value = uuid.uuid4().hex
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DEMIX_REDIS_URL"}
    env.update({"DEMIX_PORT": str(port), "DEMIX_DATA_DIR": str(tmp_path / "data"),
                "DEMIX_API_WORKERS": "1", "DEMIX_TEST_MARKER": marker_value, **settings})
    process = subprocess.Popen([DEMIX, "up"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True)
    reader.start()
    output: list = []
    try:
        while not output or "demix is ready" not in output[-1]:
            output.append(lines.get(timeout=ready_timeout))
        yield f"http://127.0.0.1:{port}", output, marker_value
    finally:
        process.send_signal(signal.SIGINT)
        try:
            returncode = process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        finally:
            reader.join(10)
            process.stdout.close()
    output.extend(lines.queue)
    assert returncode == 0, "".join(output)
    assert processes_with_marker(marker_value) == []


def test_demix_up_serves_a_job_and_ctrl_c_stops_everything(tiny_model_repo, tmp_path):
    with demix_up(tmp_path) as (url, output, marker):
        assert url in output[-1]
        assert any("started private Redis" in line for line in output)
        # Ready only once the worker's pool process has loaded and warmed the model.
        assert any(" warm on cpu in fp32 " in line for line in output[:-1]), "".join(output)
        path = write_wav(tmp_path / "song.wav", 32000, 1, seconds=1.0)
        with open(path, "rb") as file:
            response = requests.post(f"{url}/v1/jobs", files={"file": file}, data={"stems": "vocals"}, timeout=30)
        assert response.status_code == 202, response.text
        job = wait_for_job(url, response.json()["id"])
        assert job["status"] == "succeeded", job["error"]
        assert set(job["outputs"]) == {"vocals", "no_vocals"}
        assert len(processes_with_marker(marker)) >= 4  # up, redis, worker (+pool), gunicorn (+worker)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fresh_demix_up_serves_real_htdemucs_exactly_like_demucs(tmp_path):
    """No weights anywhere, no configuration: `demix up` fetches htdemucs itself (the npm
    route here) and its stems equal `demucs.separate`'s with the same weights."""
    path = write_wav(tmp_path / "song.wav", 44100, 2, seconds=10.0, subtype="FLOAT", seed=11)
    with demix_up(tmp_path, ready_timeout=900, DEMIX_MODEL_REPO="", DEMIX_MODEL="htdemucs") as (url, output, _):
        with open(path, "rb") as file:
            job_id = requests.post(f"{url}/v1/jobs", files={"file": file}, timeout=30).json()["id"]
        job = wait_for_job(url, job_id, timeout=900)
        assert job["status"] == "succeeded", job["error"]
        got = decode_result(requests.get(job["result_url"], timeout=60).json())
    assert any("model htdemucs is ready" in line for line in output), "".join(output)
    expected = demucs_separate(path, tmp_path / "data" / "models", "htdemucs", tmp_path / "ref")
    assert sorted(got) == sorted(expected) == ["bass", "drums", "other", "vocals"]
    for name, reference in expected.items():
        assert np.abs(got[name][0] - reference).max() < 1e-4, name
