"""The generated reference pages match the code (regenerate with `make docs`)."""

from __future__ import annotations

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
