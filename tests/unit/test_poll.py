"""serving.testing.poll.wait_for: what the tests wait with."""

from __future__ import annotations

import pytest

from serving.testing.poll import wait_for


def test_it_returns_the_first_truthy_value_and_treats_not_yet_errors_as_not_yet() -> None:
    calls = iter([KeyError("no replica yet"), ConnectionError("refused"), 0, [], "ready"])

    def check() -> object:
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    assert wait_for(check, timeout=5, interval=0.001) == "ready"


def test_any_other_error_propagates_at_once() -> None:
    def check() -> object:
        raise ValueError("a bug, not a wait")

    with pytest.raises(ValueError, match="a bug"):
        wait_for(check, timeout=5)


def test_the_deadline_fails_with_what_and_the_last_value() -> None:
    def check() -> object:
        raise IndexError("still empty")

    with pytest.raises(AssertionError, match=r"waiting for the index: last=IndexError\('still empty'\)"):
        wait_for(check, timeout=0.05, interval=0.01, what="the index")
