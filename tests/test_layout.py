"""Tests a newcomer can find: helpers tests share live in tests/support/ (or testkit/,
shared with the benchmarks), so no test module imports another test module or conftest."""
from __future__ import annotations

import ast
import functools
import typing as tp
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; `from tests import x` gives tests.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            package = "tests." * node.level if node.level else ""
            found.add(package + node.module)
            found |= {f"{package}{node.module}.{alias.name}" for alias in node.names}
    return found


def test_no_test_module_imports_another_or_conftest():
    offending = {}
    for path in sorted(TESTS.rglob("test_*.py")):
        bad = sorted(name for name in imported_modules(path)
                     if ".test_" in name or name.startswith(("tests.conftest", "test_")))
        if bad:
            offending[str(path.relative_to(TESTS))] = bad
    assert offending == {}, "move what they share to tests/support/: " + repr(offending)


def test_support_modules_import_no_test_module():
    offending = {path.name: sorted(name for name in imported_modules(path)
                                   if ".test_" in name or name.startswith("tests.conftest"))
                 for path in sorted((TESTS / "support").glob("*.py"))}
    assert {name: bad for name, bad in offending.items() if bad} == {}


def test_the_check_sees_an_import_of_another_test_module(tmp_path):
    module = tmp_path / "test_sample.py"
    module.write_text("from tests.intake.test_inspection import SAMPLES\nfrom tests import conftest\n"
                      "from tests.support.waiting import wait_for\n")
    assert {"tests.intake.test_inspection", "tests.conftest"} <= imported_modules(module)
    assert not any(name.startswith("tests.test_") for name in imported_modules(TESTS / "support" / "waiting.py"))


# -- a test file per module with logic of its own --------------------------------------------

ROOT = TESTS.parent
PRODUCT_PACKAGES = ("demix",)
"""Every module under these packages (sub-packages too: demix.separation.roformer, ...)."""

MIN_STATEMENTS = 3
"""A function or method with at least this many statements in its body (nested ones
counted, its docstring not) is logic of its own; constants, dataclasses of fields and
one-line accessors are not."""

TESTED_IN = {
    # module (dotted) -> the test file (under tests/) that loads it. Reached through the app
    # (`demix.api.create_app` registers them) by the HTTP tests:
    "demix.api": "api/test_api_contract.py",
    "demix.api.downloads": "test_cluster.py",
    "demix.api.early_answers": "api/test_front.py",  # asked by the front while a body is still coming  # stems streamed and presigned from a bucket
    "demix.api.error_responses": "api/test_api_errors.py",
    "demix.api.health": "worker/test_model_routing.py",
    "demix.api.job_views": "api/test_api_contract.py",  # and the api/test_api_jobs*.py tests, over HTTP
    "demix.api.metrics_view": "api/test_api_contract.py",  # GET /metrics's own tests: jobs/test_metrics.py, over HTTP
    "demix.api.upload_requests": "api/test_api_uploads.py",
    "demix.api.workflow_views": "api/test_api_contract.py",  # its own tests: api/test_api_workflows.py, over HTTP
    "demix.grpc_api.protos": "grpc_api/test_server.py",
    "demix.api_keys": "api/test_auth.py",
    "demix.audio.decoders": "intake/test_intake_formats.py",
    "demix.errors": "api/test_api_errors.py",
    "demix.stems": "intake/test_job_request.py",
    "demix.intake.uploads": "api/test_api_uploads.py",
    "demix.intake.url_fetch": "intake/test_url_jobs.py",
    "demix.intake.url_jobs": "worker/test_runner.py",  # intake/test_url_jobs.py reaches it through a worker
    "demix.separation.model_repo": "separation/test_models.py",
    "demix.separation.roformer.bs_roformer": "separation/test_roformer_networks.py",
    "demix.separation.roformer.mel_band_roformer": "separation/test_roformer_networks.py",
    "demix.separation.roformer.layers": "separation/test_roformer_networks.py",
    "demix.separation.roformer.network": "separation/test_roformer_networks.py",
    "demix.separation.weights.verify": "separation/test_weights_pull.py",
    "demix.cli.argv": "test_deployment.py",
    "demix.cli.main": "cli/test_client.py",
    "demix.cli.model_commands": "separation/test_models.py",
    "demix.cli.tie_to_parent": "cli/test_processes.py",  # run by path by demix.cli.processes, never imported
}
"""Modules with logic whose tests live in a file not named after them (kept short: a new
module gets its own tests/<sub-package>/test_<module>.py)."""


def has_logic(path: Path) -> bool:
    """Whether `path` defines a function or method of at least `MIN_STATEMENTS` statements."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                body = body[1:]
            if sum(isinstance(sub, ast.stmt) for stmt in body for sub in ast.walk(stmt)) >= MIN_STATEMENTS:
                return True
    return False


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def own_test_files(module: str) -> list[str]:
    """The test files (under tests/) named after dotted `module`: the package tree mirrored,
    tests/<sub-package>/test_<module>.py (tests/jobs/test_lifecycle.py for
    demix.jobs.lifecycle, tests/test_config.py for demix.config); a module of a nested
    package may also be tests/<sub-package>/test_<package>_<module>.py
    (tests/separation/test_roformer_loading.py)."""
    parts = module.split(".")[1:]  # under the top package
    if not parts:
        return []
    *folders, name = parts
    names = ["/".join([*folders, f"test_{name}.py"])]
    if len(folders) > 1:
        names.append("/".join([*folders[:-1], f"test_{folders[-1]}_{name}.py"]))
    return names


@functools.lru_cache(maxsize=None)
def parsed(path: Path) -> tuple[str, ast.Module]:
    """A product module's source and syntax tree (read once per session: many test files reach it)."""
    source = path.read_text()
    return source, ast.parse(source, str(path))


