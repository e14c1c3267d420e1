"""README.md and docs/*.md: every relative link reaches a file, every `#anchor` a heading.

Anchors are GitHub's heading slugs: the heading's text, lower-cased, without punctuation,
spaces turned into hyphens, a repeated slug numbered (`-1`, `-2`, ...). Links and headings
inside code (fenced blocks, `inline code`) are not links and headings, and are skipped.
"""
from __future__ import annotations

import re
import typing as tp
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def prose_lines(text: str) -> tp.Iterator[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if match and (fence is None or match.group(1) == fence):
            fence = None if fence else match.group(1)
            continue
        if fence is None:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's markdown text (before numbering repeats)."""
    text = _CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("*", "")
    text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", text)  # _emphasis_, not snake_case
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor the headings of a markdown document give."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(text):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(text: str) -> tp.Iterator[tuple[int, str]]:
    """(line number, target) of every inline link and image outside code."""
    for number, line in prose_lines(text):
        for match in _LINK.finditer(_CODE_SPAN.sub("", line)):
            yield number, match.group(1)


def broken_links(document: Path) -> list[str]:
    """What is wrong with `document`'s relative links and anchors, one line each (none: [])."""
    problems = []
    for number, target in links(document.read_text()):
        if not target or _EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        where = f"{document.name}:{number}: ({target})"
        linked = (document.parent / unquote(path_part)).resolve() if path_part else document
        if not linked.exists():
            problems.append(f"{where}: no file {linked}")
        elif anchor and linked.suffix == ".md" and unquote(anchor) not in anchors(linked.read_text()):
            problems.append(f"{where}: {linked.name} has no heading with the anchor #{anchor}")
    return problems


def test_every_link_and_anchor_of_the_documents_resolves():
    assert len(DOCUMENTS) > 1, "docs/*.md not found"
    problems = [problem for document in DOCUMENTS for problem in broken_links(document)]
    assert problems == [], "broken links in the documents:\n" + "\n".join(problems)


def test_the_readme_links_into_every_document():
    linked = {(ROOT / target.partition("#")[0]).resolve()
              for _, target in links((ROOT / "README.md").read_text()) if not _EXTERNAL.match(target)}
    assert [doc.name for doc in DOCUMENTS[1:] if doc.resolve() not in linked] == []


def test_the_readme_starts_fast():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_the_check_catches_a_missing_file_a_missing_anchor_and_a_bad_anchor_elsewhere(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## Where it is\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n## Here `DEMIX_X`: a, b\n\n"
                    "[fine](#here-demix_x-a-b) [fine](other.md#where-it-is) [web](https://example.com/#x)\n"
                    "[gone](missing.md) [no anchor](#nowhere)\n"
                    "[wrong anchor](other.md#where-it-was)\n"
                    "```\n[in code](not-checked.md)\n# not a heading\n```\n"
                    "`[inline code](not-checked.md)`\n")
    problems = broken_links(page)
    assert len(problems) == 3, problems
    assert "page.md:6: (missing.md): no file" in problems[0]
    assert problems[1] == "page.md:6: (#nowhere): page.md has no heading with the anchor #nowhere"
    assert problems[2] == "page.md:7: (other.md#where-it-was): other.md has no heading with the anchor #where-it-was"


def test_slugs_are_githubs():
    assert slug("Storage: local folder or object store") == "storage-local-folder-or-object-store"
    assert slug("The fast mode, `DEMIX_PRECISION=bf16`") == "the-fast-mode-demix_precisionbf16"
    assert slug("The web page's tests and screenshot") == "the-web-pages-tests-and-screenshot"
    assert slug("Waiting: queue position and time left") == "waiting-queue-position-and-time-left"
    assert slug("See [the API](api.md) *now*") == "see-the-api-now"
    assert anchors("# A\n## A\n### A\n") == {"a", "a-1", "a-2"}
