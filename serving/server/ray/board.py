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


class _Wait:
    """One long-poll in progress: a replica's, for some of its models."""

    __slots__ = ("epoch", "event", "replica", "seen")

    def __init__(self, replica: str, epoch: int, seen: dict[str, int]) -> None:
        self.replica = replica
        self.epoch = epoch
        self.seen = dict(seen)
        """The models it covers, each with the load generation the replica has seen."""
        self.event = asyncio.Event()

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.seen)


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
        self._waits: dict[str, set[_Wait]] = {}
        """Per model: the long-polls that include it. NOTE: a load request wakes only those;
        one condition for every model woke each of a thousand members' waits at every load
        request, to find it was not theirs."""
        self._replica_waits: dict[str, set[_Wait]] = {}
        """Per replica: its long-polls in progress (normally one, for all its members)."""
        self._epochs: dict[str, int] = {}
        """Per replica: the newest member-set change it announced (:meth:`join`)."""
        self._forgotten: dict[str, None] = {}
        """Followers that stopped, oldest first (a bounded ordered set)."""

    async def report(self, model: str, replica: str, status: dict[str, Any], follower: str = "") -> None:
        self._touch()
        self._row(model, replica, status, follower)

    async def report_many(
        self,
        replica: str,
        rows: list[tuple[str, dict[str, Any], str]],
        forgets: list[tuple[str, str]] | None = None,
    ) -> None:
        """For one replica, in one call: :meth:`forget` each ``(model, follower)`` that
        stopped, then :meth:`report` each ``(model, status, follower)``."""
        self._touch()
        for model, follower in forgets or ():
            self._forget(model, replica, follower)
        for model, status, follower in rows:
            self._row(model, replica, status, follower)

    def _row(self, model: str, replica: str, status: dict[str, Any], follower: str) -> None:
        if follower and follower in self._forgotten:
            return  # NOTE: sent before its follower stopped, arrived after: not a row any more
        self._replicas[model][replica] = {**status, "reported_at": time.time(), "follower": follower}

    async def forget(self, model: str, replica: str, follower: str = "") -> None:
        """Take a replica's row off (it stopped serving ``model``); reports ``follower`` sent
        before it stopped and that arrive later are dropped, so the row does not come back."""
        self._touch()
        self._forget(model, replica, follower)

    def _forget(self, model: str, replica: str, follower: str) -> None:
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
        current = self._generation[model]
        seen = self._seen[model].values()
        queued = current > 0 and bool(seen) and all(s < current for s in seen)
        if not queued:
            # NOTE: at least the wall clock in ms, so a restarted board (counting from 0)
            # still hands out generations above any a replica has seen.
            self._generation[model] = max(current + 1, time.time_ns() // 1_000_000)
            self._wake(model)
        return self._generation[model]

    async def join(self, replica: str, epoch: int, seen: dict[str, int]) -> None:
        """``replica`` added members (its member-set change ``epoch``): its wait in flight
        covers them from now on. A wait it sent before the change and that arrives after it
        ends at once, so the replica sends one that covers them (the two calls may arrive in
        either order). NOTE: extending the wait, not ending it: each end costs a new wait
        that carries every member, and under churn a replica adds members many times a
        second."""
        self._touch()
        if epoch > self._epochs.get(replica, 0):
            self._epochs[replica] = epoch
        for wait in self._replica_waits.get(replica, ()):
            if wait.epoch >= epoch:
                continue
            wait.epoch = epoch
            added = {m: g for m, g in seen.items() if m not in wait.seen}
            wait.seen.update(added)
            for model in added:
                self._waits.setdefault(model, set()).add(wait)
            if self._due(added):
                wait.event.set()

    async def start(self, model: str, replica: str, generation: int) -> int:
        """``replica`` starts a forced check of ``model`` for the load requests handed to it
        (up to ``generation``); returns the newest generation, which that check covers.

        From this call on, a load request is a new generation: the check began before it.
        Until it, one joins the newest (:meth:`request_load`), so a flood of requests costs one
        check in flight and one queued. NOTE: not at hand-over (:meth:`wait_many`): a
        generation handed to a follower busy with a check waits for that check to end, and
        the requests that arrive meanwhile can still join it. The follower calls this before
        its check starts, so a request processed before it is covered by that check."""
        self._touch()
        current = self._generation[model]
        if generation > current:
            self._generation[model] = current = generation  # NOTE: a restarted board
        self._seen[model][replica] = current
        return current

    async def touch(self) -> None:
        """Nothing but a call: a replica starting up (``get_board``) starts the board's clock."""
        self._touch()

    async def wait_many(
        self, replica: str, seen: dict[str, int], timeout: float, epoch: int = 0
    ) -> dict[str, int]:
        """One long-poll for all of a replica's members: as soon as any model in ``seen`` has
        a load generation above the one given, or at timeout, return those models, each with
        its generation."""
        self._touch()
        self._waiting += 1
        try:
            for model in [m for m, s in seen.items() if s > self._generation[m]]:
                # NOTE: a restarted board counts from 0 while its replicas kept their count:
                # take theirs, or no load request would wake them until the count caught up;
                # other waits of the model that had seen less are due now.
                self._generation[model] = seen[model]
                self._wake(model)
            due = self._due(seen)
            if not due and timeout > 0 and epoch >= self._epochs.get(replica, 0):
                wait = _Wait(replica, epoch, seen)
                self._register(wait)
                try:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wait.event.wait(), timeout)
                finally:
                    self._unregister(wait)
                due = self._due(wait.seen)  # NOTE: with the members joined while it waited
            return due
        finally:
            self._waiting -= 1
            self._last_call = time.monotonic()

    def _due(self, seen: dict[str, int]) -> dict[str, int]:
        return {m: self._generation[m] for m, s in seen.items() if self._generation[m] > s}

    def _register(self, wait: _Wait) -> None:
        for model in wait.models:
            self._waits.setdefault(model, set()).add(wait)
        self._replica_waits.setdefault(wait.replica, set()).add(wait)

    def _unregister(self, wait: _Wait) -> None:
        for model in wait.models:
            waits = self._waits.get(model)
            if waits is not None:
                waits.discard(wait)
                if not waits:
                    del self._waits[model]
        waits = self._replica_waits.get(wait.replica)
        if waits is not None:
            waits.discard(wait)
            if not waits:
                del self._replica_waits[wait.replica]

    def _wake(self, model: str) -> None:
        for wait in self._waits.get(model, ()):
            wait.event.set()

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
                dropped += 1
            if not replicas:
                del self._replicas[model]
        waiting = set(self._replica_waits)
        live = {r for replicas in self._replicas.values() for r in replicas} | waiting
        self._epochs = {r: e for r, e in self._epochs.items() if r in live}
        # NOTE: a start that arrives after its member was forgotten (or its replica stopped)
        # puts the member's seen count back after the forget; it goes here, with no row to keep it.
        for model in list(self._seen):
            rows = self._replicas.get(model, {})
            kept = {r: g for r, g in self._seen[model].items() if r in rows or r in waiting}
            if kept:
                self._seen[model] = kept
            else:
                del self._seen[model]
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


