"""The board's own end: it prunes replicas that went without a word, and exits once idle.

The board's logic as a plain class (``Board.__ray_actor_class__``), without Ray; the exit on
real Ray is in ``tests/integration/serve/test_ray_board.py``."""

from __future__ import annotations

import asyncio
import time

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
        waiting = asyncio.create_task(board.wait_many("r1", {"m": 0}, 5.0))
        await asyncio.sleep(0)
        assert not board.idle(time.monotonic() + 10), "a replica long-polling is alive"
        await board.request_load("m")  # ends the wait
        assert (await waiting)["m"] > 0
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


def test_a_load_request_wakes_only_the_waits_that_cover_its_model() -> None:
    """Replicas each long-poll the board for all their members; one model's load request
    must not wake the waits that do not cover it (each woken wait re-checks every model)."""

    async def scenario() -> None:
        board = BoardClass(idle_exit_s=60)
        others = [
            asyncio.create_task(board.wait_many("r1", {f"m{i}": 0}, 30.0), name=f"other-{i}")
            for i in range(20)
        ]
        mine = asyncio.create_task(board.wait_many("r1", {"a": 0}, 30.0), name="mine")
        await asyncio.sleep(0.01)
        assert await board.request_load("a") > 0
        assert (await mine)["a"] > 0
        woken = [w for m in (f"m{i}" for i in range(20)) for w in board._waits[m] if w.event.is_set()]
        assert woken == []
        assert not any(t.done() for t in others)
        # NOTE: and each other model's own request still reaches its waiter.
        await board.request_load("m3")
        assert (await others[3])["m3"] > 0
        for task in others:
            task.cancel()

    asyncio.run(scenario())


def test_one_wait_covers_all_of_a_replicas_models_and_returns_only_those_due() -> None:
    async def scenario() -> None:
        board = BoardClass(idle_exit_s=60)
        seen = {f"m{i}": 0 for i in range(50)}
        waiting = asyncio.create_task(board.wait_many("r1", seen, 30.0, 1))
        await asyncio.sleep(0.01)
        assert board._waiting == 1
        generation = await board.request_load("m7")
        assert await waiting == {"m7": generation}
        # NOTE: once a replica has started its check, a request is a new one (that check
        # began before it); until another starts, requests join that one.
        seen["m7"] = generation
        assert await board.start("m7", "r1", generation) == generation
        second = await board.request_load("m7")
        assert second > generation
        assert await board.request_load("m7") == second
        assert await board.wait_many("r1", seen, 0.0, 1) == {"m7": second}
        # NOTE: handed over is not started: a follower busy with a check has not begun it.
        assert await board.request_load("m7") == second
        # NOTE: a start covers every request up to the newest, handed over or not yet.
        assert await board.start("m7", "r1", generation) == second
        assert await board.wait_many("r1", {"m3": 0, "m4": 0}, 0.01, 1) == {}
        # NOTE: a wait that a board restart left behind lifts the board's count to its own.
        fresh = BoardClass(idle_exit_s=60)
        behind = asyncio.create_task(fresh.wait_many("r2", {"m1": 0}, 30.0, 1))
        await asyncio.sleep(0.01)
        assert await fresh.wait_many("r1", {"m1": 5000}, 0.01, 1) == {}
        assert await behind == {"m1": 5000}

    asyncio.run(scenario())


def test_members_added_join_the_replicas_wait_in_flight_or_end_an_older_one_sent_late() -> None:
    """A replica that loads a member adds it to its wait in flight (no new wait carrying
    every member); the change may reach the board before or after that wait."""

    async def scenario() -> None:
        board = BoardClass(idle_exit_s=60)
        current = asyncio.create_task(board.wait_many("r1", {"a": 0}, 30.0, 1))
        other = asyncio.create_task(board.wait_many("r2", {"a": 0}, 30.0, 1))
        await asyncio.sleep(0.01)
        await board.join("r1", 2, {"b": 0})
        await asyncio.sleep(0.01)
        assert not current.done(), "the wait goes on, now covering b"
        assert sorted(board._waits) == ["a", "b"]
        assert len(board._waits["b"]) == 1
        generation = await board.request_load("b")
        assert await asyncio.wait_for(current, 1.0) == {"b": generation}
        assert not other.done(), "another replica's wait does not cover b"
        # NOTE: a member already due when it joins ends the wait at once.
        waiting = asyncio.create_task(board.wait_many("r1", {"a": 0, "b": generation}, 30.0, 2))
        await asyncio.sleep(0.01)
        await board.request_load("c")
        await board.join("r1", 3, {"c": 0})
        assert set(await asyncio.wait_for(waiting, 1.0)) == {"c"}
        # NOTE: the change arrived first: a wait sent before it (epoch 3) ends at once.
        await board.join("r1", 4, {"d": 0})
        assert await asyncio.wait_for(board.wait_many("r1", {"a": 0}, 30.0, 3), 1.0) == {}
        other.cancel()

    asyncio.run(scenario())


def test_one_report_carries_many_rows_and_a_stopped_followers_late_rows_are_dropped() -> None:
    async def scenario() -> None:
        board = BoardClass(idle_exit_s=60)
        await board.report_many("r1", [("a", {"version": "1"}, "fa"), ("b", {"version": "2"}, "fb")])
        await board.report_many("r1", [], [("b", "fb")])
        await board.report_many("r1", [("a", {"version": "3"}, "fa"), ("b", {"version": "2"}, "fb")])
        snap = await board.snapshot(1e9)
        assert snap["a"]["replicas"]["r1"]["version"] == "3"
        assert snap["b"]["replicas"] == {}
        # NOTE: in one call, the forget goes first: a new follower of the same model stays.
        await board.report_many("r1", [("a", {"version": "4"}, "fa2")], [("a", "fa")])
        snap = await board.snapshot(1e9)
        assert snap["a"]["replicas"]["r1"]["version"] == "4"

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