def reached_modules(root: Path, test_file: Path) -> tuple[set[str], str]:
    """The product modules `test_file` loads (its imports and theirs, transitively), and the
    source of all of them (a module run as a program is named there by its file name)."""
    def resolve(name: str) -> tp.Optional[Path]:
        base = root.joinpath(*name.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    seen: set[str] = set()
    sources: list[str] = []
    pending = [name for name in imported_modules(test_file) if name.split(".")[0] in PRODUCT_PACKAGES]
    while pending:
        name = pending.pop()
        path = resolve(name)
        if path is None or module_name(root, path) in seen:
            continue
        seen.add(module_name(root, path))
        source, tree = parsed(path)
        sources.append(source)
        package = module_name(root, path) if path.name == "__init__.py" else module_name(root, path).rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                prefix = f"{base}.{node.module}" if node.module else base
                pending += [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PRODUCT_PACKAGES:
                pending += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                pending += [alias.name for alias in node.names if alias.name.split(".")[0] in PRODUCT_PACKAGES]
    return seen, "\n".join(sources)


def loads(root: Path, test_file: Path, module: str, path: Path) -> bool:
    """Whether `test_file` loads `module`: imports it, runs its file by name, or names the
    module in its own text (code it runs in a child process)."""
    modules, source = reached_modules(root, test_file)
    return module in modules or path.name in source or module in test_file.read_text()


def untested_modules(root: Path, tested_in: tp.Mapping[str, str]) -> dict[str, str]:
    """Modules with logic that have neither a test file of their own (named after them by
    dotted path, and loading them) nor a true `tested_in` entry, each with why."""
    tests = root / "tests"
    missing = {}
    for package in PRODUCT_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if not has_logic(path):
                continue
            module = module_name(root, path)
            own = [name for name in own_test_files(module) if (tests / name).is_file()]
            if any(loads(root, tests / name, module, path) for name in own):
                continue
            if own and module not in tested_in:
                missing[module] = f"tests/{own[0]} is named after it but does not load it"
                continue
            if module not in tested_in:
                missing[module] = f"no tests/{own_test_files(module)[0]} and no TESTED_IN entry"
                continue
            test_file = tests / tested_in[module]
            if not test_file.is_file():
                missing[module] = f"TESTED_IN names {tested_in[module]}, which does not exist"
                continue
            if not loads(root, test_file, module, path):
                missing[module] = f"{tested_in[module]} does not load {module}"
    return missing


def module_path(root: Path, module: str) -> Path:
    base = root.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def test_every_module_with_logic_has_its_test_file():
    assert untested_modules(ROOT, TESTED_IN) == {}


def test_the_tested_in_table_names_no_module_that_has_its_own_test_file_or_no_logic():
    def own_file_loads(module: str) -> bool:
        return any((TESTS / name).is_file() and loads(ROOT, TESTS / name, module, module_path(ROOT, module))
                   for name in own_test_files(module))

    stale = {module for module in TESTED_IN
             if not module_path(ROOT, module).is_file() or not has_logic(module_path(ROOT, module))
             or own_file_loads(module)}
    assert stale == set()


def test_the_check_finds_a_module_without_tests_and_a_false_table_entry(tmp_path):
    (tmp_path / "tests" / "jobs").mkdir(parents=True)
    jobs = tmp_path / "demix" / "jobs"
    jobs.mkdir(parents=True)
    (tmp_path / "demix" / "__init__.py").write_text("")
    (jobs / "__init__.py").write_text("")
    logic = "def work(x):\n    '''Doc.'''\n    y = x + 1\n    if y:\n        y += 1\n    return y\n"
    for name in ("lonely", "covered", "claimed", "misnamed"):
        (jobs / f"{name}.py").write_text(logic)
    (jobs / "constants.py").write_text("LIMIT = 3\n\ndef limit():\n    return LIMIT\n")  # no logic
    (tmp_path / "tests" / "jobs" / "test_covered.py").write_text("from demix.jobs.covered import work\n")
    (tmp_path / "tests" / "jobs" / "test_misnamed.py").write_text("from demix.jobs.covered import work\n")
    (tmp_path / "tests" / "test_elsewhere.py").write_text("from demix.jobs.covered import work\n")
    assert untested_modules(tmp_path, {"demix.jobs.claimed": "test_elsewhere.py"}) == {
        "demix.jobs.lonely": "no tests/jobs/test_lonely.py and no TESTED_IN entry",
        "demix.jobs.claimed": "test_elsewhere.py does not load demix.jobs.claimed",
        "demix.jobs.misnamed": "tests/jobs/test_misnamed.py is named after it but does not load it",
    }
    (tmp_path / "tests" / "test_elsewhere.py").write_text("from demix.jobs import claimed\n")
    (tmp_path / "tests" / "jobs" / "test_misnamed.py").write_text("import demix.jobs.misnamed\n")
    assert set(untested_modules(tmp_path, {"demix.jobs.claimed": "test_elsewhere.py"})) == {"demix.jobs.lonely"}


def test_own_test_files_mirror_the_package():
    assert own_test_files("demix.jobs.lifecycle") == ["jobs/test_lifecycle.py"]
    assert own_test_files("demix.config") == ["test_config.py"]
    assert own_test_files("demix.separation.roformer.loading") == [
        "separation/roformer/test_loading.py", "separation/test_roformer_loading.py"]
    assert own_test_files("demix.api") == ["test_api.py"]  # a package: like a module of its parent
