"""Every Python example of README.md: each is marked with how it is tested, and run that way
(or, where it needs vLLM, which is not installable here, checked to be valid Python)."""

import re
from pathlib import Path

import pytest

from ranks import run_ranks

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<how>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def blocks():
    return [(m.group("how"), m.group("code")) for m in BLOCK.finditer(README.read_text())]


def test_every_python_example_says_how_it_is_tested():
    found = blocks()
    assert found, "README.md has no Python example"
    for how, code in found:
        assert how is not None, f"a Python example without a readme-test mark:\n{code}"


@pytest.mark.parametrize("index", range(len(blocks())))
def test_the_readme_example_runs_as_marked(index, tmp_path):
    how, code = blocks()[index]
    if how == "two ranks":
        script = tmp_path / "rank.py"
        script.write_text(code)
        for rank, out in enumerate(run_ranks([script])):
            assert f"rank {rank} of 2: ok" in out, out
    elif how.startswith("syntax only"):
        compile(code, "README.md", "exec")
    else:
        pytest.fail(f"unknown readme-test mark `{how}`")
