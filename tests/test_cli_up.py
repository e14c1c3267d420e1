"""`demix up` as a user runs it: one command, a private Redis, a worker, the API under
gunicorn; a job goes through; Ctrl-C leaves no process behind."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import requests

from cli.redis_server import free_port
from tests.audio_factory import write_wav
from tests.conftest import wait_for_job

DEMIX = str(Path(sys.executable).parent / "demix")


def processes_with_marker(marker: str) -> list[int]:
    """Pids of live processes whose environment carries `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                status = (entry / "status").read_text()
                if "\nState:\tZ" not in status:  # zombies are already dead
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_demix_up_serves_a_job_and_ctrl_c_stops_everything(tiny_model_repo, tmp_path):
    marker = f"DEMIX_TEST_MARKER={uuid.uuid4().hex}"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DEMIX_REDIS_URL"}
    env.update({"DEMIX_PORT": str(port), "DEMIX_DATA_DIR": str(tmp_path / "data"),
                "DEMIX_API_WORKERS": "1", marker.split("=")[0]: marker.split("=")[1]})
    process = subprocess.Popen([DEMIX, "up"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True)
    reader.start()
    output = []
    try:
        while True:
            line = lines.get(timeout=120)
            output.append(line)
            if "demix is ready" in line:
                break
        url = f"http://127.0.0.1:{port}"
        assert url in output[-1]
        assert any("started private Redis" in line for line in output)

        path = write_wav(tmp_path / "song.wav", 32000, 1, seconds=1.0)
        with open(path, "rb") as file:
            response = requests.post(f"{url}/v1/jobs", files={"file": file}, data={"stems": "vocals"}, timeout=30)
        assert response.status_code == 202, response.text
        job = wait_for_job(url, response.json()["id"])
        assert job["status"] == "succeeded", job["error"]
        assert set(job["outputs"]) == {"vocals", "no_vocals"}
        assert len(processes_with_marker(marker)) >= 4  # up, redis, worker (+pool), gunicorn (+worker)
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
    assert processes_with_marker(marker) == []
