"""docker-compose.yml and deploy/kubernetes/ run only commands this project provides, with
its real settings, ports and probe paths, wired to one broker (and, for the S3 profile and
the cluster manifests, to one bucket and no shared volume)."""
from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
from pathlib import Path

import yaml

from cli.main import api_argv, build_parser, worker_argv
from shared.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def demix_commands() -> set[str]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    return set(subparsers.choices)


S3_SERVICES = ("api-s3", "worker-s3", "grpc-s3")


def test_every_service_runs_a_command_the_project_provides():
    services = compose()["services"]
    assert set(services) == {"redis", "api", "worker", "grpc", "flower", "s3", *S3_SERVICES}
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
    for package in ("api", "worker", "shared", "cli", "grpc_api"):
        assert f"COPY {package} ./{package}" in dockerfile
    assert 'pip install ".[s3]"' in dockerfile  # boto3 for DEMIX_STORAGE=s3://
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
    assert commands["demix-flower"][:3] == ["celery", "--app", "shared.celery_app"]
    config = of_kind("ConfigMap")["demix-config"]["data"]
    assert config["DEMIX_STORAGE"].startswith("s3://") and "DEMIX_S3_ENDPOINT_URL" in config
    secret = of_kind("Secret")["demix-s3-credentials"]["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret)


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
    from api import create_app

    defaults = Settings.from_env({})
    config = Settings.from_env(of_kind("ConfigMap")["demix-config"]["data"])
    deployments = of_kind("Deployment")
    expected = {"demix-api": config.port, "demix-grpc": config.grpc_port, "demix-flower": defaults.flower_port,
                "redis": 6379}
    for name, port in expected.items():
        assert [p["containerPort"] for p in containers(deployments[name])[0]["ports"]] == [port], name
    assert f"--port={defaults.flower_port}" in containers(deployments["demix-flower"])[0]["command"]
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
    from shared import keys
    assert trigger["metadata"]["listName"] == keys.queue_keys(config.queue)[0]
    assert config.effective_redis_url.startswith(f"redis://{trigger['metadata']['address']}/")
    assert int(trigger["metadata"]["listLength"]) >= 1
