"""A pull's total deadline and minimum rate, judged on an injected clock."""

from __future__ import annotations

import pytest

from serving.errors import StoreUnavailable
from serving.store.pull import Pull


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_steady_pull_above_the_rate_never_fails() -> None:
    clock = Clock()
    pull = Pull("m:1", timeout_s=600, min_bytes_per_s=1000, window_s=10, clock=clock)
    with pull.reading():
        for _ in range(100):
            clock.now += 1
            pull.received(1500)
        assert pull.check() is None


def test_time_between_reads_does_not_count_against_the_rate() -> None:
    """Listing the version and hashing a blob another version shares send no bytes."""
    clock = Clock()
    pull = Pull("m:1", timeout_s=600, min_bytes_per_s=1000, window_s=10, clock=clock)
    clock.now += 60  # e.g. re-hashing 40 GiB of shared weights before the first read
    assert pull.check() is None
    with pull.reading():
        for _ in range(20):
            clock.now += 1
            pull.received(1500)
    clock.now += 60  # and between two files
    assert pull.check() is None
    with pull.reading():
        clock.now += 11  # ... but a read that gets nothing for a whole window fails
        assert "minimum rate" in (pull.check() or "")


def test_a_trickle_fails_once_a_full_window_is_under_the_rate() -> None:
    clock = Clock()
    pull = Pull("m:1", timeout_s=600, min_bytes_per_s=1000, window_s=10, clock=clock)
    with pull.reading():
        for _ in range(10):
            clock.now += 1
            pull.received(20_000)  # a good start ...
        for _ in range(9):
            clock.now += 1
            pull.received(1)  # ... then one byte a second: the window still holds the good second
        assert pull.check() is None
        clock.now += 2
        with pytest.raises(StoreUnavailable, match=r"minimum rate.*SERVING_PULL_MIN_BYTES_PER_S"):
            pull.received(1)
    # The first reason sticks.
    assert "minimum rate" in (pull.check() or "")


def test_a_pull_that_never_receives_a_byte_fails_after_one_window() -> None:
    clock = Clock()
    pull = Pull("m:1", timeout_s=600, min_bytes_per_s=1, window_s=10, clock=clock)
    with pull.reading():
        clock.now += 9.9
        assert pull.check() is None
        clock.now += 0.2
        assert "minimum rate" in (pull.check() or "")


def test_the_total_deadline_holds_whatever_the_rate() -> None:
    clock = Clock()
    pull = Pull("m:1", timeout_s=30, min_bytes_per_s=0, window_s=10, clock=clock)
    clock.now += 29
    pull.received(10**9)
    clock.now += 2
    with pytest.raises(StoreUnavailable, match=r"took over 30 s.*SERVING_PULL_TIMEOUT_S"):
        pull.received(1)


def test_a_failed_pull_interrupts_what_registers_later_at_once_and_one_per_slot() -> None:
    clock = Clock()
    pull = Pull("m:1", timeout_s=1, min_bytes_per_s=0, window_s=10, clock=clock)
    calls: list[str] = []
    pull.on_abort(lambda: calls.append("first"), slot="reader")
    pull.on_abort(lambda: calls.append("second"), slot="reader")  # replaces the first
    clock.now += 2
    assert pull.check() is not None
    pull._abort()
    assert calls == ["second"]
    pull.on_abort(lambda: calls.append("late"))
    assert calls == ["second", "late"]
