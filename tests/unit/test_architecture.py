"""ARCHITECTURE.md names real modules, and the import contracts hold and can fail."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "ARCHITECTURE.md"


def _named_modules(text: str) -> set[str]:
    """Every ``serving.x.y`` and every ``pkg/module.py`` path the document puts in backticks."""
    names: set[str] = set()
    for code in re.findall(r"`([^`]+)`", text):
        for dotted in re.findall(r"\bserving(?:\.[a-z_]+)+", code):
            names.add(dotted)
        for path in re.findall(r"\b([a-z_]+(?:/[a-z_]+)*\.py)\b", code):
            names.add(path)
    return names


def _exists(name: str) -> bool:
    if name.endswith(".py"):
        return (ROOT / "serving" / name).is_file() or (ROOT / name).is_file()
    parts = name.split(".")
    # NOTE: a dotted name may end in a class or function (serving.dataplane.DataPlane): a
    # prefix that is a module or package is what must exist.
    for end in range(len(parts), 1, -1):
        base = ROOT.joinpath(*parts[:end])
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return True
    return False


def test_every_module_the_architecture_names_exists() -> None:
    names = _named_modules(DOC.read_text())
    assert len(names) > 30, "the document names too few modules for the check to mean anything"
    missing = sorted(n for n in names if not _exists(n))
    assert not missing, f"ARCHITECTURE.md names modules that do not exist: {missing}"


def test_every_top_level_package_is_described() -> None:
    text = DOC.read_text()
    tops = {p.stem for p in (ROOT / "serving").iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    tops -= {"__init__", "__pycache__"}
    undescribed = sorted(t for t in tops if f"serving.{t}" not in text)
    assert not undescribed, f"ARCHITECTURE.md does not describe: {undescribed}"


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(exe), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "serving", tmp_path / "serving", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_contracts_hold_on_the_package(tree: Path) -> None:
    result = _lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("errors.py", "import serving.cli\n", "Layers"),
        ("protocol/types.py", "import serving.server.rest\n", "Layers"),
        ("formats/guard.py", "import serving.formats.pickled\n", "cycles"),
    ],
)
def test_an_upward_import_or_a_cycle_breaks_lint(tree: Path, module: str, line: str, contract: str) -> None:
    path = tree / "serving" / module
    path.write_text(path.read_text() + "\n" + line)
    result = _lint_imports(tree)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout
    assert contract.lower() in result.stdout.lower()
