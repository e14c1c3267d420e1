"""Rewrite imports of test helpers from where they used to live to where they live now.

Test helpers used to sit beside the tests (`tests/audio_factory.py`, `tests/waiting.py`,
...), in `tests/conftest.py`, and inside test modules other tests imported
(`tests/test_intake.py`, `tests/test_api_errors.py`, ...). They now live in
`testkit/` (what tests and benchmarks share) and `tests/support/` (what tests share);
the process commands (`worker_argv`, ...) left `cli.main` for `cli.argv`. This rewrites, in the files given, every

    from tests.X import a, b as c        (one line, or parenthesised over several)
    from tests import X
    import tests.X [as y]

whose names moved, to import each name from its new module. Fixtures that moved into
`tests/conftest.py` (pytest finds them there) are dropped from the import. Names this table
does not know are left where they were, and reported. Running it twice changes nothing.

    python tools/rehome_test_imports.py tests/*.py tests/support/*.py bench/*.py

Exit status 1 when something was left to do by hand (reported on stderr).
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
import textwrap
from pathlib import Path

MOVED_MODULES = {
    # old module -> new module: everything in it moved together
    "tests.audio_factory": "testkit.synthetic_audio",
    "tests.tiny_models": "testkit.tiny_models",
    "tests.waiting": "tests.support.waiting",
    "tests.webhook_receiver": "tests.support.webhook_receiver",
    "tests.small_disk": "tests.support.small_disk",
    "tests.reference": "tests.support.reference",
    "tests.file_server": "tests.support.file_server",
    "tests.encoded_audio": "tests.support.encoded_audio",
}

FIXTURE = None
"""Marks a fixture now in tests/conftest.py: the import is dropped, pytest injects it."""

MOVED_NAMES: dict[str, dict[str, str | None]] = {
    # old module -> {name -> new module}: the module stays, these names left it
    "tests.conftest": {
        "SESSION_DIR": "tests.support.environment",
        "REDIS_PORT": "tests.support.environment",
        "UNCONSUMED_QUEUE": "tests.support.environment",
        "LiveServer": "tests.support.live",
        "wait_for_job": "tests.support.live",
        "TINY_MODEL": "testkit.tiny_models",
        "TINY_SOURCES": "testkit.tiny_models",
        "make_tiny_htdemucs": "testkit.tiny_models",
        "write_tiny_repo": "testkit.tiny_models",
    },
    "tests.test_api_errors": {
        "assert_error": "tests.support.http_api",
        "post": "tests.support.http_api",
        "files_under": "tests.support.service_state",
        "job_count": "tests.support.service_state",
        "queue_length": "tests.support.service_state",
        "snapshot": FIXTURE,
        "UNCONSUMED_QUEUE": "tests.support.environment",
    },
    "tests.test_intake": {name: "tests.support.wav_corpus" for name in (
        "STREAMED", "MP3_FRAME", "chunk", "fmt_chunk", "riff", "data_header", "pcm16", "SAMPLES",
        "plain_wav", "rf64_header", "rf64_wav", "info_list", "ODD_VALID_WAVS", "NOT_AUDIO",
        "ima_adpcm_with_block_align", "MPEG_IN_WAV", "UNDECODABLE")},
    "tests.test_api_jobs": {
        "submit": "tests.support.http_api",
        "decode_result": "tests.support.http_api",
    },
    "tests.test_cli_up": {
        "DEMIX": "tests.support.demix_up",
        "demix_up": "tests.support.demix_up",
        "processes_with_marker": "tests.support.demix_up",
    },
    "tests.test_engine": {
        "MemorySink": "tests.support.memory_sink",
        "MemoryWriter": "tests.support.memory_sink",
    },
    "tests.test_split": {
        "unsplit_run": "tests.support.memory_sink",
        "max_difference": "tests.support.memory_sink",
    },
    "tests.test_weights_download": {
        "serve": "tests.support.http_routes",
        "handler": "tests.support.http_routes",
    },
    "cli.main": {  # the process commands left cli.main, so cli.supervisor need not import it back
        "api_argv": "cli.argv",
        "worker_argv": "cli.argv",
        "worker_node_name": "cli.argv",
        "flower_argv": "cli.argv",
    },
}


def new_home(module: str, name: str) -> tuple[bool, str | None]:
    """(known, new module or FIXTURE) for `name` imported from `module`."""
    if module in MOVED_MODULES:
        return True, MOVED_MODULES[module]
    if module in MOVED_NAMES and name in MOVED_NAMES[module]:
        return True, MOVED_NAMES[module][name]
    return False, module


def _alias(alias: ast.alias) -> str:
    return alias.name if alias.asname is None else f"{alias.name} as {alias.asname}"


def _from_lines(indent: str, groups: dict[str, list[str]], comment: str) -> list[str]:
    lines = []
    for module in sorted(groups):
        names = ", ".join(groups[module])
        line = f"{indent}from {module} import {names}"
        if len(line) + len(comment) <= 110 or len(groups[module]) == 1:
            lines.append(line + comment + "\n")
            continue
        opening = f"{indent}from {module} import ("
        wrapped = textwrap.wrap(names, width=110 - len(opening), break_on_hyphens=False)
        lines.append(opening + wrapped[0] + comment + "\n")
        lines += [" " * len(opening) + part + "\n" for part in wrapped[1:-1]]
        if len(wrapped) > 1:
            lines.append(" " * len(opening) + wrapped[-1] + ")\n")
        else:
            lines[-1] = opening + wrapped[0] + ")" + comment + "\n"
    return lines


def rewrite(source: str, path: str = "<source>") -> tuple[str, list[str]]:
    """The source with its test-helper imports rehomed, and what was left to do by hand."""
    try:
        tree = ast.parse(source)
    except SyntaxError as error:
        return source, [f"{path}: not parsed ({error}); left as it is"]
    lines = source.splitlines(keepends=True)
    problems: list[str] = []
    replacements: list[tuple[int, int, list[str]]] = []  # (first line, last line, new lines), 1-based
    renamed_modules: dict[str, str] = {}  # `import tests.X` -> attribute paths to rewrite

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and (node.module == "tests" or node.module.startswith("tests.") or node.module in MOVED_NAMES):
            first, last = node.lineno, node.end_lineno
            if ";" in "".join(lines[first - 1:last]).split("#")[0]:
                problems.append(f"{path}:{first}: several statements on one line; left as it is")
                continue
            indent = re.match(r"\s*", lines[first - 1]).group(0)
            match = re.search(r"\)?\s*(#.*)$", lines[last - 1].rstrip("\n"))
            comment = f"  {match.group(1)}" if match else ""
            groups: dict[str, list[str]] = {}
            changed = False
            for alias in node.names:
                if node.module == "tests":  # `from tests import X`: X is a module
                    old = f"tests.{alias.name}"
                    if old in MOVED_MODULES:
                        package, _, module = MOVED_MODULES[old].rpartition(".")
                        as_name = alias.asname or alias.name
                        groups.setdefault(package, []).append(
                            module if module == as_name else f"{module} as {as_name}")
                        changed = True
                    else:
                        if old in MOVED_NAMES:
                            problems.append(f"{path}:{first}: `from tests import {alias.name}`: its "
                                            f"names moved; import them from their new modules")
                        groups.setdefault("tests", []).append(_alias(alias))
                    continue
                if alias.name == "*":
                    if node.module in MOVED_MODULES or node.module in MOVED_NAMES:
                        problems.append(f"{path}:{first}: `from {node.module} import *`; rewrite by hand")
                    groups.setdefault(node.module, []).append("*")
                    continue
                known, target = new_home(node.module, alias.name)
                if not known:
                    if node.module.startswith("tests.test_"):
                        problems.append(f"{path}:{first}: `{alias.name}` from {node.module}: a test module "
                                        f"must not import another; move it to tests/support/ (and add it "
                                        f"to the table in {Path(__file__).name})")
                    elif node.module == "tests.conftest":
                        problems.append(f"{path}:{first}: `{alias.name}` from tests.conftest: move it to "
                                        f"tests/support/ (or use it as a fixture)")
                    groups.setdefault(node.module, []).append(_alias(alias))
                    continue
                changed = True
                if target is FIXTURE:
                    continue
                groups.setdefault(target, []).append(_alias(alias))
            if changed:
                replacements.append((first, last, _from_lines(indent, groups, comment)))
        elif isinstance(node, ast.Import):
            moved = [alias for alias in node.names if alias.name in MOVED_MODULES]
            for alias in node.names:
                if alias.name in MOVED_NAMES:
                    problems.append(f"{path}:{node.lineno}: `import {alias.name}`: its helpers moved; "
                                    f"import them from their new modules")
            if not moved:
                continue
            first, last = node.lineno, node.end_lineno
            indent = re.match(r"\s*", lines[first - 1]).group(0)
            match = re.search(r"(#.*)$", lines[last - 1].rstrip("\n"))
            comment = f"  {match.group(1)}" if match else ""
            names = []
            for alias in node.names:
                new = MOVED_MODULES.get(alias.name, alias.name)
                if alias.asname is None and new != alias.name:
                    renamed_modules[alias.name] = new
                names.append(new if alias.asname is None else f"{new} as {alias.asname}")
            replacements.append((first, last, [f"{indent}import {', '.join(names)}{comment}\n"]))

    for first, last, new_lines in sorted(replacements, reverse=True):
        lines[first - 1:last] = new_lines
    text = "".join(lines)
    for old, new in renamed_modules.items():  # `tests.waiting.wait_for(...)` after `import tests.waiting`
        text = re.sub(rf"(?<![\w.]){re.escape(old)}\.", f"{new}.", text)
    return text, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")
    arguments = parser.parse_args(argv)
    problems: list[str] = []
    would_change = []
    for path in arguments.files:
        if path.suffix != ".py" or not path.is_file():
            continue
        source = path.read_text()
        text, found = rewrite(source, str(path))
        problems += found
        if text != source:
            would_change.append(path)
            if not arguments.check:
                path.write_text(text)
                print(f"rehomed {path}")
    for problem in problems:
        print(problem, file=sys.stderr)
    if arguments.check and would_change:
        print(f"{len(would_change)} file(s) import test helpers from their old homes", file=sys.stderr)
    return 1 if problems or (arguments.check and would_change) else 0


if __name__ == "__main__":
    sys.exit(main())
