"""A replica's one line to its board (``BoardLink``): one long-poll and one report for all the
models it serves, load requests and pokes handed to each model's follower.

The board is the real board's logic (``Board.__ray_actor_class__``) on an event loop in a
thread, called the way Ray calls it (``board.method.remote(...)``, then a result); the
followers run the real ``run_forever`` over a watcher that counts its ticks."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from serving.server.ray import board as board_module
from serving.server.ray.board import Board, BoardLink, Follower
from serving.testing.poll import wait_for

BoardClass = Board.__ray_actor_class__


class LoopBoard:
    """``board.method.remote(*args)`` runs the board's method on its loop; returns a future."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.board = BoardClass(idle_exit_s=600)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.board, name)
        return SimpleNamespace(
            remote=lambda *args: asyncio.run_coroutine_threadsafe(method(*args), self.loop)
        )

    def call(self, name: str, *args: Any) -> Any:
        return getattr(self, name).remote(*args).result(5)

    def inspect(self, read: Any) -> Any:
        """Read the board's state on its loop."""

        async def run() -> Any:
            return read(self.board)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def close(self) -> None:
        # NOTE: the calls sent and not waited for (a stopped follower's forget) run first.
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


class Ticks:
    """A watcher that counts its ticks (``True`` for a forced one) and waits 30 s between them."""

    def __init__(self, name: str) -> None:
        self.slot = SimpleNamespace(name=name)
        self.forced: list[bool] = []
        self.stopping: threading.Event | None = None

    def tick(self, force: bool = False) -> bool:
        self.forced.append(force)
        return True

    def next_delay(self) -> float:
        return 30.0


def follower(name: str, link: BoardLink) -> Follower:
    service = SimpleNamespace(
        config=SimpleNamespace(name=name),
        start=lambda: None,
        watcher=Ticks(name),
        status=lambda: {"version": "1"},
    )
    made = Follower(service, link)  # type: ignore[arg-type]
    made._node_id = "node-1"
    return made


@pytest.fixture
def board(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopBoard]:
    async def idle_reaper(self: object) -> None:
        return None

    monkeypatch.setattr(BoardClass, "_reap", idle_reaper)
    monkeypatch.setattr(BoardLink, "_result", staticmethod(lambda ref, timeout: ref.result(timeout)))
    made = LoopBoard()
    yield made
    made.close()


def covered(board: LoopBoard, replica: str) -> list[list[str]]:
    return board.inspect(lambda b: [sorted(w.models) for w in b._replica_waits.get(replica, ())])


def test_one_wait_covers_the_replicas_models_and_a_load_request_reaches_only_its_own(board) -> None:
    link = BoardLink(board, "r1")
    a, b = follower("a", link), follower("b", link)
    try:
        a.start()
        b.start()
        wait_for(lambda: covered(board, "r1") == [["a", "b"]], timeout=5, what="one wait for a and b")
        generation = board.call("request_load", "b")
        wait_for(lambda: True in b.service.watcher.forced, timeout=5, what="b's forced tick")
        # NOTE: the row says the request is done (what a load's wait_done reads), after the tick.
        wait_for(
            lambda: board.call("snapshot", 60.0)["b"]["replicas"]["r1"]["generation"] >= generation,
            timeout=5,
            what="b's row to show the request done",
        )
        assert a.service.watcher.forced == [False]
        # NOTE: a poke is this replica's own: no call, and only a's watcher ticks.
        a.nudge()
        wait_for(lambda: a.service.watcher.forced == [False, True], timeout=5, what="a's poked tick")
        assert b.service.watcher.forced.count(True) == 1
    finally:
        a.stop()
        b.stop()
        link.close()


def test_a_member_added_joins_the_wait_at_once_and_one_stopped_leaves_the_board(board) -> None:
    link = BoardLink(board, "r1")
    a = follower("a", link)
    a.start()
    wait_for(lambda: covered(board, "r1") == [["a"]], timeout=5, what="a's wait")
    # NOTE: the wait in flight does not cover c; the add ends it well before its 10 s.
    c = follower("c", link)
    c.start()
    wait_for(lambda: covered(board, "r1") == [["a", "c"]], timeout=3, what="the wait to cover c")
    generation = board.call("request_load", "c")
    wait_for(lambda: True in c.service.watcher.forced, timeout=3, what="c's forced tick")
    wait_for(lambda: "c" in board.call("snapshot", 60.0), timeout=5, what="c's row")
    c.stop()
    wait_for(lambda: board.call("snapshot", 60.0)["c"]["replicas"] == {}, timeout=5, what="c's row to go")
    assert board.inspect(lambda b: b._generation["c"]) == generation
    a.stop()
    link.close()


def test_a_board_that_ended_for_good_is_looked_up_again(board, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica's handle to a board that ended (no restart) fails for good; the link finds
    the app's board again and sends it every row."""
    fresh = LoopBoard()
    looked_up: list[str] = []

    def get_board(app_name: str) -> LoopBoard:
        looked_up.append(app_name)
        return fresh

    class Dead:
        def __getattr__(self, name: str) -> Any:
            def remote(*args: Any) -> Any:
                raise board_module.ray.exceptions.ActorDiedError()

            return SimpleNamespace(remote=remote)

    monkeypatch.setattr(board_module, "get_board", get_board)
    link = BoardLink(Dead(), "r1", app_name="fraud")
    a = follower("a", link)
    try:
        a.start()
        wait_for(lambda: covered(fresh, "r1") == [["a"]], timeout=10, what="a's wait on the new board")
        assert looked_up == ["fraud"]
        wait_for(
            lambda: "r1" in fresh.call("snapshot", 60.0).get("a", {}).get("replicas", {}),
            timeout=5,
            what="a's row",
        )
    finally:
        a.stop()
        link.close()
        fresh.close()
