"""README.ko.md and README.ja.md mirror README.md's first screen: the diagram, the quick start
(exactly), audit verify, and the links into docs/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRANSLATIONS = ["README.ko.md", "README.ja.md"]
FENCE = re.compile(r"^```sh\n(.*?)^```$", re.MULTILINE | re.DOTALL)
MERMAID = re.compile(r"^```mermaid\n(.*?)^```$", re.MULTILINE | re.DOTALL)
# A flowchart edge: source node id, then (after the label) the target node id.
EDGE = re.compile(r"^\s*(\w+)\b.*?(?:-->|---)\s*(\w+)\b", re.MULTILINE)
DOC_LINK = re.compile(r"\]\((docs/[^)#]+\.md)")


def quick_start_blocks() -> list[str]:
    """The shell blocks of README.md's quick start: the set-up commands and the curl line."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return FENCE.findall(section)


def test_quick_start_has_the_commands_and_the_curl_line() -> None:
    blocks = quick_start_blocks()
    assert len(blocks) == 2 and ".venv/bin/kore-gateway demo" in blocks[0]
    assert blocks[1].startswith("curl ")


@pytest.mark.parametrize("name", TRANSLATIONS)
def test_translation_repeats_the_quick_start_verbatim(name: str) -> None:
    text = (REPO / name).read_text(encoding="utf-8")
    for block in quick_start_blocks():
        assert f"```sh\n{block}```" in text


@pytest.mark.parametrize("name", TRANSLATIONS)
def test_translation_shows_audit_verify_and_links_back(name: str) -> None:
    text = (REPO / name).read_text(encoding="utf-8")
    assert ".venv/bin/kore-gateway audit verify var/audit/demo.jsonl" in text
    assert "](README.md)" in text


def test_readme_links_to_translations() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    for name in TRANSLATIONS:
        assert f"]({name})" in text


def diagram_edges(text: str) -> set[tuple[str, str]]:
    """The edges of the page's first mermaid diagram, by node id (labels are translated)."""
    blocks = MERMAID.findall(text)
    assert blocks, "no mermaid diagram"
    return set(EDGE.findall(blocks[0]))


def test_readme_first_screen_has_the_diagram() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.index("```mermaid") < text.index("\n## Quick start\n")
    edges = diagram_edges(text)
    assert {("C", "G"), ("G", "K"), ("G", "A")} <= edges


@pytest.mark.parametrize("name", TRANSLATIONS)
def test_translation_mirrors_the_diagram(name: str) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    text = (REPO / name).read_text(encoding="utf-8")
    assert diagram_edges(text) == diagram_edges(readme)
    assert text.index("```mermaid") < text.index("```sh")


@pytest.mark.parametrize("name", TRANSLATIONS)
def test_translation_links_to_every_docs_page_of_the_readme(name: str) -> None:
    readme = set(DOC_LINK.findall((REPO / "README.md").read_text(encoding="utf-8")))
    text = set(DOC_LINK.findall((REPO / name).read_text(encoding="utf-8")))
    assert len(readme) >= 10 and readme <= text, sorted(readme - text)
