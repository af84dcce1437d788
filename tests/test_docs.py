"""The README's promises that code can check."""

from __future__ import annotations

import re
from pathlib import Path

from crawler.errors import ErrorKind

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


def test_error_table_lists_exactly_the_error_kinds() -> None:
    section = README.split("### Error kinds", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_<>]+)` \|", section, re.MULTILINE))
    assert documented - {"error"} == {str(k) for k in ErrorKind} | {"http_<status>"}


def test_readme_opens_with_the_two_commands() -> None:
    first_block = README.split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
