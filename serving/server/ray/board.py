"""The board: what each replica serves, and load requests, for every Ray replica of an app.

Replicas report what they serve to a small named "board" actor, which also
carries load requests: a watcher's wait between alias checks is a long-poll on
the board, so ``POST /v2/repository/models/{name}/load`` wakes every replica of
the model at once. The board lives on the Ray head node (which a cluster cannot
lose and keep running) and is restarted in place if its process dies; see
:data:`BOARD_OPTIONS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import defaultdict
from typing import Any

import ray
from ray import serve

from serving.config import AppConfig
from serving.runtime.service import ModelService
from serving.runtime.watcher import run_forever

log = logging.getLogger(__name__)

BOARD_NAMESPACE = "serving"
HEAD_NODE_RESOURCE = "node:__internal_head__"
"""A resource only Ray's head node has (one unit)."""
BOARD_OPTIONS: dict[str, Any] = {
    # NOTE: pinned to the head. Left to the scheduler, the board landed on a worker node;
    # when that node died, surviving replicas kept a handle to the dead actor (load requests
    # answered 500 ActorDiedError) while new replicas made a second board: a split index.
    # The head holds the GCS, so losing it loses the cluster, board or not.
    "resources": {HEAD_NODE_RESOURCE: 0.001},
    # NOTE: a board whose process dies alone comes back on the head under the same handle;
    # calls in flight are retried (every method is safe to repeat). Its state comes back
    # from the replicas: reports within one wait, generations in ``wait``.
    "max_restarts": -1,
    "max_task_retries": -1,
}
"""How the board actor is placed and restarted (see :func:`get_board`)."""


MAX_FORGOTTEN = 4096
"""Stopped followers the board remembers, to drop their late reports."""

APP_CHECK_TIMEOUT_S = 30.0
"""How long an idle board waits for Serve's answer about its app (then it stays)."""

IDLE_EXIT_S = 600.0
"""A board that no replica has called for this long, and whose app Serve no longer runs,
ends itself.

The board is detached (it must outlive any one replica), so ``serve.delete`` does not end
it. Silence alone is not enough: a replica with no named model and no member loaded (an
app of model sets, idle) calls nobody, and needs its board the moment a member loads. So an
idle board asks Serve whether its app is still there, and ends only if not. Without this,
each app name ever deployed and deleted on a long-lived cluster kept a process."""


