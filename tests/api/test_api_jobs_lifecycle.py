"""Cancel and delete over real HTTP, with a real Celery worker running a tiny HT-Demucs:
queued jobs never start, running ones stop at their next segment and the worker takes
the next job; deleted jobs leave no record and no file behind."""
from __future__ import annotations

import time

import requests

from demix import redis_keys as keys
from demix.storage.local import JobStorage
from testkit.synthetic_audio import write_wav
from tests.support.waiting import wait_for
from tests.support.live import wait_for_job

LONG_SECONDS = 40.0
"""Long enough for the tiny model to still be running when the test acts (minutes on a
loaded CI machine), short enough to upload quickly."""


def submit(base_url: str, path) -> dict:
    with open(path, "rb") as file:
        response = requests.post(f"{base_url}/v1/jobs", files={"file": ("song.wav", file, "audio/wav")},
                                 timeout=60)
    assert response.status_code == 202, response.text
    return response.json()


def get(base_url: str, job_id: str) -> requests.Response:
    return requests.get(f"{base_url}/v1/jobs/{job_id}", timeout=10)


def wait_running(base_url: str, job_id: str) -> dict:
    return wait_for(lambda: (job := get(base_url, job_id).json())["status"] == "running" and job,
                    what=f"job {job_id} running", timeout=120.0)


def running_and_queued(base_url: str, tmp_path) -> tuple[dict, dict]:
    """A long job the worker is running, and a short one queued behind it."""
    running = submit(base_url, write_wav(tmp_path / "long.wav", 44100, 2, LONG_SECONDS))
    wait_running(base_url, running["id"])
    return running, submit(base_url, write_wav(tmp_path / "short.wav", 44100, 2, 0.5))


def test_cancel_a_queued_and_a_running_job_then_the_worker_takes_the_next(live_server, tmp_path, settings,
                                                                        redis_client):
    url, storage = live_server.url, JobStorage(settings.data_dir)
    long_job, queued = running_and_queued(url, tmp_path)
    assert get(url, queued["id"]).json()["status"] == "queued"  # behind the long job

    response = requests.post(f"{url}/v1/jobs/{queued['id']}/cancel", timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled" and response.json()["finished_at"]
    assert not storage.job_dir(queued["id"]).exists()

    cancelled_at = time.monotonic()
    response = requests.post(f"{url}/v1/jobs/{long_job['id']}/cancel", timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert not redis_client.exists(keys.lease_key(long_job["id"]))

    # The worker survives the cancelled run and takes the next job.
    after = submit(url, write_wav(tmp_path / "after.wav", 44100, 2, 0.5))
    assert wait_for_job(url, after["id"], timeout=300)["status"] == "succeeded"
    print(f"cancel of a running job to the next job done: {time.monotonic() - cancelled_at:.1f}s")

    final = get(url, long_job["id"]).json()
    assert final["status"] == "cancelled" and final["outputs"] is None
    # The run stopped early and removed what it had written.
    assert not storage.job_dir(long_job["id"]).exists()
    never_started = get(url, queued["id"]).json()
    assert never_started["status"] == "cancelled"
    assert never_started["started_at"] is None and never_started["attempts"] == 0

    response = requests.get(f"{url}/v1/jobs/{long_job['id']}/result", timeout=10)
    assert response.status_code == 409 and response.json()["error"]["code"] == "job_cancelled"


def test_cancel_of_a_finished_job_is_409_and_unknown_jobs_are_404(live_server, tmp_path):
    url = live_server.url
    job = submit(url, write_wav(tmp_path / "in.wav", 44100, 2, 0.5))
    assert wait_for_job(url, job["id"])["status"] == "succeeded"
    response = requests.post(f"{url}/v1/jobs/{job['id']}/cancel", timeout=10)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "job_finished"
    assert response.json()["error"]["status"] == "succeeded"
    assert get(url, job["id"]).json()["status"] == "succeeded"

    for method, path in (("post", "/cancel"), ("delete", "")):
        response = requests.request(method, f"{url}/v1/jobs/{'0' * 32}{path}", timeout=10)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_delete_queued_running_and_finished_jobs_leaves_nothing(live_server, tmp_path, settings,
                                                                redis_client):
    url, storage = live_server.url, JobStorage(settings.data_dir)
    running, queued = running_and_queued(url, tmp_path)

    for job in (queued, running):
        response = requests.delete(f"{url}/v1/jobs/{job['id']}", timeout=10)
        assert response.status_code == 204 and response.content == b""
        assert get(url, job["id"]).status_code == 404
        # The running job's worker may still be writing until its next segment; whatever it
        # wrote after the delete, it removes itself when it stops.
        wait_for(lambda: not storage.job_dir(job["id"]).exists(), f"job {job['id']}'s folder gone",
                 timeout=60.0)

    finished = submit(url, write_wav(tmp_path / "finished.wav", 44100, 2, 0.5))
    assert wait_for_job(url, finished["id"], timeout=300)["status"] == "succeeded"
    assert storage.job_dir(finished["id"]).exists()
    assert requests.delete(f"{url}/v1/jobs/{finished['id']}", timeout=10).status_code == 204
    assert get(url, finished["id"]).status_code == 404
    assert requests.get(f"{url}/v1/jobs/{finished['id']}/stems.zip", timeout=10).status_code == 404
    assert requests.delete(f"{url}/v1/jobs/{finished['id']}", timeout=10).status_code == 404

    # The worker ran `finished` after the deleted run stopped; nothing of them came back.
    for job in (queued, running, finished):
        assert not storage.job_dir(job["id"]).exists()
        assert not redis_client.exists(keys.job_key(job["id"]), keys.lease_key(job["id"]))
        assert not redis_client.sismember(keys.running_jobs_key(), job["id"])
