"""The layers hold: `lint-imports` checks the contracts in pyproject.toml
([tool.importlinter]): shared imports no door, worker or command line; the doors (api,
grpc_api) import neither the worker nor each other; the worker imports no door; the
product never imports tests, bench or testkit; no import cycle between sibling modules."""
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