BOARD_PROTOCOL = 2
"""Raised when the board's methods change so that replicas and a board of other code cannot
talk (2: one long-poll and one report per replica). The board's name carries it: a board is
detached, so without it replicas of new code deployed in place (same cluster, same app name)
would find the old code's board and fail every call."""


def board_name(app_name: str, protocol: int = BOARD_PROTOCOL) -> str:
    """The named actor of an app's board (protocol 1 had no suffix)."""
    return f"board-{app_name}" if protocol == 1 else f"board-{app_name}-v{protocol}"


def get_board(app_name: str) -> Any:
    """The app's board, created if it has none; the call starts its idle clock (a replica
    that never calls it again still leaves a board that ends once its app is gone).

    A board of an older protocol is ended. NOTE: replicas of the old code still running
    in a rolling update lose their load requests for the rest of their life; left alone,
    that board would never end, as its app still runs."""
    board = Board.options(  # type: ignore[attr-defined]
        name=board_name(app_name),
        namespace=BOARD_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        **BOARD_OPTIONS,
    ).remote(app_name=app_name)
    board.touch.remote()
    _drop(app_name, range(1, BOARD_PROTOCOL))
    return board


def drop_board(app_name: str) -> None:
    """End an app's board (it is detached: it outlives ``serve.delete``); nothing if it has none."""
    _drop(app_name, range(1, BOARD_PROTOCOL + 1))


