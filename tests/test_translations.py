"""README.ko.md and README.ja.md repeat the quick start of README.md exactly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRANSLATIONS = ["README.ko.md", "README.ja.md"]
FENCE = re.compile(r"^```sh\n(.*?)^```$", re.MULTILINE | re.DOTALL)


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
