"""Write the settings table of docs/operations.md from `demix.config.Settings`.

The table lists every `DEMIX_*` variable with its default and its one-line doc, read from the
`Settings` class (`Settings.describe()`, as `demix config` prints them), so the class stays the
one place a setting is declared. After adding or changing a setting, run from the checkout's root:

    .venv/bin/python tools/settings_table.py

It rewrites only what lies between the two marker comments in docs/operations.md, and running it
twice changes nothing. `tests/test_settings_table.py` fails while the table differs from `Settings`.
"""
from __future__ import annotations

import sys
import typing as tp
from pathlib import Path

import platformdirs

from demix.config import Settings

START = "<!-- settings-table:start -->"
END = "<!-- settings-table:end -->"
DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
COMMAND = ".venv/bin/python tools/settings_table.py"

_USER_DATA_DIR = Path(platformdirs.user_data_dir("demix"))


def shown_default(value: tp.Any) -> str:
    """A setting's default as the table shows it: what one would set the variable to."""
    if value == "":
        return "empty"
    if isinstance(value, Path):
        # The default differs per machine and user; the table must not.
        if value == _USER_DATA_DIR:
            return "the user data dir (`~/.local/share/demix` on Linux)"
        return f"`{value}`"
    if isinstance(value, bool):
        return "`1`" if value else "`0`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def settings_table(describe: tp.Callable[[], list[tuple[str, tp.Any, str]]] = Settings.describe) -> str:
    """The markdown table of every setting: variable, default, meaning (one row each)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, default, doc in describe():
        meaning = " ".join(doc.split()).replace("|", "\\|")
        rows.append(f"| `{name}` | {shown_default(default)} | {meaning} |")
    return "\n".join(rows)


def table_in(text: str) -> str:
    """The table between the markers of `text`.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the settings table's markers are missing: {START!r} ... {END!r}")
    return text[start + len(START):end].strip("\n")


def with_table(text: str, table: str) -> str:
    """`text` with the table between its markers replaced by `table`."""
    table_in(text)  # the markers are there
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{table}\n{END}{after}"


def main(argv: tp.Sequence[str] = ()) -> int:
    path = Path(argv[0]) if argv else DOC
    text = path.read_text()
    updated = with_table(text, settings_table())
    if updated == text:
        print(f"{path}: the settings table is up to date")
    else:
        path.write_text(updated)
        print(f"{path}: settings table rewritten from demix.config.Settings")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
