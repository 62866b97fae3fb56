"""The multi-node cluster suite (``make test-cluster``): a real Ray cluster of three nodes.

Every test module here sets the ``cluster`` marker, which the default run deselects
(``-m "not cluster"`` in pytest's addopts); ``make test-cluster`` selects it with
``-m cluster``. It needs its own pytest process: it connects this process to the
cluster it starts, which cannot share a process with the one-node ``cluster``
fixture of tests/integration.

The figures each test measures (failures in the reschedule window, seconds to
converge and to reschedule) are printed at the end of the run.
"""

from __future__ import annotations

from typing import Any

import pytest

FIGURES: dict[str, Any] = {}
"""Figures the cluster tests measured, printed in the terminal summary."""


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("multi-node cluster figures")
    for key, value in FIGURES.items():
        terminalreporter.write_line(f"{key}: {value}")


class _Prefixed(dict[str, Any]):
    """Figures written under a prefix that names the test's store."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self._prefix = prefix

    def __setitem__(self, key: str, value: Any) -> None:
        FIGURES[f"{self._prefix}{key}"] = value


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Where a test records a figure it measured (printed at the end of the run), by store."""
    callspec = getattr(request.node, "callspec", None)
    store = callspec.params.get("deployed") if callspec is not None else None
    return _Prefixed(f"[{store}] " if store else "")
