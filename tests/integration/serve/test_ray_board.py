"""The board on real Ray: a detached actor that ends itself once no replica calls it."""

from __future__ import annotations

import uuid

import pytest
import ray
from ray import serve

from serving.server.ray.app import delete_app
from serving.server.ray.board import BOARD_NAMESPACE, BOARD_OPTIONS, Board, board_name, get_board
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
    # NOTE: the busy one stays up only while called: 5 s of silence ends it, so a CI stall
    # between two of this test's calls must not.
    boards = {
        name: Board.options(
            name=name, namespace=BOARD_NAMESPACE, lifetime="detached", **BOARD_OPTIONS
        ).remote(idle_exit_s=timeout)
        for name, timeout in ((idle, 1.0), (busy, 5.0))
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


@serve.deployment(ray_actor_options={"num_cpus": 0.01})
class Quiet:
    """An app whose replica never calls its board (as an app of model sets with no member)."""

    def __call__(self) -> str:
        return "ok"


def test_an_idle_board_stays_while_serve_runs_its_app_and_ends_after(cluster) -> None:
    app = f"quiet-{uuid.uuid4().hex[:8]}"
    # NOTE: as the deploy fixture does: one app owns "/" at a time.
    for other in list(serve.status().applications):
        delete_app(other)
    serve.run(Quiet.bind(), name=app, route_prefix="/", blocking=False)
    try:
        board = Board.options(
            name=board_name(app), namespace=BOARD_NAMESPACE, lifetime="detached", **BOARD_OPTIONS
        ).remote(idle_exit_s=0.5, app_name=app)
        # NOTE: what get_board sends: the one call this app's replica makes.
        ray.get(board.touch.remote())
        # NOTE: idle past its timeout three times over, asking Serve each time, and still there.
        wait_for(
            lambda: ray.get(board.__ray_call__.remote(lambda self: self._app_checks)) >= 3,
            timeout=60,
            what="the idle board to ask Serve about its app three times",
        )
        assert not _gone(board_name(app))
        ray.get(get_board(app).report.remote("m", "r1", {"version": "1"}))
    finally:
        serve.delete(app)
    wait_for(lambda: _gone(board_name(app)), timeout=60, what="the board of a deleted app to end")


def test_a_board_of_an_older_protocol_is_ended_when_a_replica_of_new_code_starts(cluster) -> None:
    """Code deployed in place (same cluster, same app name) must not find the old code's
    board: it would fail every call, and that board would never end while its app runs."""
    app = f"proto-{uuid.uuid4().hex[:8]}"
    old = Board.options(
        name=board_name(app, 1), namespace=BOARD_NAMESPACE, lifetime="detached", **BOARD_OPTIONS
    ).remote(idle_exit_s=600)
    ray.get(old.touch.remote())
    board = get_board(app)
    try:
        assert ray.get(board.wait_many.remote("r1", {"m": 0}, 0.0)) == {}
        wait_for(lambda: _gone(board_name(app, 1)), timeout=30, what="the older board to end")
        assert not _gone(board_name(app))
    finally:
        ray.kill(board, no_restart=True)
