"""docker-compose.yml and deploy/kubernetes/ run only commands this project provides, with
its real settings, ports and probe paths, wired to one broker (and, for the S3 profile and
the cluster manifests, to one bucket and no shared volume)."""
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

from demix.cli.argv import api_argv, flower_argv, worker_argv
from demix.cli.main import build_parser
from demix.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def demix_commands() -> set[str]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    return set(subparsers.choices)


MONITORING = {"prometheus", "grafana"}
"""The services of the `monitoring` profile; the others run by default."""
S3_SERVICES = ("api-s3", "worker-s3", "grpc-s3")


def test_every_service_runs_a_command_the_project_provides():
    services = compose()["services"]
    assert set(services) == {"redis", "api", "worker", "grpc", "flower", "s3", *S3_SERVICES} | MONITORING
    assert {name for name, service in services.items() if "profiles" in service} == MONITORING | {"s3", *S3_SERVICES}
    assert services["redis"]["image"].startswith("redis:")
    assert services["redis"]["command"][0] == "redis-server"
    for name in ("api", "worker", "grpc", "flower"):
        service = services[name]
        assert service["build"] == "."
        command = service["command"]
        assert command[0] == "demix" and command[1] in demix_commands(), command
    assert services["api"]["command"] == ["demix", "api"]
    assert services["worker"]["command"] == ["demix", "worker"]
    assert services["grpc"]["command"] == ["demix", "grpc"]
    assert services["flower"]["command"] == ["demix", "flower"]
    for name in S3_SERVICES:
        assert services[name]["command"] == services[name.removesuffix("-s3")]["command"]


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
    assert "COPY demix ./demix" in dockerfile and "pip wheel --no-deps . -w /wheels" in dockerfile
    assert 'pip install "$(ls /wheels/demix-*.whl)[s3]"' in dockerfile  # the wheel; boto3 for DEMIX_STORAGE=s3://
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'demix = "demix.cli.main:main"' in pyproject
    assert '"demix.grpc_api" = ["*.proto"]' in pyproject  # the proto ships with the package


def test_the_worker_sends_task_events_and_the_api_runs_behind_its_front():
    settings = Settings.from_env({})
    worker = worker_argv(settings)
    assert worker[1:4] == ["-m", "celery", "--app"] and "--task-events" in worker
    assert worker[worker.index("--queues") + 1] == settings.queue
    api = api_argv(settings)
    assert api[1:] == ["-m", "demix.api.front"]  # it reads DEMIX_HOST and DEMIX_PORT itself
    assert api_argv(settings, threads=4)[1:] == ["-m", "demix.api.front", "--threads", "4"]


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
    from demix.cli.main import main

    assert main(["worker", "--models", "htdemucs_ft"]) == 2
    assert "names htdemucs_ft, which DEMIX_MODELS" in capsys.readouterr().err


def setting_names() -> set[str]:
    return {name for name, _default, _doc in Settings.describe()}


def test_the_s3_profile_shares_no_volume_and_points_every_service_at_one_bucket():
    services = compose()["services"]
    assert services["s3"]["profiles"] == ["s3"] and services["s3"]["command"][0] == "mini"
    s3_volumes = {volume.split(":")[0] for volume in services["s3"]["volumes"]}
    environments = []
    for name in S3_SERVICES:
        service = services[name]
        assert service["profiles"] == ["s3"]
        assert "volumes" not in service, f"{name} must share nothing but Redis and the bucket"
        assert "s3" in service["depends_on"] and "redis" in service["depends_on"]
        environment = service["environment"]
        assert {key for key in environment if key.startswith("DEMIX_")} <= setting_names()
        assert environment["DEMIX_STORAGE"].startswith("s3://")
        assert environment["DEMIX_S3_ENDPOINT_URL"] == "http://s3:8333"  # weed mini's S3 port
        environments.append(environment)
    assert len({(e["DEMIX_STORAGE"], e["DEMIX_QUEUE"], e["DEMIX_REDIS_URL"]) for e in environments}) == 1
    # Its own queue: the local stack's workers must never take a job whose input is in the bucket.
    assert environments[0]["DEMIX_QUEUE"] != services["worker"]["environment"].get("DEMIX_QUEUE", "demix")
    bucket = environments[0]["DEMIX_STORAGE"][len("s3://"):].split("/")[0]
    assert f"-bucket={bucket}" in services["s3"]["command"]
    for name in ("api", "worker", "grpc"):
        assert not s3_volumes & {volume.split(":")[0] for volume in services[name].get("volumes", [])}


KUBERNETES = ROOT / "deploy" / "kubernetes"


def manifests() -> list[dict]:
    documents = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def of_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in manifests() if doc["kind"] == kind}


def containers(deployment: dict) -> list[dict]:
    return deployment["spec"]["template"]["spec"]["containers"]


