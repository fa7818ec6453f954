"""The generated reference pages match the code (regenerate with `make docs`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pagctl import _docgen


@pytest.mark.parametrize("rel", sorted(_docgen.PAGES))
def test_generated_page_is_up_to_date(rel: str) -> None:
    path = _docgen.ROOT / rel
    assert path.exists(), f"{rel} is missing; run `make docs`"
    assert path.read_text(encoding="utf-8") == _docgen.PAGES[rel](), (
        f"{rel} is out of date with the code; run `make docs` (python -m pagctl._docgen)")


def test_every_command_and_option_is_documented() -> None:
    text = _docgen.cli_markdown()
    for command in ("attack", "compare", "plugins", "train"):
        assert f"## `pagctl {command}`" in text
    for option in ("--eps-sweep", "--state", "--indices", "--set", "--resume"):
        assert f"`{option}`" in text


def test_spec_reference_states_the_lambda_mapping() -> None:
    text = _docgen.spec_markdown()
    assert "`train.pag_weight`" in text and "λ = 10·c" in text


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, punctuation dropped (letters,
    digits, '-', '_' and spaces kept), spaces to '-'."""
    kept = "".join(c for c in heading.strip().lower()
                   if c.isalnum() or c in "-_ ")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {github_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def doc_pages() -> list[Path]:
    return [_docgen.ROOT / "README.md", *sorted((_docgen.ROOT / "docs").glob("*.md")),
            _docgen.ROOT / "benchmarks" / "README.md"]


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: p.name)
def test_relative_links_reach_a_file_and_heading(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.name}: broken links: {broken}"


def test_github_slug_matches_known_anchors() -> None:
    assert github_slug("L∞: AutoAttack at ε = 0.1 and 0.15") == "l-autoattack-at-ε--01-and-015"
    assert github_slug("What a step costs") == "what-a-step-costs"
    assert github_slug("`pagctl attack`") == "pagctl-attack"
