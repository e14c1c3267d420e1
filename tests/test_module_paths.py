"""Every module path written in a string names a real module (or attribute): the commands
of docker-compose.yml and the Kubernetes manifests, the process commands `demix` builds,
`python -m` children, the Celery app's task modules and the `demix` entry point. A moved
or renamed module fails here rather than in a container at start."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import tomllib
from pathlib import Path

import yaml

from demix.celery_app import make_celery
from demix.cli.argv import api_argv, flower_argv, worker_argv
from demix.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def resolve(reference: str) -> object:
    """The object `module` or `module:attribute` (a trailing `()` allowed) names."""
    module_name, _, attribute = reference.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute.removesuffix("()")) if attribute else module


def module_references(argv: list[str]) -> list[str]:
    """The module paths in a command: after `-m`, after `--app`/`-A`, and a gunicorn app."""
    found = []
    for flag, value in zip(argv, argv[1:]):
        if flag in ("-m", "--app", "-A") and value not in ("celery", "gunicorn"):
            found.append(value)
    found += [arg for arg in argv if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*(\(\))?", arg)]
    return found


def deployment_commands() -> list[list[str]]:
    commands = [service["command"] for service in
                yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"].values() if "command" in service]
    for path in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            for container in ((document or {}).get("spec", {}).get("template", {}).get("spec", {})
                              .get("containers", [])):
                if "command" in container:
                    commands.append(container["command"])
    return commands


def test_every_module_a_deployment_command_names_exists():
    commands = deployment_commands()
    # Flower runs as `demix flower` there, like the other parts: the next test checks the module
    # its command (`flower_argv`) names.
    assert ["demix", "flower"] in commands
    references = [ref for command in commands for ref in module_references(command)]
    for reference in references:
        assert resolve(reference) is not None, reference


def test_the_process_commands_name_importable_modules():
    settings = Settings.from_env({})
    references = [ref for argv in (api_argv(settings), worker_argv(settings), flower_argv(settings))
                  for ref in module_references(argv)]
    assert set(references) == {"demix.api.front", "demix.celery_app"}
    assert callable(resolve("demix.api.front").main)
    assert hasattr(resolve("demix.celery_app"), "celery_app")


def test_every_python_dash_m_child_in_the_product_names_a_runnable_module():
    found = set()
    for path in sorted((ROOT / "demix").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.List):
                items = [item.value if isinstance(item, ast.Constant) else None for item in node.elts]
                found |= {value for flag, value in zip(items, items[1:])
                          if flag == "-m" and isinstance(value, str) and value.startswith("demix")}
    assert "demix.cli.main" in found  # `demix up` runs its `demix models pull` and children so
    for module in found:
        assert importlib.util.find_spec(module) is not None, module


def test_the_celery_apps_task_modules_import():
    app = make_celery(Settings.from_env({}))
    assert app.conf.include
    for module in app.conf.include:
        assert importlib.import_module(module) is not None


def test_the_entry_point_names_the_command_line():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"demix": "demix.cli.main:main"}
    assert callable(resolve(scripts["demix"]))
    assert importlib.util.find_spec("demix.__main__") is not None  # python -m demix
