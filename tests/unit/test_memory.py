"""Reading a process's memory (serving.runtime.memory)."""

from __future__ import annotations

import os

import numpy as np

from serving.runtime.memory import pss_bytes


def test_a_recent_pss_read_is_reused_and_a_fresh_one_sees_growth() -> None:
    pid = os.getpid()
    before = pss_bytes(pid, max_age_s=3600)
    grown = np.ones(64 * 2**20, dtype=np.uint8)  # NOTE: 64 MiB, every page touched
    assert pss_bytes(pid, max_age_s=3600) == before
    assert pss_bytes(pid) >= before + 60 * 2**20
    assert pss_bytes(pid, max_age_s=0.0) >= before + 60 * 2**20
    del grown


def test_a_process_that_is_gone_reads_as_zero() -> None:
    assert pss_bytes(2**22 + 17, max_age_s=1.0) == 0