def test_the_manifests_cover_the_api_grpc_flower_workers_redis_and_the_bucket_settings():
    deployments = of_kind("Deployment")
    commands = {name: containers(d)[0]["command"] for name, d in deployments.items()}
    assert commands["demix-api"] == ["demix", "api"] and commands["demix-grpc"] == ["demix", "grpc"]
    assert commands["demix-worker-cpu"] == commands["demix-worker-gpu"] == ["demix", "worker"]
    assert commands["redis"][0] == "redis-server"
    assert commands["demix-flower"] == ["demix", "flower"]
    config = of_kind("ConfigMap")["demix-config"]["data"]
    assert config["DEMIX_STORAGE"].startswith("s3://") and "DEMIX_S3_ENDPOINT_URL" in config
    secret = of_kind("Secret")["demix-s3-credentials"]["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret)


def test_demix_flower_runs_celerys_flower_for_the_services_app():
    [program, *argv] = flower_argv(Settings())
    assert program == sys.executable and argv[:2] == ["-m", "celery"]
    app_module = argv[argv.index("--app") + 1]
    assert hasattr(importlib.import_module(app_module), "celery_app") and "flower" in argv
    assert importlib.util.find_spec("flower") is not None


def test_flower_gets_its_login_from_the_operator_in_compose_and_kubernetes():
    """Flower lists every job: with API keys it needs DEMIX_FLOWER_AUTH (or keeps to loopback),
    and both recipes hand the operator's login to it, in its environment."""
    services = compose()["services"]
    assert services["flower"]["environment"]["DEMIX_FLOWER_AUTH"] == "${DEMIX_FLOWER_AUTH:-}"
    # The keys reach Flower as they reach the API: it applies the same rule.
    for name in ("api", "flower", "grpc", "api-s3", "grpc-s3"):
        assert services[name]["environment"]["DEMIX_API_KEYS"] == "${DEMIX_API_KEYS:-}", name
    [flower] = containers(of_kind("Deployment")["demix-flower"])
    secrets = [source["secretRef"]["name"] for source in flower["envFrom"] if "secretRef" in source]
    assert any("DEMIX_FLOWER_AUTH" in of_kind("Secret")[name]["stringData"] for name in secrets)
    assert "FLOWER_BASIC_AUTH" not in json.dumps([compose(), of_kind("Deployment")])  # only through demix flower


def test_the_workers_probes_ask_the_worker_itself():
    from demix.cli.main import build_parser

    for name in ("demix-worker-cpu", "demix-worker-gpu"):
        [worker] = containers(of_kind("Deployment")[name])
        for probe, check in (("livenessProbe", "live"), ("readinessProbe", "ready")):
            command = worker[probe]["exec"]["command"]
            assert command == ["demix", "worker-probe", check]
            build_parser().parse_args(command[1:])  # a command `demix` has, with a check it knows


def test_every_command_variable_and_reference_in_the_manifests_is_real():
    config_maps, secrets = of_kind("ConfigMap"), of_kind("Secret")
    for config in config_maps.values():
        assert set(config["data"]) <= setting_names(), set(config["data"]) - setting_names()
        Settings.from_env(config["data"])  # every value parses as its setting
    for name, deployment in of_kind("Deployment").items():
        pod = deployment["spec"]["template"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        for container in pod["spec"]["containers"]:
            command = container["command"]
            if command[0] == "demix":
                assert command[1] in demix_commands(), command
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps
                else:
                    assert source["secretRef"]["name"] in secrets
            for variable in container.get("env", []):
                assert variable["name"] in setting_names(), variable
            mounts = {mount["name"] for mount in container.get("volumeMounts", [])}
            volumes = pod["spec"].get("volumes", [])
            assert mounts == {volume["name"] for volume in volumes}
            assert all("emptyDir" in volume for volume in volumes), f"{name} shares no volume"


def test_ports_and_probe_paths_are_the_ones_the_service_serves():
    from demix.api import create_app

    defaults = Settings.from_env({})
    config = Settings.from_env(of_kind("ConfigMap")["demix-config"]["data"])
    deployments = of_kind("Deployment")
    expected = {"demix-api": config.port, "demix-grpc": config.grpc_port, "demix-flower": defaults.flower_port,
                "redis": 6379}
    for name, port in expected.items():
        assert [p["containerPort"] for p in containers(deployments[name])[0]["ports"]] == [port], name
    assert f"--port={defaults.flower_port}" in flower_argv(config)
    app = create_app({"SETTINGS": defaults})
    routes = {rule.rule for rule in app.url_map.iter_rules()}
    probes = 0
    for deployment in deployments.values():
        for container in containers(deployment):
            ports = {p["containerPort"] for p in container.get("ports", [])}
            for kind in ("readinessProbe", "livenessProbe"):
                probe = container.get(kind, {})
                if "httpGet" in probe:
                    assert probe["httpGet"]["path"] in routes and probe["httpGet"]["port"] in ports
                    probes += 1
                if "tcpSocket" in probe:
                    assert probe["tcpSocket"]["port"] in ports
    assert probes >= 2
    app.extensions["demix"].jobs.redis.close()
    for name, service in of_kind("Service").items():
        selected = [d for d in deployments.values()
                    if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, name
        ports = {p["containerPort"] for p in containers(selected[0])[0]["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports, name
    assert of_kind("Service")["redis"]["spec"]["ports"][0]["port"] == 6379
    assert config.effective_redis_url == "redis://redis:6379/0"


def test_gpu_workers_request_a_gpu_and_keda_scales_cpu_workers_on_the_queue():
    deployments = of_kind("Deployment")
    gpu = containers(deployments["demix-worker-gpu"])[0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "DEMIX_DEVICE", "value": "cuda"} in gpu["env"]
    assert "nvidia.com/gpu" not in str(containers(deployments["demix-worker-cpu"])[0]["resources"])
    (scaled,) = of_kind("ScaledObject").values()
    assert scaled["apiVersion"].startswith("keda.sh/")
    target = deployments[scaled["spec"]["scaleTargetRef"]["name"]]
    assert containers(target)[0]["command"] == ["demix", "worker"]
    (trigger,) = scaled["spec"]["triggers"]
    config = Settings.from_env(of_kind("ConfigMap")["demix-config"]["data"])
    assert trigger["type"] == "redis"
    # The list kombu keeps the queue's default priority in is named after the queue.
    from demix import redis_keys as keys
    assert trigger["metadata"]["listName"] == keys.queue_keys(config.queue)[0]
    assert config.effective_redis_url.startswith(f"redis://{trigger['metadata']['address']}/")
    assert int(trigger["metadata"]["listLength"]) >= 1