def _drop(app_name: str, protocols: range) -> None:
    for protocol in protocols:
        with contextlib.suppress(ValueError):
            board = ray.get_actor(board_name(app_name, protocol), namespace=BOARD_NAMESPACE)
            ray.kill(board, no_restart=True)


def replica_context() -> tuple[str, str]:
    ctx = serve.get_replica_context()
    return ctx.app_name, ctx.replica_id.unique_id


REPORT_EVERY_S = 10.0
"""A replica reports what it serves at least this often, whatever the poll interval."""


def _max_age_s(app: AppConfig) -> float:
    """How old a replica's last report may be before the index forgets the replica."""
    return 3 * min(app.poll_interval_s, REPORT_EVERY_S) + 10


class BoardLink:
    """A replica's one line to its board, shared by every model it serves.

    One thread long-polls the board for all the replica's members at once
    (:meth:`Board.wait_many`) and hands each follower its load requests; another
    sends what changed (and every member's row every :data:`REPORT_EVERY_S`) in one
    :meth:`Board.report_many`. NOTE: one thread per member, each reporting and long-polling
    on its own, cost about 1 ms of CPU per member per second between the replica and the
    board: with 465 members and no request, a fifth of a 2-core machine.

    Threads start with the first member. A board that has died for good (it ends itself once
    its app is gone; a redeploy under the same name makes a new one) is looked up again.
    """

    def __init__(self, board: Any, replica: str, app_name: str | None = None) -> None:
        self.board = board
        self._replica = replica
        self._app_name = app_name
        self._lock = threading.Lock()
        self._followers: dict[str, Follower] = {}
        self._dirty: set[str] = set()
        self._forgets: list[tuple[str, str]] = []
        """Followers that stopped, ``(model, follower id)``, for the next report to forget."""
        self._reports = threading.Event()
        """Set when a row is due (a member changed) or the link closes."""
        self._members = threading.Event()
        """Set when the member set changed (the poller's next wait must include it)."""
        self._epoch = 0
        self._closed = threading.Event()
        self._reporter: threading.Thread | None = None
        self._failures = 0
        self._logged_at = 0.0

    def add(self, follower: Follower) -> None:
        with self._lock:
            self._followers[follower.id] = follower
            self._dirty.add(follower.id)
            self._epoch += 1
            epoch = self._epoch
            if self._reporter is None:
                self._reporter = threading.Thread(target=self._report_loop, name="board-report", daemon=True)
                self._reporter.start()
                threading.Thread(target=self._poll, name="board-poll", daemon=True).start()
        self._reports.set()
        self._members.set()
        with contextlib.suppress(Exception):
            self.board.join.remote(self._replica, epoch, {follower.name: follower.seen()})

    def remove(self, follower: Follower) -> None:
        """Take ``follower`` off: its row goes with the next report (in a few milliseconds)."""
        with self._lock:
            self._followers.pop(follower.id, None)
            self._dirty.discard(follower.id)
            self._forgets.append((follower.name, follower.id))
        self._reports.set()

    def report(self, follower: Follower) -> None:
        """Send ``follower``'s row soon (it finished a tick)."""
        with self._lock:
            if follower.id not in self._followers:
                return  # NOTE: stopped (unloaded from the pool): the board forgot this row
            self._dirty.add(follower.id)
        self._reports.set()

    def start(self, model: str, generation: int) -> int:
        """Tell the board this replica starts a forced check of ``model`` (:meth:`Board.start`);
        the generation that check covers."""
        try:
            ref = self.board.start.remote(model, self._replica, generation)
            return max(generation, int(self._result(ref, APP_CHECK_TIMEOUT_S)))
        except Exception as exc:  # noqa: BLE001 -- NOTE: no board: check anyway, for what was asked
            self._failed(exc)
            return generation

    def poke(self, model: str) -> None:
        """End this replica's wait for ``model`` (its alias feed saw the alias move).

        NOTE: here, not through the board: a poke is for this replica alone (each replica's
        feed sees the same move), and not a load request (a generation is shared by every
        replica, so N replicas bumping it would cost N forced reads each)."""
        with self._lock:
            followers = [f for f in self._followers.values() if f.name == model]
        for follower in followers:
            follower.deliver(-1)

    def close(self, timeout: float = 1.0) -> None:
        """Stop; the stopped followers' forgets are sent first (waits up to ``timeout``)."""
        self._closed.set()
        self._reports.set()
        self._members.set()
        if self._reporter is not None and self._reporter is not threading.current_thread():
            self._reporter.join(timeout)

    def _report_loop(self) -> None:
        full_at = time.monotonic() + REPORT_EVERY_S
        while True:
            self._reports.wait(max(0.0, full_at - time.monotonic()))
            self._reports.clear()
            closing = self._closed.is_set()
            with self._lock:
                if closing:
                    due = []  # NOTE: only the forgets of a replica going away
                elif time.monotonic() >= full_at:
                    full_at = time.monotonic() + REPORT_EVERY_S
                    due = list(self._followers.values())
                else:
                    due = [self._followers[i] for i in self._dirty if i in self._followers]
                self._dirty.clear()
                forgets, self._forgets = self._forgets, []
            rows = []
            for follower in due:
                try:
                    rows.append((follower.name, follower.row(), follower.id))
                except Exception:
                    log.exception("reading %s's status for the board failed", follower.name)
            if rows or forgets:
                with contextlib.suppress(Exception):
                    self.board.report_many.remote(self._replica, rows, forgets)
            if closing:
                return

    def _poll(self) -> None:
        while not self._closed.is_set():
            with self._lock:
                followers = list(self._followers.values())
                epoch = self._epoch
                self._members.clear()
            seen: dict[str, int] = {}
            for follower in followers:
                mine = follower.seen()
                seen[follower.name] = min(seen.get(follower.name, mine), mine)
            if not seen:
                self._members.wait(REPORT_EVERY_S)
                continue
            try:
                ref = self.board.wait_many.remote(self._replica, seen, REPORT_EVERY_S, epoch)
                due: dict[str, int] = self._result(ref, REPORT_EVERY_S + APP_CHECK_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 -- NOTE: board restarting or gone: try again
                self._failed(exc)
                self._closed.wait(1.0)
                if isinstance(exc, ray.exceptions.ActorDiedError):
                    self.relookup()
                continue
            self._failures = 0
            for follower in followers:
                generation = due.get(follower.name)
                if generation is not None:
                    follower.deliver(generation)

    @staticmethod
    def _result(ref: Any, timeout: float) -> Any:
        return ray.get(ref, timeout=timeout)

    def _failed(self, exc: Exception) -> None:
        """Log the first of a run of failed long-polls, then one a minute (the replica's
        members meanwhile follow their aliases at the poll interval, without load requests)."""
        self._failures += 1
        now = time.monotonic()
        if self._failures == 1 or now - self._logged_at >= 60.0:
            self._logged_at = now
            log.warning("the board did not answer (%d in a row): %r", self._failures, exc)

    def relookup(self) -> None:
        """A board ended for good leaves a dead handle: find (or make) the app's board now."""
        if self._app_name is None or self._closed.is_set():
            return
        try:
            self.board = get_board(self._app_name)
        except Exception:
            log.warning("looking up the board of %s again failed", self._app_name, exc_info=True)
            return
        with self._lock:
            self._dirty.update(self._followers)
        self._reports.set()


class BoardLoads:
    """The load port of a Ray app: load requests and replica reports go through the board."""

    def __init__(self, link: BoardLink, app: AppConfig) -> None:
        self._link = link
        self._max_age_s = _max_age_s(app)

    async def request(self, model: str) -> int:
        return int(await self._call("request_load", model))

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
        snap = await self._call("snapshot", self._max_age_s)
        return {model: entry["replicas"] for model, entry in snap.items()}

    async def _call(self, method: str, *args: Any) -> Any:
        """Call the board; once more on a board found again if this one has ended for good."""
        try:
            return await getattr(self._link.board, method).remote(*args)
        except ray.exceptions.ActorDiedError:
            await asyncio.to_thread(self._link.relookup)
            return await getattr(self._link.board, method).remote(*args)


class Follower:
    """One model in one replica: loads the first version, then follows the alias; its load
    requests and pokes come through the replica's :class:`BoardLink`."""

    def __init__(self, service: ModelService, link: BoardLink) -> None:
        self.service = service
        self.name = service.config.name
        self._link = link
        self._generation = 0
        """The newest load request a tick started on."""
        self._done = 0
        """The newest load request a tick that read the alias finished."""
        self._lock = threading.Lock()
        self._pending = 0
        """The newest load request the link handed over, not yet started on."""
        self._poked = False
        self._woken = threading.Event()
        self._stop = threading.Event()
        self.id = uuid.uuid4().hex
        """This follower, so the board can drop its reports that arrive after it stopped."""
        self._node_id: str | None = None

    def start(self) -> None:
        """Load the first version (raises if none loads: the replica is not healthy) and follow."""
        self.service.start()
        self._link.add(self)
        threading.Thread(target=self._follow, name=f"watch-{self.name}", daemon=True).start()

    def _follow(self) -> None:
        watcher = self.service.watcher
        if watcher is not None:
            run_forever(watcher, self._wait, self._stop)
            return
        # NOTE: a pinned version has nothing to follow; a load request is done at once.
        while not self._stop.is_set():
            self._wait(REPORT_EVERY_S, True)

    def nudge(self) -> None:
        """Have this replica read its alias now (its alias feed saw it move)."""
        self._link.poke(self.name)

    def stop(self) -> None:
        """Stop following and take this replica off the board (a graceful replica shutdown)."""
        self._stop.set()
        self._woken.set()
        self._link.remove(self)

    def row(self) -> dict[str, Any]:
        """This replica's row for the model on the board."""
        if self._node_id is None:
            self._node_id = ray.get_runtime_context().get_node_id()
        return {**self.service.status(), "generation": self._done, "node_id": self._node_id}

    def seen(self) -> int:
        """The newest load request handed to this follower (the board's wait starts above it)."""
        with self._lock:
            return max(self._generation, self._pending)

    def deliver(self, generation: int) -> None:
        """A load request (its generation, from the board) or a poke (``-1``, from this
        replica's alias feed)."""
        with self._lock:
            if generation < 0:
                self._poked = True
            elif generation > self._pending:
                self._pending = generation
            else:
                return
        self._woken.set()

    def _wait(self, timeout: float, read: bool) -> bool:
        """Sleep until the next tick or a load request (True then); report the tick's outcome.

        The load requests the last tick started on are reported done only if it ``read``
        the alias."""
        if read:
            self._done = self._generation
        self._link.report(self)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._woken.clear()
                poked, self._poked = self._poked, False
                pending = self._pending
            if pending > self._generation:
                self._generation = self._link.start(self.name, pending)
                return True
            if poked:
                return True  # NOTE: poked: this replica's alias feed saw the alias move
            remaining = deadline - time.monotonic()
            if self._stop.is_set() or remaining <= 0:
                return False
            self._woken.wait(remaining)
