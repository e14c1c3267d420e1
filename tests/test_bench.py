"""The `bench/` scripts cannot rot: each imports as a module and answers `--help`, the
memory bench separates a short track end to end with the tiny model, and a small soak
under fire loses nothing."""
from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_"))  # _x.py: their helpers


def test_there_are_bench_scripts_to_check():
    assert {p.name for p in SCRIPTS} >= {"compare_demucs.py", "intake.py", "memory.py", "service_overhead.py", "soak.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_a_bench_script_imports_and_answers_help(script, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # as an import would (dataclasses look it up)
    spec.loader.exec_module(module)  # runs its imports: a moved or renamed name fails here
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exited:
        module.main()
    assert exited.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.timeout(600)
def test_the_memory_bench_runs_end_to_end_on_a_short_track(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / "memory.py"), "--minutes", "0.05",
                           "--skip-whole-track", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "streaming" in done.stdout and "peak RSS" in done.stdout


@pytest.mark.timeout(600)
def test_the_intake_bench_runs_end_to_end_on_a_short_track(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / "intake.py"), "--minutes", "0.1",
                           "--separation-minutes", "0.05", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for row in ("MP3/MPEG_LAYER_III", "MP4/AAC_LC", "FLAC/PCM_16", "WAV/PCM_16"):
        assert row in done.stdout
    assert "intake/separation" in done.stdout and "peak/before" in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_small_soak_under_fire_loses_nothing_runs_nothing_twice_and_fails_nothing(tmp_path):
    """100 jobs from 20 clients while a warm worker is killed after every 20 finished jobs and
    Redis once (after the second kill): strikes follow the jobs, not the clock, so a fast
    machine meets them too. `bench/soak.py` compares every job's stems with a reference."""
    done = subprocess.run([sys.executable, str(BENCH / "soak.py"), "--jobs", "100", "--clients", "20",
                           "--kill-every-jobs", "20", "--redis-kills", "1",
                           "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    report = done.stdout + done.stderr[-3000:]
    assert done.returncode == 0, report
    figures = re.search(r"accepted (\d+), succeeded (\d+), failed (\d+), lost (\d+), run twice (\d+)", done.stdout)
    assert figures is not None, report
    assert figures.groups() == ("100", "100", "0", "0", "0"), report
    kills = ast.literal_eval(re.search(r"kills: (\{.*\})", done.stdout).group(1))
    assert kills.get("redis") == 1, report
    assert kills.get("pool process", 0) + kills.get("whole worker", 0) >= 2, report