@ray.remote(num_cpus=0)
class Board:
    """What each replica serves, and per-model load requests (a generation counter).

    Generations only grow, across restarts too: a new one is at least the wall clock
    in milliseconds, and a replica that has seen more than the board knows (the board
    restarted) lifts the board's count to its own.

    A load request joins one that no replica has started yet, so each model has at
    most one forced check in flight and one queued, however many requests arrive.
    """

    def __init__(self, idle_exit_s: float = IDLE_EXIT_S, app_name: str | None = None) -> None:
        self._idle_exit_s = idle_exit_s
        self._app_name = app_name
        """The Serve app this board serves (None: not known, silence is enough)."""
        self._app_checks = 0
        """How many times an idle board asked Serve about its app."""
        self._last_call = time.monotonic()
        self._waiting = 0
        """Long-polls in progress (a replica waiting is a live replica)."""
        self._reaper: asyncio.Task[None] | None = None
        self._generation: dict[str, int] = defaultdict(int)
        self._seen: dict[str, dict[str, int]] = defaultdict(dict)
        self._replicas: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        self._changed: dict[str, asyncio.Condition] = {}
        """Per model: its load requests and pokes wake only its own waiters. NOTE: one
        condition for every model woke each of a thousand members' long-polls at every load
        request or poke, to find it was not theirs. The board's CPU on the routing bench did
        not measurably drop with it (0.24 to 0.28 cores under churn before, 0.23 after, one
        run each): most of it is the members' reports and waits themselves."""
        self._forgotten: dict[str, None] = {}
        """Followers that stopped, oldest first (a bounded ordered set)."""
        self._poked: dict[tuple[str, str], float] = {}
        """(model, replica) pairs whose current wait should end (that replica's alias feed saw
        a move), with when (:meth:`prune` drops old ones)."""

    async def report(self, model: str, replica: str, status: dict[str, Any], follower: str = "") -> None:
        self._touch()
        if follower and follower in self._forgotten:
            return  # NOTE: sent before its follower stopped, arrived after: not a row any more
        self._replicas[model][replica] = {**status, "reported_at": time.time(), "follower": follower}

    async def forget(self, model: str, replica: str, follower: str = "") -> None:
        """Take a replica's row off (it stopped serving ``model``); reports ``follower`` sent
        before it stopped and that arrive later are dropped, so the row does not come back."""
        self._touch()
        row = self._replicas[model].get(replica)
        # NOTE: a follower that stopped after the same replica loaded the model again (a member
        # unloaded while a request still used it) leaves its successor's row alone.
        if row is None or not follower or row.get("follower") in (follower, ""):
            self._replicas[model].pop(replica, None)
            self._seen[model].pop(replica, None)
        if follower:
            self._forgotten[follower] = None
            while len(self._forgotten) > MAX_FORGOTTEN:
                self._forgotten.pop(next(iter(self._forgotten)))

    async def request_load(self, model: str) -> int:
        self._touch()
        changed = self._condition(model)
        async with changed:
            current = self._generation[model]
            seen = self._seen[model].values()
            queued = current > 0 and bool(seen) and all(s < current for s in seen)
            if not queued:
                # NOTE: at least the wall clock in ms, so a restarted board (counting from 0)
                # still hands out generations above any a replica has seen.
                self._generation[model] = max(current + 1, time.time_ns() // 1_000_000)
                changed.notify_all()
            return self._generation[model]

    async def poke(self, model: str, replica: str) -> None:
        """End one replica's wait for ``model`` (its own alias feed saw the alias move), and no other's.

        NOTE: not a load request: a generation is shared by every replica, and each replica's
        feed sees the same move, so N replicas bumping it would cost N forced reads each."""
        self._touch()
        changed = self._condition(model)
        async with changed:
            self._poked[(model, replica)] = time.time()
            changed.notify_all()

    async def touch(self) -> None:
        """Nothing but a call: a replica starting up (``get_board``) starts the board's clock."""
        self._touch()

    async def wait(self, model: str, replica: str, seen: int, timeout: float) -> int:
        """Return the model's load generation as soon as it exceeds ``seen``, or at timeout;
        ``-1`` if this replica was poked (:meth:`poke`) before either."""
        self._touch()
        self._waiting += 1
        try:
            return await self._wait(model, replica, seen, timeout)
        finally:
            self._waiting -= 1
            self._last_call = time.monotonic()

    async def _wait(self, model: str, replica: str, seen: int, timeout: float) -> int:
        key = (model, replica)
        changed = self._condition(model)
        async with changed:
            if seen > self._generation[model]:
                # NOTE: a restarted board counts from 0 while its replicas kept their count:
                # take theirs, or no load request would wake them until the count caught up;
                # other waits of the model that had seen less are due now.
                self._generation[model] = seen
                changed.notify_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    changed.wait_for(lambda: self._generation[model] > seen or key in self._poked),
                    timeout,
                )
            generation = self._generation[model]
            self._seen[model][replica] = generation
            if generation <= seen and key in self._poked:
                self._poked.pop(key, None)
                return -1
            self._poked.pop(key, None)
            return generation

    async def snapshot(self, max_age_s: float) -> dict[str, Any]:
        self._touch()
        now = time.time()
        out: dict[str, Any] = {}
        for model, replicas in self._replicas.items():
            fresh = {
                r: {k: v for k, v in s.items() if k != "follower"}
                for r, s in replicas.items()
                if now - s["reported_at"] <= max_age_s
            }
            out[model] = {"generation": self._generation[model], "replicas": fresh}
        return out

    def _condition(self, model: str) -> asyncio.Condition:
        changed = self._changed.get(model)
        if changed is None:
            changed = self._changed[model] = asyncio.Condition()
        return changed

    # -- its own end -----------------------------------------------------------------
    def _touch(self) -> None:
        self._last_call = time.monotonic()
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    def idle(self, now: float | None = None) -> bool:
        """Whether no replica has called for ``idle_exit_s`` (and none is waiting)."""
        now = time.monotonic() if now is None else now
        return self._waiting == 0 and now - self._last_call > self._idle_exit_s

    def prune(self, older_than_s: float, now: float | None = None) -> int:
        """Drop rows not reported for ``older_than_s`` (replicas that went without a
        ``forget``: killed, or their node lost); returns how many. Bounds what a long-lived
        board holds to the replicas of the last ``older_than_s``."""
        now = time.time() if now is None else now
        dropped = 0
        for model in list(self._replicas):
            replicas = self._replicas[model]
            for replica in [r for r, s in replicas.items() if now - s["reported_at"] > older_than_s]:
                del replicas[replica]
                self._seen[model].pop(replica, None)
                dropped += 1
            if not replicas:
                del self._replicas[model]
                if not self._seen.get(model):
                    self._seen.pop(model, None)
        # NOTE: a poke for a replica that stopped following before its next wait would stay.
        self._poked = {key: at for key, at in self._poked.items() if now - at <= older_than_s}
        for model in [m for m, c in self._changed.items() if m not in self._replicas]:
            changed = self._changed[model]
            # NOTE: a condition someone waits on (or is about to) stays, or that wait's wake is lost.
            if not changed.locked() and not getattr(changed, "_waiters", None):
                del self._changed[model]
        return dropped

    async def _reap(self) -> None:
        """Prune dead replicas' rows now and then; end this actor once idle and its app gone."""
        every = max(0.05, min(60.0, self._idle_exit_s / 4))
        while True:
            await asyncio.sleep(every)
            try:
                if await self.should_end():
                    # NOTE: no_restart: an end on purpose, not a crash for max_restarts to undo.
                    ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                    return
            except Exception:
                log.exception("the board's reaper failed; trying again")

    async def should_end(self) -> bool:
        """Prune; then whether this board is idle and its app is gone (asked of Serve only
        when idle). An idle board whose app still runs counts as called now."""
        self.prune(max(self._idle_exit_s, 3 * REPORT_EVERY_S))
        if not self.idle():
            return False
        if self._app_name is None:
            return True
        self._app_checks += 1
        asked_at = time.monotonic()
        try:
            alive = await asyncio.wait_for(
                asyncio.to_thread(self._app_alive, self._app_name), APP_CHECK_TIMEOUT_S
            )
        except TimeoutError:
            alive = True  # NOTE: a controller that hangs keeps the board
        if alive:
            self._last_call = time.monotonic()
            return False
        # NOTE: a call that arrived while Serve was asked means a replica is alive after all.
        return self._last_call < asked_at and self.idle()

    @staticmethod
    def _app_alive(app_name: str) -> bool:
        """Whether Serve runs ``app_name``: True when asking failed (keep the board); False
        when no Serve controller runs (Serve's status is then empty)."""
        try:
            return app_name in serve.status().applications
        except Exception:  # noqa: BLE001 -- NOTE: a board kept is a process; a board lost is an outage
            return True


