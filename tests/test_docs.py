"""The documentation holds together: every relative link and anchor in README*.md and docs/
resolves (anchors by GitHub's heading slugs), and the README stays short."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted([*REPO.glob("README*.md"), *(REPO / "docs").rglob("*.md")])
FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[ \t]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
MAX_README_LINES = 300


def prose(text: str) -> str:
    """The text outside code blocks and code spans, where links and headings count."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, punctuation dropped."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"(\*\*|__|\*)", "", text)
    kept = "".join(ch for ch in text.lower() if ch.isalnum() or ch in " -_")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor of a page; a repeated heading gets GitHub's -1, -2 … suffix."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for match in HEADING.finditer(prose(page.read_text(encoding="utf-8"))):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    text = CODE_SPAN.sub("", prose(page.read_text(encoding="utf-8")))
    return [m.group(1) for m in LINK.finditer(text)
            if not re.match(r"[a-z][a-z0-9+.-]*:", m.group(1), re.IGNORECASE)]


def broken(page: Path) -> list[str]:
    problems = []
    for target in links(page):
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path_part)).resolve() if path_part else page
        if not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and unquote(anchor).lower() not in anchors(dest):
            problems.append(f"{target}: no heading with anchor #{anchor}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    assert not broken(page), f"{page.relative_to(REPO)}: {broken(page)}"


def test_the_pages_are_found_and_have_links() -> None:
    names = {str(p.relative_to(REPO)) for p in PAGES}
    assert {"README.md", "docs/api.md", "docs/architecture.md"} <= names
    assert len(links(REPO / "README.md")) >= 10


def test_readme_is_at_most_300_lines() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines"


@pytest.mark.parametrize(("heading", "expected"), [
    ("Scale out: several replicas with Redis", "scale-out-several-replicas-with-redis"),
    ("4. Configuration", "4-configuration"),
    ("When Kore.ai's limit is lower than configured (added 2026-12-03)",
     "when-koreais-limit-is-lower-than-configured-added-2026-12-03"),
    ("Input rules (violations → 400 `invalid_request` naming the field, unless noted)",
     "input-rules-violations--400-invalid_request-naming-the-field-unless-noted"),
    ("빠른 시작", "빠른-시작"),
    ("[The sandbox](sandbox.md) and **faults**", "the-sandbox-and-faults"),
])
def test_slug_follows_github(heading: str, expected: str) -> None:
    assert slug(heading) == expected


def test_a_broken_link_or_anchor_is_reported(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## A part\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](other.md#a-part) [self](#page) [web](https://example.com)\n"
                    "[gone](missing.md) [bad](other.md#no-part) [bad2](#nowhere)\n"
                    "```sh\n[in code](missing2.md)\n```\n`[span](missing3.md)`\n",
                    encoding="utf-8")
    assert broken(page) == ["missing.md: no such file",
                            "other.md#no-part: no heading with anchor #no-part",
                            "#nowhere: no heading with anchor #nowhere"]
