"""Every Python example of docs/design.md's "Where things plug in" section runs as written (each in a fresh
namespace; the examples assert their own results)."""

from __future__ import annotations

import pathlib
import re

import pytest

DESIGN = pathlib.Path(__file__).resolve().parents[1] / "docs" / "design.md"


def _examples() -> list[tuple[str, str]]:
    text = DESIGN.read_text()
    start = text.index("## Where things plug in")
    end = text.index("\n## ", start + 1)
    section = text[start:end]
    out = []
    for match in re.finditer(r"^### (.+?)$|^```python\n(.*?)^```", section, flags=re.M | re.S):
        if match.group(1):
            heading = match.group(1)
        else:
            out.append((heading, match.group(2)))
    return out


def test_the_section_has_an_example_per_seam():
    headings = [h for h, _ in _examples()]
    assert headings == ["A dispatcher", "A transport", "A planner", "A model"]


@pytest.mark.parametrize("heading, code", _examples(), ids=[h for h, _ in _examples()])
def test_example_runs(heading, code):
    exec(compile(code, f"{DESIGN.name}: {heading}", "exec"), {"__name__": "design_example"})