def get_board(app_name: str) -> Any:
    """The app's board, created if it has none; the call starts its idle clock (a replica
    that never calls it again still leaves a board that ends once its app is gone)."""
    board = Board.options(  # type: ignore[attr-defined]
        name=f"board-{app_name}",
        namespace=BOARD_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        **BOARD_OPTIONS,
    ).remote(app_name=app_name)
    board.touch.remote()
    return board


def drop_board(app_name: str) -> None:
    """End an app's board (it is detached: it outlives ``serve.delete``); nothing if it has none."""
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(f"board-{app_name}", namespace=BOARD_NAMESPACE), no_restart=True)


def replica_context() -> tuple[str, str]:
    ctx = serve.get_replica_context()
    return ctx.app_name, ctx.replica_id.unique_id


REPORT_EVERY_S = 10.0
"""A replica reports what it serves at least this often, whatever the poll interval."""


def _max_age_s(app: AppConfig) -> float:
    """How old a replica's last report may be before the index forgets the replica."""
    return 3 * min(app.poll_interval_s, REPORT_EVERY_S) + 10


class BoardLoads:
    """The load port of a Ray app: load requests and replica reports go through the board."""

    def __init__(self, board: Any, app: AppConfig) -> None:
        self._board = board
        self._max_age_s = _max_age_s(app)

    async def request(self, model: str) -> int:
        return int(await self._board.request_load.remote(model))

    async def wait_done(self, model: str, generation: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            replicas = (await self.snapshot()).get(model, {})
            if replicas and all(r.get("generation", 0) >= generation for r in replicas.values()):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)

    async def snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        snap = await self._board.snapshot.remote(self._max_age_s)
        return {model: entry["replicas"] for model, entry in snap.items()}


