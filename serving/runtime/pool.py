"""Models loaded on demand under one memory budget: the members of model sets.

A replica that serves a model set (``models: [{prefix: "fraud-"}]``) does not load
its members at start. :class:`ModelPool` loads a member on its first request, keeps
it while it is used, and unloads the least recently used idle members when a load
needs room under ``memory_bytes``::

    request for m ── loaded? ── yes ─────────────────────────────────> use m
                        │ no
                        └─ m loading? ── yes: wait for that load (single-flight)
                                │ no
                                └─ take a load slot (at most max_concurrent_loads)
                                   make room for m's expected size (evict LRU idle)
                                   load m, measure it, make room again ──> use m

- Memory is measured after each load (:mod:`serving.runtime.memory`), not taken from
  the manifest; a member's size is measured again before each eviction decision, so
  a swap to a bigger version counts.
- A member never measured is expected to be as big as a typical one; until the pool
  has measured any, loads take turns, so a burst of first requests cannot overshoot.
- Nothing is evicted while a request uses it, and pinned members never are.
- A load that cannot fit (everything else is busy or pinned, or the model alone is
  larger than the budget) is refused with :class:`serving.errors.Overloaded`, a 503
  with ``Retry-After``: the replica never loads past its budget.
- Loads of different members run at once up to the bound; there is no pool-wide lock
  held during a load.

The pool is plain Python over a :class:`Member` factory, so the server decides what a
member is (a ModelService with its watcher thread) and tests drive it with fakes.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from serving import metrics
from serving.errors import NotFound, Overloaded

log = logging.getLogger(__name__)

SIZE_MEMORY = 4096
"""Members whose last measured size is remembered after they were unloaded (LRU)."""
MAX_MISSES = 1024
"""Names remembered as not in the store (LRU), so a repeated miss costs no store request."""
TOO_BIG_TTL_S = 60.0
"""How long a member measured larger than the whole budget is refused without a new load."""


class Member(Protocol):
    """One model the pool can load and unload."""

    name: str

    def load(self) -> None:
        """Load the model's first version (blocking); raise a ServingError if it cannot be."""
        ...

    def close(self) -> None:
        """Unload it and free what it holds (stop its watcher, its workers)."""
        ...

    def memory_bytes(self) -> int:
        """What it holds now."""
        ...


M = TypeVar("M", bound=Member)


@dataclass
class Entry(Generic[M]):
    member: M
    bytes: int
    pinned: bool = False
    users: int = 0
    evicted: bool = False
    """Out of the pool; closed when its last user leaves."""


