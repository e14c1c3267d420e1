"""tools/settings_table.py: the settings table of docs/operations.md is `Settings`, written out."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from demix.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def _load_tool():
    spec = importlib.util.spec_from_file_location("settings_table", ROOT / "tools" / "settings_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


settings_table = _load_tool()


def test_the_table_in_docs_operations_is_the_settings_class():
    """Fails when a setting was added or changed in demix/config.py and the doc was not regenerated."""
    written = settings_table.table_in(settings_table.DOC.read_text())
    assert written == settings_table.settings_table(), (
        "docs/operations.md's settings table differs from the Settings class in demix/config.py: "
        f"regenerate it with `{settings_table.COMMAND}` (from the checkout's root) and commit the result")


def test_every_setting_has_one_row_with_its_doc():
    table = settings_table.settings_table()
    rows = table.splitlines()[2:]
    described = Settings.describe()
    assert len(rows) == len(described)
    for row, (name, _default, doc) in zip(rows, described):
        assert row.startswith(f"| `{name}` | ") and row.endswith(f" | {' '.join(doc.split())} |")


def test_defaults_are_shown_as_one_would_set_them():
    shown = settings_table.shown_default
    assert [shown(""), shown(8000), shown(0.25), shown(10.0), shown(True), shown(False)] == \
        ["empty", "`8000`", "`0.25`", "`10`", "`1`", "`0`"]
    # The data dir's default depends on the machine; the table must not.
    assert shown(Settings().data_dir) == "the user data dir (`~/.local/share/demix` on Linux)"
    assert shown(Path("/srv/demix")) == "`/srv/demix`"


def test_a_new_setting_changes_the_table_and_a_pipe_in_a_doc_is_escaped():
    described = [("DEMIX_NEW_THING", 3, "Says a | b,\n  over two lines.")]
    assert settings_table.settings_table(lambda: described).splitlines()[2] == \
        "| `DEMIX_NEW_THING` | `3` | Says a \\| b, over two lines. |"


def test_regenerating_rewrites_only_the_table_and_twice_changes_nothing(tmp_path, capsys):
    doc = tmp_path / "operations.md"
    doc.write_text(f"# Operations\n\nBefore.\n\n{settings_table.START}\n| old | table |\n"
                   f"{settings_table.END}\n\nAfter.\n")
    assert settings_table.main([str(doc)]) == 0
    first = doc.read_text()
    assert first.startswith("# Operations\n\nBefore.\n\n") and first.endswith("\n\nAfter.\n")
    assert settings_table.table_in(first) == settings_table.settings_table()
    assert "rewritten" in capsys.readouterr().out
    assert settings_table.main([str(doc)]) == 0
    assert doc.read_text() == first and "up to date" in capsys.readouterr().out


def test_a_doc_without_the_markers_is_refused(tmp_path):
    with pytest.raises(ValueError, match="markers are missing"):
        settings_table.with_table("# Operations\n", "| a |")
    assert settings_table.START in settings_table.DOC.read_text()


def test_the_command_is_the_one_the_docs_give():
    assert settings_table.COMMAND in (ROOT / "docs" / "development.md").read_text()
    assert settings_table.COMMAND in settings_table.DOC.read_text()
    assert settings_table.COMMAND.endswith("tools/settings_table.py")
