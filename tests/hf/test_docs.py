"""The Python example of docs/usage.md's "Hugging Face models" section runs as written."""

import pathlib
import re

import pytest

pytest.importorskip("transformers")

USAGE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "usage.md"


def test_usage_example_runs():
    text = USAGE.read_text()
    section = text[text.index("## Hugging Face models\n"):]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"^```python\n(.*?)^```", section, flags=re.M | re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], f"{USAGE}:Hugging Face models", "exec"), {})
