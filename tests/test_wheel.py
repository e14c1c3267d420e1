"""The wheel is the product: it holds the demix package and nothing else (no tests, bench,
testkit or tools), every module and data file of it, and once installed in a fresh
virtualenv far from the source tree `demix` runs."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

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


def test_the_installed_wheel_runs_outside_the_source_tree(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = venv / "bin" / "pip"
    # torch 2.13.0's CPU build, as CI (another version would pull a CUDA build)
    subprocess.run([str(pip), "install", "-q", "torch==2.13.0", str(wheel)], check=True, timeout=1800)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
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