class Follower:
    """One model in one replica: loads the first version, then follows the alias via the board."""

    def __init__(self, service: ModelService, board: Any, replica: str) -> None:
        self.service = service
        self.name = service.config.name
        self._board = board
        self._replica = replica
        self._generation = 0
        """The newest load request a tick started on."""
        self._done = 0
        """The newest load request a tick that read the alias finished."""
        self._stop = threading.Event()
        self._id = uuid.uuid4().hex
        """This follower, so the board can drop its reports that arrive after it stopped."""
        self._node_id = ray.get_runtime_context().get_node_id()

    def start(self) -> None:
        """Load the first version (raises if none loads: the replica is not healthy) and follow."""
        self.service.start()
        self._report()
        threading.Thread(target=self._follow, name=f"watch-{self.name}", daemon=True).start()

    def _follow(self) -> None:
        watcher = self.service.watcher
        if watcher is not None:
            run_forever(watcher, self._wait, self._stop)
            return
        # NOTE: a pinned version has nothing to follow; it still reports, and a load request
        # is done at once.
        while not self._stop.is_set():
            self._wait(REPORT_EVERY_S, True)

    def nudge(self) -> None:
        """Have this replica read its alias now (its alias feed saw it move)."""
        with contextlib.suppress(Exception):
            self._board.poke.remote(self.name, self._replica)

    def stop(self) -> None:
        """Stop following and take this replica off the board (a graceful replica shutdown)."""
        self._stop.set()
        with contextlib.suppress(Exception):
            self._board.forget.remote(self.name, self._replica, self._id)

    def _report(self) -> None:
        if self._stop.is_set():
            return  # NOTE: stopped (unloaded from the pool): the board forgot this row
        status = {**self.service.status(), "generation": self._done, "node_id": self._node_id}
        self._board.report.remote(self.name, self._replica, status, self._id)

    def _wait(self, timeout: float, read: bool) -> bool:
        """Sleep until the next tick or a load request (True then), reporting every REPORT_EVERY_S.

        The load requests the last tick started on are reported done only if it ``read``
        the alias."""
        if read:
            self._done = self._generation
        deadline = time.monotonic() + timeout
        while True:
            self._report()
            chunk = max(0.0, min(REPORT_EVERY_S, deadline - time.monotonic()))
            try:
                gen = int(ray.get(self._board.wait.remote(self.name, self._replica, self._generation, chunk)))
            except Exception:  # noqa: BLE001 -- NOTE: board gone (cluster shutting down): plain wait
                self._stop.wait(chunk)
                gen = self._generation
            if gen < 0:
                return True  # NOTE: poked: this replica's alias feed saw the alias move
            if gen > self._generation:
                self._generation = gen
                return True
            if self._stop.is_set() or time.monotonic() >= deadline:
                return False
