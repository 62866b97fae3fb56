"""The per-node lock replicas take before probing a version: held, waited for, given up on."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from serving.isolation.prober import _node_lock


def test_the_lock_is_taken_when_free_and_released_on_exit(tmp_path: Path) -> None:
    path = tmp_path / "v.lock"
    with _node_lock(path, 5.0) as held:
        assert held
        other = os.open(path, os.O_RDWR)
        try:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                raise AssertionError("a second holder got the lock")
            except BlockingIOError:
                pass
        finally:
            os.close(other)
    with _node_lock(path, 5.0) as again:
        assert again


def test_a_waiter_gets_the_lock_when_the_holder_lets_go(tmp_path: Path) -> None:
    path = tmp_path / "v.lock"
    entered, release = threading.Event(), threading.Event()

    def holder() -> None:
        with _node_lock(path, 5.0):
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    assert entered.wait(10)
    threading.Timer(0.2, release.set).start()
    with _node_lock(path, 10.0) as held:
        assert held
        assert release.is_set()  # NOTE: not before the holder let go
    thread.join(10)


def test_a_holder_stuck_past_the_deadline_is_gone_around(tmp_path: Path) -> None:
    path = tmp_path / "v.lock"
    stuck = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(stuck, fcntl.LOCK_EX)
    try:
        with _node_lock(path, 0.2) as held:
            assert held is False
    finally:
        os.close(stuck)
