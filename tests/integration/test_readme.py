"""The README's examples run as written.

A fenced block preceded by ``<!-- test -->`` is run (``python`` or ``bash``),
in document order, in one fresh directory, as a reader following the README
would. A ``text`` block preceded by ``<!-- output -->`` lists lines that must
appear, in order, in the output of the block before it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
_BLOCK = re.compile(r"<!-- (test|output) -->\n```(\w+)\n(.*?)\n```", re.DOTALL)


@dataclass
class Block:
    lang: str
    code: str
    line: int
    expected: list[str] = field(default_factory=list)


def readme_blocks() -> list[Block]:
    text = README.read_text()
    blocks: list[Block] = []
    for m in _BLOCK.finditer(text):
        kind, lang, body = m.groups()
        line = text.count("\n", 0, m.start()) + 1
        if kind == "test":
            blocks.append(Block(lang, body, line))
        else:
            assert blocks, f"README.md:{line}: an output block must follow a test block"
            blocks[-1].expected = body.splitlines()
    return blocks


def test_readme_marks_the_seed_example_and_the_cli_walkthrough() -> None:
    langs = [b.lang for b in readme_blocks()]
    assert langs.count("python") >= 2
    assert "bash" in langs


@pytest.mark.slow
def test_readme_examples_run_as_written(tmp_path: Path) -> None:
    """Each marked block exits 0 and prints what its output block says, in order."""
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SERVING_", "AWS_"))}
    env.update(
        PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
        SERVING_CACHE_DIR=str(tmp_path / "node-cache"),
        SERVING_PROGRESS="false",
    )
    work = tmp_path / "reader"
    work.mkdir()
    for block in readme_blocks():
        if block.lang == "python":
            cmd = [sys.executable, "-c", block.code]
        elif block.lang == "bash":
            cmd = ["bash", "-e", "-u", "-o", "pipefail", "-c", block.code]
        else:
            raise AssertionError(f"README.md:{block.line}: cannot run a {block.lang!r} block")
        result = subprocess.run(
            cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        where = f"README.md:{block.line} ({block.lang})"
        assert result.returncode == 0, f"{where} failed:\n{result.stdout}\n{result.stderr}"
        rest = result.stdout
        for line in block.expected:
            assert line in rest, f"{where}: expected {line!r} in order in:\n{result.stdout}"
            rest = rest[rest.index(line) + len(line) :]
