"""The layers hold: `lint-imports` checks the contracts in pyproject.toml
([tool.importlinter]): command line -> HTTP/gRPC APIs -> worker -> intake -> services ->
separation/jobs -> storage/audio -> base modules; the engine imports no Redis, Celery or
Flask; the product never imports tests, bench or testkit; no import cycle between siblings."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.processes  # runs lint-imports


def test_the_import_contracts_are_kept():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_the_separation_engine_imports_no_celery_redis_or_flask():
    # a fresh interpreter: this one has long imported the whole service
    code = ("import sys, demix.separation.engine\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'celery', 'kombu', 'redis', 'flask'}))\n"
            "print(sorted(m for m in sys.modules if m.startswith(('demix.jobs', 'demix.intake', 'demix.worker'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "[]"]


def separation_submodules_imported(path: Path) -> list[str]:
    """The modules under `demix.separation.` that the file at `path` imports by name."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        found += [name for name in names if name.startswith("demix.separation.")]
    return found


def test_the_worker_reaches_the_engine_through_its_front_door(tmp_path):
    """`demix.separation` says what the engine offers; the worker imports nothing else of it."""
    offending = {str(path.relative_to(ROOT)): separation_submodules_imported(path)
                 for path in sorted((ROOT / "demix" / "worker").glob("*.py"))}
    assert {path: names for path, names in offending.items() if names} == {}
    sample = tmp_path / "sample.py"  # the check sees such an import
    sample.write_text("def f():\n    from demix.separation.models import ModelCache\n")
    assert separation_submodules_imported(sample) == ["demix.separation.models"]
