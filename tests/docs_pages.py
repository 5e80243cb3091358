"""The README and the docs pages as the tests read them: whole, or one section by heading.

Examples, recipes and tables that tests run live in these pages; a test names the page and
the heading, so a section that moves or is renamed fails the test that reads it, by name.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
HEADING = re.compile(r"^(#{1,6}) (.+)$", re.MULTILINE)
FENCE = re.compile(r"^```.*?^```$", re.MULTILINE | re.DOTALL)


def pages() -> list[Path]:
    """The README and every page of docs/, in a stable order."""
    return [README, *sorted(DOCS.glob("*.md"))]


def page_text(page: str) -> str:
    """The text of `README.md` or of a docs page named like `operators.md`."""
    path = README if page == "README.md" else DOCS / page
    return path.read_text(encoding="utf-8")


def section(page: str, heading: str) -> str:
    """The text under the heading `heading` (its words, without the `#`s) of `page`, up to
    the next heading of the same or a higher level; AssertionError when the page has no
    such heading, or more than one. Headings inside fenced code blocks are not headings."""
    text = page_text(page)
    # Blank out fenced blocks (same length) so that `# comment` lines in them are not read
    # as headings, while offsets still point into the real text.
    masked = FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m[0]), text)
    found = [m for m in HEADING.finditer(masked) if m[2].strip() == heading]
    assert len(found) == 1, f"{page}: {len(found)} headings {heading!r}, expected one"
    start = found[0]
    level = len(start[1])
    end = len(text)
    for later in HEADING.finditer(masked, start.end()):
        if len(later[1]) <= level:
            end = later.start()
            break
    return text[start.end() : end]
