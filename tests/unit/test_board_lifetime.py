"""The board's own end: it prunes replicas that went without a word, and exits once idle.

The board's logic as a plain class (``Board.__ray_actor_class__``), without Ray; the exit on
real Ray is in ``tests/integration/serve/test_ray_board.py``."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from serving.server.ray.board import Board

BoardClass = Board.__ray_actor_class__


@pytest.fixture(autouse=True)
def no_reaper(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests ask ``should_end`` themselves; the reaper would end the actor through Ray
    (and start Ray to do it)."""

    async def idle_reaper(self: object) -> None:
        return None

    monkeypatch.setattr(BoardClass, "_reap", idle_reaper)


def test_a_board_is_idle_only_after_no_call_for_its_timeout_and_not_while_a_replica_waits() -> None:
    async def scenario() -> None:
        board = BoardClass(idle_exit_s=0.2)
        await board.report("m", "r1", {"version": "1"})
        now = time.monotonic()
        assert not board.idle(now)
        assert board.idle(now + 0.3)
        waiting = asyncio.create_task(board.wait("m", "r1", 0, 5.0))
        await asyncio.sleep(0)
        assert not board.idle(time.monotonic() + 10), "a replica long-polling is alive"
        await board.request_load("m")  # ends the wait
        assert await waiting > 0
        assert not board.idle(time.monotonic()), "the wait's end counts as a call"

    asyncio.run(scenario())


def test_prune_drops_only_rows_older_than_its_limit_and_the_models_left_empty() -> None:
    async def scenario() -> None:
        board = BoardClass(idle_exit_s=60)
        await board.report("a", "gone", {"version": "1"})
        await board.report("a", "live", {"version": "1"})
        await board.report("b", "gone", {"version": "2"})
        now = time.time()
        board._replicas["a"]["gone"]["reported_at"] = now - 100
        board._replicas["b"]["gone"]["reported_at"] = now - 100
        assert board.prune(50, now) == 2
        snap = await board.snapshot(1e9)
        assert set(snap) == {"a"}
        assert set(snap["a"]["replicas"]) == {"live"}
        assert board.prune(50, now) == 0

    asyncio.run(scenario())


def test_a_poke_or_load_request_wakes_only_its_own_models_waiters(monkeypatch) -> None:
    """A thousand members each long-poll the board; one model's load request or poke must
    not wake the others' waits (each woken wait re-takes a lock and re-checks)."""
    wakes: Counter[str] = Counter()

    class Counting(asyncio.Condition):
        async def wait(self) -> bool:
            result = await super().wait()
            wakes["all"] += 1
            return result

    monkeypatch.setattr(asyncio, "Condition", Counting)

    async def scenario() -> None:
        board = BoardClass(idle_exit_s=60)
        others = [
            asyncio.create_task(board.wait(f"m{i}", "r1", 0, 30.0), name=f"other-{i}") for i in range(20)
        ]
        mine = asyncio.create_task(board.wait("a", "r1", 0, 30.0), name="mine")
        await asyncio.sleep(0.01)
        assert await board.request_load("a") > 0
        assert await mine > 0
        poked = asyncio.create_task(board.wait("a", "r1", await board.request_load("a"), 30.0), name="poked")
        await asyncio.sleep(0.01)
        await board.poke("a", "r1")
        assert await poked == -1
        # NOTE: one wake each for the two waits of "a"; none for the 20 others.
        assert wakes["all"] == 2
        assert not any(t.done() for t in others)
        # NOTE: and each other model's own request still reaches its waiter.
        await board.request_load("m3")
        assert await others[3] > 0
        for task in others:
            task.cancel()

    asyncio.run(scenario())


def test_an_idle_board_ends_only_once_serve_no_longer_runs_its_app(monkeypatch) -> None:
    """An app of model sets with no member loaded calls its board nobody: silence alone must
    not end the board while the app runs (its first member's load needs it)."""
    running = {"fraud"}
    monkeypatch.setattr(BoardClass, "_app_alive", staticmethod(lambda name: name in running))

    async def scenario() -> None:
        board = BoardClass(idle_exit_s=0.05, app_name="fraud")
        unnamed = BoardClass(idle_exit_s=0.05)
        await board.report("m", "r1", {"version": "1"})
        await unnamed.report("m", "r1", {"version": "1"})
        assert not await board.should_end(), "called just now"
        await asyncio.sleep(0.1)
        assert not await board.should_end(), "idle, but its app runs"
        assert not board.idle(), "the app's answer counts as a call"
        assert await unnamed.should_end(), "no app named: silence is enough"
        running.clear()
        await asyncio.sleep(0.1)
        assert await board.should_end()

    asyncio.run(scenario())


def test_a_call_that_arrives_while_serve_is_asked_keeps_the_board(monkeypatch) -> None:
    def slow_and_gone(name: str) -> bool:
        time.sleep(0.3)
        return False

    monkeypatch.setattr(BoardClass, "_app_alive", staticmethod(slow_and_gone))

    async def scenario() -> None:
        board = BoardClass(idle_exit_s=0.05, app_name="gone")
        await board.report("m", "r1", {"version": "1"})
        await asyncio.sleep(0.1)
        asking = asyncio.create_task(board.should_end())
        await asyncio.sleep(0.1)  # NOTE: Serve is being asked (0.3 s) when the report arrives
        await board.report("m", "r1", {"version": "1"})
        assert await asking is False
        await asyncio.sleep(0.1)
        assert await board.should_end() is True

    asyncio.run(scenario())
