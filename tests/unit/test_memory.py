"""Reading a process's memory (serving.runtime.memory)."""

from __future__ import annotations

import pytest

from serving.runtime import memory
from serving.runtime.memory import pss_bytes


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pids the kernel was asked about; the PSS it answers grows by 1 MB with each read."""
    asked: list[int] = []

    def read(pid: int) -> int:
        asked.append(pid)
        return len(asked) * 10**6

    monkeypatch.setattr(memory, "_read_pss", read)
    monkeypatch.setattr(memory, "_READ", {})
    return asked


def test_a_recent_read_is_reused(reads: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(memory.time, "monotonic", lambda: clock[0])
    assert pss_bytes(7, max_age_s=1.0) == 10**6
    clock[0] += 0.5
    assert pss_bytes(7, max_age_s=1.0) == 10**6  # NOTE: reused
    assert pss_bytes(8, max_age_s=1.0) == 2 * 10**6  # NOTE: another process
    clock[0] += 1.5
    assert pss_bytes(7, max_age_s=1.0) == 3 * 10**6  # NOTE: too old
    assert pss_bytes(7) == 4 * 10**6  # NOTE: no max age: always read
    assert reads == [7, 8, 7, 7]


def test_a_process_that_is_gone_reads_as_zero() -> None:
    assert pss_bytes(2**22 + 17, max_age_s=1.0) == 0
