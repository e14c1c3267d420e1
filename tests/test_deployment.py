"""docker-compose.yml runs only commands this project provides, wired to one broker."""
from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

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


MONITORING = {"prometheus", "grafana"}
"""The services of the `monitoring` profile; the others run by default."""


def test_every_service_runs_a_command_the_project_provides():
    services = compose()["services"]
    assert set(services) == {"redis", "api", "worker", "grpc", "flower"} | MONITORING
    assert {name for name, service in services.items() if "profiles" in service} == MONITORING
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


# -- the `monitoring` profile: Prometheus scraping the API, Grafana with the dashboard ------------

def mounts(service: dict) -> dict[str, Path]:
    """A service's bind mounts of project files: path in the container -> file here."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            found[target] = ROOT / source
    return found


def test_the_monitoring_profile_runs_prometheus_and_grafana_from_the_files_in_deploy():
    services = compose()["services"]
    for name in MONITORING:
        assert services[name]["profiles"] == ["monitoring"]
        assert all(path.exists() for path in mounts(services[name]).values()), mounts(services[name])
    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:")
    config_path = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    assert mounts(prometheus)[config_path] == ROOT / "deploy/prometheus/prometheus.yml"
    assert services["grafana"]["image"].startswith("grafana/grafana:")


def test_prometheus_scrapes_the_apis_metrics_endpoint():
    services = compose()["services"]
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (targets,) = [static["targets"] for static in job["static_configs"]]
    port = services["api"]["environment"]["DEMIX_PORT"]
    assert targets == [f"api:{port}"]
    assert f"{port}:{port}" in services["api"]["ports"]


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard():
    grafana = compose()["services"]["grafana"]
    mounted = mounts(grafana)
    provisioning = mounted["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards/demix.yml").read_text())["providers"]
    dashboards_dir = provider["options"]["path"]
    in_container = [target for target, path in mounted.items() if path == DASHBOARD]
    assert [str(Path(target).parent) for target in in_container] == [dashboards_dir]
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == in_container[0]
    # Every panel reads the provisioned data source.
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == panel["datasource"]["uid"] == source["uid"]


DASHBOARD = ROOT / "deploy/grafana/demix.json"


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


def series_in(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana's range variable as a range)."""
    import promql_parser

    found: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.add(node.name)
        for child in ("expr", "lhs", "rhs", "param", "vector_selector"):
            if getattr(node, child, None) is not None:
                walk(getattr(node, child))
        for arg in getattr(node, "args", None) or []:
            walk(arg)

    walk(promql_parser.parse(expr.replace("$__rate_interval", "5m")))
    return found


def exported_series(metrics_text: str) -> dict[str, set[str]]:
    """Metric family -> the series names it exposes, from a scrape."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {family.name: {family.name + suffix for suffix in suffixes[family.type]}
            for family in text_string_to_metric_families(metrics_text)}


def test_a_series_name_is_read_from_each_kind_of_query():
    assert series_in("histogram_quantile(0.5, sum by (le) (rate(a_bucket[$__rate_interval])))") == {"a_bucket"}
    assert series_in("rate(a_sum[5m]) / rate(b_count[5m])") == {"a_sum", "b_count"}
    assert series_in('sum by (code) (increase(c_total{code="x"}[1h]))') == {"c_total"}


def test_every_dashboard_query_reads_a_series_the_service_exports_and_every_one_is_shown(idle_server):
    """Scraped from the running app: each panel's PromQL parses and names only real series,
    and no exported metric family is left off the dashboard."""
    response = requests.get(f"{idle_server.url}/metrics", timeout=30)
    assert response.status_code == 200
    exported = exported_series(response.text)
    every_series = set().union(*exported.values())
    shown = set().union(*(series_in(expr) for expr in queries()))
    assert shown, "the dashboard has no queries"
    assert shown <= every_series, f"not exported: {sorted(shown - every_series)}"
    assert {name for name, series in exported.items() if series & shown} == set(exported)


def test_the_dashboard_shows_what_an_operator_watches():
    titles = {panel["title"] for panel in dashboard()["panels"]}
    assert {"Queue length", "Running jobs", "Job rate by outcome", "Job duration", "Audio per job",
            "Requeues by reason", "Disk free"} <= titles
    panel_ids = [panel["id"] for panel in dashboard()["panels"]]
    assert len(panel_ids) == len(set(panel_ids))


def test_a_worker_consumes_the_queues_of_the_models_it_serves():
    settings = Settings.from_env({"DEMIX_MODELS": "htdemucs,htdemucs_6s,mel_band_roformer_kim"})
    every = worker_argv(settings)
    assert every[every.index("--queues") + 1] == "demix,demix.htdemucs_6s,demix.mel_band_roformer_kim"
    some = worker_argv(Settings.from_env({"DEMIX_MODELS": "htdemucs,htdemucs_6s,mel_band_roformer_kim",
                                          "DEMIX_WORKER_MODELS": "mel_band_roformer_kim"}))
    assert some[some.index("--queues") + 1] == "demix.mel_band_roformer_kim"


def test_demix_worker_refuses_models_the_deployment_does_not_serve(capsys):
    from cli.main import main

    assert main(["worker", "--models", "htdemucs_ft"]) == 2
    assert "names htdemucs_ft, which DEMIX_MODELS" in capsys.readouterr().err
