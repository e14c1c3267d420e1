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
    for path in sorted(TESTS.glob("test_*.py")):
        bad = sorted(name for name in imported_modules(path)
                     if name.startswith(("tests.test_", "tests.conftest")) or name.startswith("test_"))
        if bad:
            offending[path.name] = bad
    assert offending == {}, "move what they share to tests/support/: " + repr(offending)


def test_support_modules_import_no_test_module():
    offending = {path.name: sorted(name for name in imported_modules(path)
                                   if name.startswith(("tests.test_", "tests.conftest")))
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
PRODUCT_PACKAGES = ("api", "grpc_api", "shared", "worker", "cli")
"""Every module under these folders (sub-packages too: demix/separation/roformer, demix/separation/weights)."""

MIN_STATEMENTS = 3
"""A function or method with at least this many statements in its body (nested ones
counted, its docstring not) is logic of its own; constants, dataclasses of fields and
one-line accessors are not."""

TESTED_IN = {
    # Reached through the app (`demix.api.create_app` registers them) by the HTTP tests.
    "demix/api/__init__.py": "test_api_contract.py",
    "demix/api/downloads.py": "test_cluster.py",  # stems streamed and presigned from a bucket
    "demix/api/error_responses.py": "test_api_errors.py",
    "demix/api/health.py": "test_model_routing.py",
    "demix/api/upload_requests.py": "test_api_uploads.py",
    "demix/api/web.py": "test_api_web.py",
    "demix/grpc_api/protos.py": "test_grpc_server.py",
    "demix/grpc_api/server.py": "test_grpc_server.py",
    "demix/api_keys.py": "test_auth.py",
    "demix/audio/decoders.py": "test_intake_formats.py",
    "demix/errors.py": "test_api_errors.py",
    "demix/outbound.py": "test_url_inputs.py",
    "demix/stems.py": "test_job_request.py",
    "demix/intake/uploads.py": "test_api_uploads.py",
    "demix/intake/url_fetch.py": "test_url_inputs.py",
    "demix/separation/model_repo.py": "test_models.py",
    "demix/separation/roformer/bs_roformer.py": "test_roformer_networks.py",
    "demix/separation/roformer/mel_band_roformer.py": "test_roformer_networks.py",
    "demix/separation/roformer/network.py": "test_roformer_networks.py",
    "demix/separation/weights/verify.py": "test_weights_pull.py",
    "demix/cli/argv.py": "test_deployment.py",
    "demix/cli/main.py": "test_client.py",
    "demix/cli/tie_to_parent.py": "test_processes.py",  # run by path by demix.cli.processes, never imported
}
"""Modules with logic whose tests live in a file not named after them (kept short: a new
module gets its own tests/test_<module>.py)."""


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


def own_test_names(root: Path, path: Path) -> list[str]:
    """The test file names that count as `path`'s own: test_<module>.py, and for a module of
    a sub-package also test_<sub-package>_<module>.py (test_roformer_loading.py)."""
    stem = path.parent.name if path.name == "__init__.py" else path.stem
    names = [f"test_{stem}.py"]
    package = path.parent.relative_to(root).parts
    if len(package) > 1 and path.name != "__init__.py":
        names.append(f"test_{package[-1]}_{stem}.py")
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


def untested_modules(root: Path, tested_in: tp.Mapping[str, str]) -> dict[str, str]:
    """Modules with logic that have neither a test file of their own nor a true `tested_in`
    entry (one whose test file loads them), each with why."""
    tests = root / "tests"
    missing = {}
    for package in PRODUCT_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            key = str(path.relative_to(root))
            if not has_logic(path):
                continue
            if any((tests / name).is_file() for name in own_test_names(root, path)):
                continue
            if key not in tested_in:
                missing[key] = f"no tests/{own_test_names(root, path)[0]} and no TESTED_IN entry"
                continue
            test_file = tests / tested_in[key]
            if not test_file.is_file():
                missing[key] = f"TESTED_IN names {tested_in[key]}, which does not exist"
                continue
            modules, source = reached_modules(root, test_file)
            if module_name(root, path) not in modules and path.name not in source:
                missing[key] = f"{tested_in[key]} does not load {module_name(root, path)}"
    return missing


def test_every_module_with_logic_has_its_test_file():
    assert untested_modules(ROOT, TESTED_IN) == {}


def test_the_tested_in_table_names_no_module_that_has_its_own_test_file_or_no_logic():
    stale = {key for key in TESTED_IN
             if not has_logic(ROOT / key) or any((TESTS / name).is_file() for name in own_test_names(ROOT, ROOT / key))}
    assert stale == set()


def test_the_check_finds_a_module_without_tests_and_a_false_table_entry(tmp_path):
    (tmp_path / "tests").mkdir()
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "__init__.py").write_text("")
    logic = "def work(x):\n    '''Doc.'''\n    y = x + 1\n    if y:\n        y += 1\n    return y\n"
    (shared / "lonely.py").write_text(logic)
    (shared / "covered.py").write_text(logic)
    (shared / "claimed.py").write_text(logic)
    (shared / "constants.py").write_text("LIMIT = 3\n\ndef limit():\n    return LIMIT\n")  # no logic
    (tmp_path / "tests" / "test_covered.py").write_text("from shared.covered import work\n")
    (tmp_path / "tests" / "test_elsewhere.py").write_text("from shared.covered import work\n")
    assert untested_modules(tmp_path, {"shared/claimed.py": "test_elsewhere.py"}) == {
        "shared/lonely.py": "no tests/test_lonely.py and no TESTED_IN entry",
        "shared/claimed.py": "test_elsewhere.py does not load shared.claimed",
    }
    (tmp_path / "tests" / "test_elsewhere.py").write_text("from shared import claimed\n")
    assert set(untested_modules(tmp_path, {"shared/claimed.py": "test_elsewhere.py"})) == {"shared/lonely.py"}