class ModelPool(Generic[M]):
    """Members loaded on demand, LRU by measured bytes, within ``memory_bytes``.

    Args:
        opener: builds the member for a name (not loaded yet); raises for a name
            that is not served (ModelNotFound).
        memory_bytes: the budget; None for none (load on demand, never evict).
        max_concurrent_loads: loads of different members at once.
        retry_after_s: ``Retry-After`` of the 503 when a member cannot fit now.
        load_wait_s: how long a request waits for a load (its own or another's).
        process_bytes: reads what this process holds (the server's PSS). Given, the budget
            also counts what the process grew by since its first member's load: each member's
            bookkeeping there (its slot, its alias-following thread, its metric series), about
            100 KB, which its own measured bytes leave out.
        idle_bytes: reads what processes that hold no member hold (shared model workers kept
            running with no version, or started ahead of their first): the budget counts it.
        stop_idle: stops those processes; called when a load would otherwise be refused.
    """

    def __init__(
        self,
        opener: Callable[[str], M],
        *,
        memory_bytes: int | None = None,
        max_concurrent_loads: int = 4,
        retry_after_s: int = 5,
        load_wait_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        process_bytes: Callable[[], int] | None = None,
        idle_bytes: Callable[[], int] | None = None,
        stop_idle: Callable[[], object] | None = None,
    ) -> None:
        self._opener = opener
        self._process_bytes = process_bytes
        self._idle_bytes = idle_bytes
        self._stop_idle = stop_idle
        self._process_base: int | None = None
        """What the process held when its first member started loading."""
        self.memory_bytes = memory_bytes
        self.retry_after_s = retry_after_s
        self.load_wait_s = load_wait_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, Entry[M]] = OrderedDict()
        """Loaded members, least recently used first."""
        self._loading: dict[str, Future[None]] = {}
        self._reserved: dict[str, int] = {}
        """Bytes set aside for each load in progress."""
        self._sizes: OrderedDict[str, tuple[int, float]] = OrderedDict()
        """Last measured size per member and when, kept after it is unloaded."""
        self._load_slots = threading.BoundedSemaphore(max_concurrent_loads)
        self._probe = threading.Lock()
        """Held by a load while the pool has measured nothing to expect its size from."""
        self._idle = threading.Condition(self._lock)
        """Notified when a member goes idle, leaves the pool, or a load's reservation ends."""
        self._misses: OrderedDict[str, tuple[float, NotFound]] = OrderedDict()
        self.miss_ttl_s = 10.0
        self._closed = False
        metrics.POOL_BUDGET_BYTES.set(memory_bytes or 0)

    # -- use ------------------------------------------------------------------------
    @contextmanager
    def use(self, name: str) -> Iterator[M]:
        """The loaded member ``name``, loading it first if needed; not evicted while held.

        Raises:
            Overloaded: it cannot fit the budget now, or no load slot or load finished
                within ``load_wait_s``.
            ServingError: the opener or the load refused it (not found, untrusted, ...).
        """
        entry = self._enter(name)
        try:
            yield entry.member
        finally:
            self._leave(entry)

    def get_loaded(self, name: str, *, touch: bool = True) -> Entry[M] | None:
        """Take a use of ``name`` if it is loaded now (no wait); release with :meth:`leave`.

        ``touch=False`` (a status or readiness check) neither counts a lookup nor makes it
        recently used."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return None
            entry.users += 1
            if touch:
                self._entries.move_to_end(name)
        if touch:
            metrics.POOL_LOOKUPS.inc(result="warm")
        return entry

    def leave(self, entry: Entry[M]) -> None:
        self._leave(entry)

    def enter(self, name: str) -> Entry[M]:
        """Take a use of ``name``, loading it first if needed (blocking); release with :meth:`leave`."""
        return self._enter(name)

    def _enter(self, name: str) -> Entry[M]:
        entry = self.get_loaded(name)
        if entry is not None:
            return entry
        with self._lock:
            miss = self._misses.get(name)
            if miss is not None and self._clock() - miss[0] < self.miss_ttl_s:
                metrics.POOL_LOOKUPS.inc(result="refused")
                # NOTE: a fresh copy: re-raising one object from many threads grows its traceback.
                raise copy.copy(miss[1]).with_traceback(None)
            if self._closed:
                raise Overloaded("the server is stopping", self.retry_after_s)
        deadline = self._clock() + self.load_wait_s
        started = time.perf_counter()
        tries = 0
        while True:
            with self._lock:
                entry = self._entries.get(name)
                if entry is not None:
                    entry.users += 1
                    self._entries.move_to_end(name)
                    break
                late = tries > 0 and self._clock() >= deadline
                future = self._loading.get(name)
                mine = future is None and not late
                if mine:
                    future = Future()
                    self._loading[name] = future
            if late or future is None:
                # NOTE: loaded, then evicted by other loads before this request could use it.
                metrics.POOL_LOOKUPS.inc(result="refused")
                raise Overloaded(
                    f"model {name!r} was unloaded again before it could be used", self.retry_after_s
                )
            tries += 1
            if mine:
                loaded = self._load(name, future, deadline)
                if loaded is not None:
                    # NOTE: the loader's own use was taken as the member went in, so no other
                    # load can evict it before this request runs.
                    entry = loaded
                    break
            try:
                future.result(timeout=max(0.0, deadline - self._clock()))
            except TimeoutError:
                metrics.POOL_LOOKUPS.inc(result="refused")
                raise Overloaded(
                    f"model {name!r} is still loading after {self.load_wait_s:g} s", self.retry_after_s
                ) from None
            except Exception:
                metrics.POOL_LOOKUPS.inc(result="refused")
                raise
        metrics.POOL_LOOKUPS.inc(result="cold")
        metrics.POOL_LOAD_SECONDS.observe(time.perf_counter() - started)
        return entry

    def _leave(self, entry: Entry[M]) -> None:
        with self._lock:
            entry.users -= 1
            close = entry.evicted and entry.users == 0
            if entry.users == 0:
                self._idle.notify_all()
        if close:
            # NOTE: the last request of an unloaded member may end on the event loop: closing a
            # member joins its watcher and stops its worker, which must not stall the loop.
            self._close_later(entry)

    # -- load and unload ------------------------------------------------------------
    def load(self, name: str, *, pin: bool = False) -> None:
        """Load ``name`` now if it is not loaded (prefetch), and pin it if asked."""
        with self.use(name):
            if pin:
                with self._lock:
                    entry = self._entries.get(name)
                    if entry is not None:
                        entry.pinned = True

    def unload(self, name: str, reason: str = "unload") -> bool:
        """Take ``name`` out of the pool (even if pinned); it closes once its requests end."""
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is None:
                return False
            entry.evicted = True
            close = entry.users == 0
            self._idle.notify_all()
        metrics.POOL_EVICTIONS.inc(reason=reason)
        self._publish()
        if close:
            self._close_later(entry)
        return True

    def _load(self, name: str, future: Future[None], deadline: float) -> Entry[M] | None:
        """Load ``name`` for every request waiting on ``future``; settles it either way.

        Returns the new entry with one use taken for the caller, or None if it failed."""
        entry = None
        try:
            if not self._load_slots.acquire(timeout=max(0.0, deadline - self._clock())):
                raise Overloaded(
                    f"model {name!r} waited {self.load_wait_s:g} s for a free load", self.retry_after_s
                )
            try:
                entry = self._load_now(name, deadline)
            finally:
                self._load_slots.release()
            future.set_result(None)
        except BaseException as exc:  # noqa: BLE001 -- NOTE: every waiter gets the load's error
            if isinstance(exc, NotFound):
                with self._lock:
                    self._misses[name] = (self._clock(), exc)
                    self._misses.move_to_end(name)
                    while len(self._misses) > MAX_MISSES:
                        self._misses.popitem(last=False)
            future.set_exception(exc)
        finally:
            with self._lock:
                self._loading.pop(name, None)
                self._reserved.pop(name, None)
                self._idle.notify_all()
        return entry

    def _load_now(self, name: str, deadline: float) -> Entry[M]:
        if self._process_bytes is not None and self._process_base is None:
            base = self._process_bytes()
            with self._lock:
                if self._process_base is None:
                    self._process_base = base
        # NOTE: opened first: the opener refuses a name that is not in the store before any
        # loaded member is evicted to make room for it.
        member = self._opener(name)
        probe = False
        try:
            expected = self._expected_size(name)
            if expected is None and self.memory_bytes is not None:
                # NOTE: nothing to expect a size from (an empty pool): loads take turns until
                # one is measured, so a burst of first requests cannot load past the budget.
                probe = self._probe.acquire(timeout=max(0.0, deadline - self._clock()))
                if not probe:
                    raise Overloaded(
                        f"model {name!r} waited {self.load_wait_s:g} s for the pool's first load",
                        self.retry_after_s,
                    )
                expected = self._expected_size(name)
                if expected is not None:
                    # NOTE: the load before this one was measured: the rest run at once again.
                    self._probe.release()
                    probe = False
            self._make_room(name, expected or 0, deadline)
            member.load()
            size = member.memory_bytes()
            self._remember(name, size)
            self._make_room(name, size, deadline)
        except BaseException:
            member.close()
            raise
        finally:
            if probe:
                self._probe.release()
        entry = Entry(member, size, users=1)
        with self._lock:
            closed = self._closed
            if not closed:
                self._entries[name] = entry
        if closed:
            member.close()
            raise Overloaded("the server is stopping", self.retry_after_s)
        log.info(
            "loaded %s into the pool (%.1f MiB)",
            name,
            size / 2**20,
            extra={"event": "pool_load", "model": name, "bytes": size},
        )
        self._publish()
        return entry

    def _expected_size(self, name: str) -> int | None:
        with self._lock:
            known = self._sizes.get(name)
            if known is not None:
                return known[0]
            budget = self.memory_bytes
            # NOTE: a member measured larger than the whole budget is no typical member.
            remembered = [v for v, _ in self._sizes.values() if budget is None or v <= budget]
            sizes = [e.bytes for e in self._entries.values()] or remembered
        # NOTE: never measured: as big as a typical member; None when none was ever measured.
        return sum(sizes) // len(sizes) if sizes else None

    def _remember(self, name: str, size: int) -> None:
        with self._lock:
            self._sizes[name] = (size, self._clock())
            self._sizes.move_to_end(name)
            while len(self._sizes) > SIZE_MEMORY:
                self._sizes.popitem(last=False)

    def _make_room(self, name: str, size: int, deadline: float) -> None:
        """Set ``size`` bytes aside for ``name``, evicting idle members as needed.

        Members in use are not evicted; when only they stand in the way, this waits (until
        ``deadline``) for their requests to end, which for a loaded model takes milliseconds.

        Raises:
            Overloaded: the budget cannot hold ``size`` more bytes by ``deadline``.
        """
        budget = self.memory_bytes
        if budget is None:
            return
        if size > budget:
            known = self._sizes.get(name)
            if known is not None and self._clock() - known[1] > TOO_BIG_TTL_S:
                # NOTE: measured too big a while ago: its alias may point to a smaller version now.
                with self._lock:
                    self._sizes.pop(name, None)
            raise Overloaded(
                f"model {name!r} needs {size / 2**20:.1f} MiB, more than this replica's whole "
                f"memory budget ({budget / 2**20:.1f} MiB)",
                self.retry_after_s,
            )
        self._measure()
        stop_idle = self._stop_idle if self._idle_workers() > 0 else None
        # NOTE: idle members first; then workers that hold no member give their room back (the
        # next load into one of them starts it again, seconds); only then wait for busy members.
        fits = self._fit(name, size, budget, self._clock() if stop_idle is not None else deadline)
        if not fits and stop_idle is not None:
            stop_idle()
            fits = self._fit(name, size, budget, deadline)
        if not fits:
            raise Overloaded(
                f"model {name!r} needs {size / 2**20:.1f} MiB and the models using this replica's "
                f"memory budget ({budget / 2**20:.1f} MiB) are busy or pinned",
                self.retry_after_s,
            )

    def _fit(self, name: str, size: int, budget: int, deadline: float) -> bool:
        """Evict idle members, least recently used first, until ``size`` more bytes fit (waiting
        until ``deadline`` for members in use); whether they fit (then they are reserved)."""
        grown = self._outside()
        victims: list[Entry[M]] = []
        with self._lock:
            while True:
                # NOTE: this load's earlier reservation stays counted for other loads while it
                # waits; it is replaced, not added to, when the new size fits.
                reserved = sum(v for k, v in self._reserved.items() if k != name)
                used = sum(e.bytes for e in self._entries.values()) + reserved + grown
                used = self._take_idle(used, budget - size, victims, keep=name)
                fits = used + size <= budget
                busy = sum(
                    e.bytes for k, e in self._entries.items() if e.users and not e.pinned and k != name
                )
                remaining = deadline - self._clock()
                if fits or used - busy + size > budget or remaining <= 0 or self._closed:
                    break
                # NOTE: only members in use stand in the way: wait for one to go idle.
                self._idle.wait(remaining)
            if fits:
                self._reserved[name] = size
        self._evict(victims)
        return fits

    def trim(self) -> int:
        """Measure every member again and unload idle ones, least recently used first, until the
        pool fits its budget; returns how many were unloaded.

        Loads make room for themselves; this catches members that grew after their load (a
        canary or shadow beside the live version, explicit versions), which no load may follow
        in steady warm traffic. The server calls it once per poll interval."""
        budget = self.memory_bytes
        if budget is None:
            return 0
        self._measure()
        grown = self._outside()
        victims: list[Entry[M]] = []
        with self._lock:
            used = sum(e.bytes for e in self._entries.values()) + sum(self._reserved.values()) + grown
            self._take_idle(used, budget, victims)
        self._evict(victims)
        self._publish()
        return len(victims)

    def _take_idle(self, used: int, limit: int, victims: list[Entry[M]], keep: str | None = None) -> int:
        """Take idle, unpinned members out, least recently used first, until ``used`` is at most
        ``limit``; appends them to ``victims`` and returns what is used then. Hold the lock."""
        for key, entry in list(self._entries.items()):
            if used <= limit:
                break
            if entry.pinned or entry.users or key == keep:
                continue
            del self._entries[key]
            entry.evicted = True
            used -= entry.bytes
            victims.append(entry)
        return used

    def _evict(self, victims: list[Entry[M]]) -> None:
        """Close members taken out to fit the budget (outside the lock)."""
        for entry in victims:
            metrics.POOL_EVICTIONS.inc(reason="budget")
            self._close(entry)
        if victims:
            self._publish()

    def _grown(self) -> int:
        """What the process grew by since its first member's load (0 when not counted)."""
        base = self._process_base
        if self._process_bytes is None or base is None:
            return 0
        return max(0, self._process_bytes() - base)

    def _idle_workers(self) -> int:
        """What processes that hold no member hold (0 when not counted)."""
        return self._idle_bytes() if self._idle_bytes is not None else 0

    def _outside(self) -> int:
        """What the budget counts that no member holds."""
        return self._grown() + self._idle_workers()

    def _measure(self) -> None:
        """Measure every loaded member again (a swap may have changed its size)."""
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            try:
                entry.bytes = entry.member.memory_bytes()
            except Exception:
                log.exception("measuring %s failed", entry.member.name)

    def _close_later(self, entry: Entry[M]) -> None:
        threading.Thread(target=self._close, args=(entry,), name="pool-unload", daemon=True).start()

    def _close(self, entry: Entry[M]) -> None:
        name = entry.member.name
        try:
            entry.member.close()
        except Exception:
            log.exception("unloading %s failed", name)
        with self._lock:
            # NOTE: a member closes after it left the pool; if the name was loaded again
            # meanwhile, the series are the new member's and stay.
            if name not in self._entries and name not in self._loading:
                metrics.forget_model(name)
        log.info("unloaded %s from the pool", name, extra={"event": "pool_unload", "model": name})

    def _publish(self) -> None:
        with self._lock:
            count = len(self._entries)
            used = sum(e.bytes for e in self._entries.values())
        metrics.POOL_MODELS.set(count)
        metrics.POOL_BYTES.set(used)

    # -- state ----------------------------------------------------------------------
    def members(self) -> dict[str, M]:
        """The loaded members by name (a member may be unloaded the moment after)."""
        with self._lock:
            return {name: e.member for name, e in self._entries.items()}

    def loaded(self) -> list[str]:
        """Loaded members, least recently used first."""
        with self._lock:
            return list(self._entries)

    def snapshot(self) -> dict[str, Any]:
        """What the pool holds: per member its bytes, users and pin; totals and the budget."""
        with self._lock:
            members = {
                name: {"bytes": e.bytes, "users": e.users, "pinned": e.pinned}
                for name, e in self._entries.items()
            }
            loading = sorted(self._loading)
        grown = self._grown()
        idle = self._idle_workers()
        return {
            "budget_bytes": self.memory_bytes,
            "used_bytes": sum(m["bytes"] for m in members.values()) + grown + idle,
            "server_growth_bytes": grown,
            "idle_workers_bytes": idle,
            "members": members,
            "loading": loading,
        }

    def close(self) -> None:
        """Unload every member (the server stops); one still in use closes when its request ends."""
        with self._lock:
            self._closed = True
            self._idle.notify_all()
            entries = list(self._entries.values())
            self._entries.clear()
            idle = []
            for entry in entries:
                entry.evicted = True
                if entry.users == 0:
                    idle.append(entry)
        metrics.POOL_EVICTIONS.inc(len(entries), reason="stop")
        for entry in idle:
            self._close(entry)
        self._publish()
