"""tools/rehome_test_imports.py: old helper imports move to the new homes, once."""
from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_tool():
    spec = importlib.util.spec_from_file_location("rehome_test_imports", ROOT / "tools" / "rehome_test_imports.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


OLD = '''import pytest

from cli.main import build_parser, worker_argv
from tests.audio_factory import music_like, wav_bytes as make_wav
from tests.conftest import SESSION_DIR, LiveServer, wait_for_job
from tests.test_api_errors import assert_error, files_under, post, snapshot  # noqa: F401
from tests.test_intake import (NOT_AUDIO, ODD_VALID_WAVS, SAMPLES,
                               chunk, refusal)
from tests import waiting
import tests.small_disk


def test_x(tmp_path):
    from tests.test_cli_up import DEMIX
    with tests.small_disk.mounted_tmpfs(tmp_path, "1m", "x"):
        waiting.wait_for(lambda: DEMIX)
'''


def test_old_imports_are_rehomed_and_unknown_names_reported():
    tool = load_tool()
    new, problems = tool.rewrite(OLD, "t.py")
    imports = {(node.module, alias.name) for node in ast.walk(ast.parse(new))
               if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert {("cli.argv", "worker_argv"), ("cli.main", "build_parser"),
            ("testkit.synthetic_audio", "music_like"), ("testkit.synthetic_audio", "wav_bytes"),
            ("tests.support.environment", "SESSION_DIR"), ("tests.support.live", "LiveServer"),
            ("tests.support.live", "wait_for_job"), ("tests.support.http_api", "assert_error"),
            ("tests.support.http_api", "post"), ("tests.support.service_state", "files_under"),
            ("tests.support.wav_corpus", "NOT_AUDIO"), ("tests.support.wav_corpus", "chunk"),
            ("tests.support", "waiting"), ("tests.support.demix_up", "DEMIX")} <= imports
    assert not any(name == "snapshot" for _, name in imports)  # a fixture: conftest provides it
    assert ("tests.test_intake", "refusal") in imports  # unknown: left, and reported
    assert len(problems) == 1 and "refusal" in problems[0]
    assert "as make_wav" in new and "    from tests.support.demix_up import DEMIX\n" in new
    assert "import tests.support.small_disk\n" in new and "tests.support.small_disk.mounted_tmpfs(" in new
    assert "  # noqa: F401" in new
    again, _ = tool.rewrite(new, "t.py")
    assert again == new


def test_the_tree_has_no_import_left_to_rehome():
    tool = load_tool()
    files = sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
    stale = [str(path) for path in files if tool.rewrite(path.read_text(), str(path))[0] != path.read_text()]
    assert stale == []
