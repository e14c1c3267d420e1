"""The wheel is the product: it holds the demix package and nothing else (no tests, bench,
testkit or tools), every module and data file of it, and once installed in a fresh
virtualenv far from the source tree `demix` runs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import requests

from testkit.synthetic_audio import write_wav
from tests.support.demix_up import demix_up_started
from tests.support.http_api import decode_result
from tests.support.live import wait_for_job
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.processes, pytest.mark.slow]


def package_files() -> set[str]:
    """The files of the demix package in the source tree (what the wheel must hold)."""
    return {str(path.relative_to(ROOT)) for path in (ROOT / "demix").rglob("*")
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: setuptools from this environment, no download
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT),
                    "-w", str(out)], check=True, cwd=out, timeout=600)
    (built,) = out.glob("demix-*.whl")
    return built


def test_the_wheel_holds_the_demix_package_and_only_it(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"demix"}
    assert {name for name in names if not name.split("/")[0].endswith(".dist-info")} == package_files()


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtualenv, far from the source tree, with the wheel installed."""
    venv = tmp_path_factory.mktemp("installed") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # torch 2.13.0's CPU build, as CI (another version would pull a CUDA build)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0", str(wheel)], check=True,
                   timeout=1800)
    return venv


def outside_env() -> dict[str, str]:
    """The test environment without anything that would point Python at the source tree."""
    return {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}


def test_the_installed_wheel_runs_outside_the_source_tree(installed, tmp_path):
    venv, env = installed, outside_env()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    demix = str(venv / "bin" / "demix")
    usage = subprocess.run([demix, "--help"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0, usage.stderr
    assert "usage: demix" in usage.stdout
    config = subprocess.run([demix, "config"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert config.returncode == 0, config.stderr
    assert "DEMIX_REDIS_URL=" in config.stdout
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import demix, sys; print(demix.__file__); "
                            "print(sys.path)"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert str(venv) in where.stdout.splitlines()[0] and str(ROOT) not in where.stdout, where.stdout
    module = subprocess.run([str(venv / "bin" / "python"), "-m", "demix", "--help"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=120)
    assert module.returncode == 0 and "usage: demix" in module.stdout, module.stderr


def test_a_job_runs_end_to_end_on_the_installed_wheel(installed, tiny_model_repo, tmp_path):
    """`demix up` from the installed wheel, in a folder outside the source tree: a job is
    submitted, polled and its stems downloaded."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with demix_up_started(tmp_path, demix=str(installed / "bin" / "demix"), cwd=elsewhere,
                          env=outside_env()) as (process, _marker, output):
        url = wait_for(lambda: (ready := [line for line in output if "demix is ready" in line])
                       and ready[0].split("demix is ready: ")[1].split()[0], "demix up ready", timeout=400)
        song = write_wav(tmp_path / "song.wav", 44100, 2, seconds=1.0)
        with open(song, "rb") as file:
            response = requests.post(f"{url}/v1/jobs", files={"file": file}, data={"stems": "vocals"}, timeout=60)
        assert response.status_code == 202, response.text
        job = wait_for_job(url, response.json()["id"])
        assert job["status"] == "succeeded", job["error"]
        stems = decode_result(requests.get(f"{url}/v1/jobs/{job['id']}/result", timeout=60).json())
        assert set(stems) == {"vocals", "no_vocals"}
        assert all(samples.shape == (44100, 2) and rate == 44100 for samples, rate, _ in stems.values())
        assert str(installed).encode() in Path(f"/proc/{process.pid}/cmdline").read_bytes()  # the wheel's demix
        process.send_signal(signal.SIGINT)
        assert process.wait(120) == 0, "".join(output)
