"""docker-compose.yml runs only commands this project provides, wired to one broker."""
from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
from pathlib import Path

import yaml

from cli.argv import api_argv, worker_argv
from cli.main import build_parser
from shared.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def demix_commands() -> set[str]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    return set(subparsers.choices)


def test_every_service_runs_a_command_the_project_provides():
    services = compose()["services"]
    assert set(services) == {"redis", "api", "worker", "grpc", "flower"}
    assert services["redis"]["image"].startswith("redis:")
    assert services["redis"]["command"][0] == "redis-server"
    for name in ("api", "worker", "grpc", "flower"):
        service = services[name]
        assert service["build"] == "."
        command = service["command"]
        if command[0] == "demix":
            assert command[1] in demix_commands(), command
        else:
            assert command[0] == "celery" and "flower" in command
            assert shutil.which("celery", path=str(Path(sys.executable).parent))
            app_module = command[command.index("--app") + 1]
            assert hasattr(importlib.import_module(app_module), "celery_app")
            assert importlib.util.find_spec("flower") is not None
    assert services["api"]["command"] == ["demix", "api"]
    assert services["worker"]["command"] == ["demix", "worker"]
    assert services["grpc"]["command"] == ["demix", "grpc"]


def test_all_services_share_one_broker_and_api_and_worker_share_storage():
    services = compose()["services"]
    urls = {services[name]["environment"]["DEMIX_REDIS_URL"] for name in ("api", "worker", "grpc", "flower")}
    assert urls == {"redis://redis:6379/0"}
    def data_volume(name):
        return [v for v in services[name]["volumes"] if v.endswith(":/data")]
    assert data_volume("api") == data_volume("worker") == data_volume("grpc") != []
    assert services["api"]["environment"]["DEMIX_HOST"] == "0.0.0.0"


def test_the_image_installs_the_project_and_its_entry_points():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("api", "worker", "shared", "cli", "grpc_api"):
        assert f"COPY {package} ./{package}" in dockerfile
    assert "pip install ." in dockerfile
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'demix = "cli.main:main"' in pyproject
    assert 'grpc_api = ["*.proto"]' in pyproject  # the proto ships with the package


def test_the_worker_sends_task_events_and_the_api_runs_under_gunicorn():
    settings = Settings.from_env({})
    worker = worker_argv(settings)
    assert worker[1:4] == ["-m", "celery", "--app"] and "--task-events" in worker
    assert worker[worker.index("--queues") + 1] == settings.queue
    api = api_argv(settings)
    assert api[1:3] == ["-m", "gunicorn"] and api[-1] == "api:create_app()"
    assert api[api.index("--bind") + 1] == "127.0.0.1:8000"
