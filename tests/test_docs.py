"""Every test the documentation names exists: a claim in docs/reliability.md stands on a
test that can fail, not on a name nobody wrote."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
RELIABILITY = ROOT / "docs" / "reliability.md"
# `test_x.py::test_name`, `tests/test_x.py`, or a bare `test_name`, each in backticks
CITATION = re.compile(r"`(?:tests/)?(test_\w+\.py)(?:::(\w+))?`|`(::\w+)`|`(test_\w+)`")


def citations(text: str) -> list[tuple[str, str | None]]:
    """(file, test or None) for each citation; a bare `::name` or `test_name` is refused:
    it does not say which file."""
    found: list[tuple[str, str | None]] = []
    for match in CITATION.finditer(text):
        file, name, bare_colon, bare = match.groups()
        if bare_colon or bare:
            raise AssertionError(f"{match.group(0)} names no file: write `test_x.py::name`")
        found.append((file, name))
    return found


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_the_parser_reads_every_form_and_refuses_a_citation_without_a_file() -> None:
    text = "`test_a.py::test_b`, `tests/test_c.py`, `test_d.py` and `not_a_test.py`"
    assert citations(text) == [("test_a.py", "test_b"), ("test_c.py", None), ("test_d.py", None)]
    with pytest.raises(AssertionError, match="names no file"):
        citations("`::test_b`")
    with pytest.raises(AssertionError, match="names no file"):
        citations("`test_b`")


def test_every_test_cited_in_reliability_md_exists() -> None:
    cited = citations(RELIABILITY.read_text(encoding="utf-8"))
    assert len(cited) >= 30  # the scenarios table alone cites more; a broken regex finds 0
    missing = []
    for file, name in cited:
        path = TESTS / file
        if not path.is_file():
            missing.append(file)
        elif name is not None and name not in defined_tests(path):
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/reliability.md cites tests that do not exist: {missing}"


def test_every_scenario_tried_names_a_test() -> None:
    text = RELIABILITY.read_text(encoding="utf-8")
    table = text.split("## Scenarios tried", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")][2:]  # header, rule
    assert len(rows) >= 20
    for row in rows:
        last = row.rstrip().rstrip("|").rsplit("|", 1)[1]
        assert citations(last), f"a scenario without a test: {row[:80]}"
