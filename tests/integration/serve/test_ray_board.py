"""The board on real Ray: a detached actor that ends itself once no replica calls it."""

from __future__ import annotations

import uuid

import pytest
import ray

from serving.server.ray.board import BOARD_NAMESPACE, BOARD_OPTIONS, Board
from serving.testing.poll import wait_for

pytestmark = [pytest.mark.ray]


def _gone(name: str) -> bool:
    try:
        ray.get_actor(name, namespace=BOARD_NAMESPACE)
    except ValueError:
        return True
    return False


def test_an_idle_board_ends_itself_for_good_and_a_called_one_stays(cluster) -> None:
    idle, busy = f"board-idle-{uuid.uuid4().hex[:8]}", f"board-busy-{uuid.uuid4().hex[:8]}"
    # NOTE: the app's own options, restarts included: an end on purpose must not come back.
    boards = {
        name: Board.options(
            name=name, namespace=BOARD_NAMESPACE, lifetime="detached", **BOARD_OPTIONS
        ).remote(idle_exit_s=1.0)
        for name in (idle, busy)
    }
    try:
        ray.get([b.report.remote("m", "r1", {"version": "1"}) for b in boards.values()])

        def idle_gone_while_busy_called() -> bool:
            # NOTE: a replica's follower calls at least every few seconds; here every poll.
            ray.get(boards[busy].report.remote("m", "r1", {"version": "1"}))
            return _gone(idle)

        wait_for(idle_gone_while_busy_called, timeout=60, what="the idle board to end")
        assert not _gone(busy)
        snap = ray.get(boards[busy].snapshot.remote(60.0))
        assert set(snap["m"]["replicas"]) == {"r1"}
        # NOTE: still gone a while later (no restart under max_restarts=-1).
        wait_for(lambda: _gone(busy), timeout=60, what="the busy board to end once left alone")
        assert _gone(idle)
    finally:
        for board in boards.values():
            ray.kill(board, no_restart=True)
