"""Tests a newcomer can find: helpers tests share live in tests/support/ (or testkit/,
shared with the benchmarks), so no test module imports another test module or conftest."""
from __future__ import annotations

import ast
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
    module.write_text("from tests.test_intake import SAMPLES\nfrom tests import conftest\n"
                      "from tests.support.waiting import wait_for\n")
    assert {"tests.test_intake", "tests.conftest"} <= imported_modules(module)
    assert not any(name.startswith("tests.test_") for name in imported_modules(TESTS / "support" / "waiting.py"))
