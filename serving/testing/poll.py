"""Polling with a deadline: how tests wait for something to become true, never a bare sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["wait_for"]


def _transient() -> tuple[type[BaseException], ...]:
    """Errors that mean "not yet": a server still starting, an entry not listed yet."""
    kinds: tuple[type[BaseException], ...] = (ConnectionError, LookupError)
    try:
        import httpx
    except ImportError:  # pragma: no cover -- NOTE: httpx comes with the serve and dev extras
        return kinds
    return (*kinds, httpx.HTTPError)


def wait_for(
    predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that; fail at the deadline.

    A connection error, an HTTP error or a missing key/index counts as "not yet",
    and the last one is in the failure message; any other exception propagates.
    """
    transient = _transient()
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except transient as exc:
            last = exc  # NOTE: remembered for the failure message; never counts as success
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}: last={last!r}")
