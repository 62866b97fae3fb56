"""The pool of model-set members: LRU by measured bytes, single-flight, bounded concurrent loads."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from serving.errors import LoadError, ModelNotFound, Overloaded
from serving.runtime.pool import ModelPool


@dataclass
class FakeMember:
    name: str
    size: int
    gate: threading.Event | None = None
    fail: Exception | None = None
    loads: int = 0
    closed: bool = False
    started: threading.Event = field(default_factory=threading.Event)

    def load(self) -> None:
        self.loads += 1
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        if self.fail is not None:
            raise self.fail

    def close(self) -> None:
        self.closed = True

    def memory_bytes(self) -> int:
        return self.size


class Opener:
    """Builds fake members by name; records every member it built."""

    def __init__(self, sizes: dict[str, int] | None = None, default: int = 40) -> None:
        self.sizes = sizes or {}
        self.default = default
        self.built: list[FakeMember] = []
        self.gate: threading.Event | None = None
        self.fail: dict[str, Exception] = {}
        self.lock = threading.Lock()

    def __call__(self, name: str) -> FakeMember:
        if name.startswith("missing"):
            raise ModelNotFound(f"{name} is not in the store")
        member = FakeMember(name, self.sizes.get(name, self.default), self.gate, self.fail.get(name))
        with self.lock:
            self.built.append(member)
        return member

    def members(self, name: str) -> list[FakeMember]:
        return [m for m in self.built if m.name == name]


def _use(pool: ModelPool[FakeMember], *names: str) -> None:
    for name in names:
        with pool.use(name):
            pass


def test_the_least_recently_used_idle_member_is_evicted_to_fit_the_budget() -> None:
    opener = Opener(default=40)
    pool = ModelPool(opener, memory_bytes=100)
    _use(pool, "a", "b", "a")  # a is now more recent than b
    _use(pool, "c")
    assert sorted(pool.loaded()) == ["a", "c"]
    assert opener.members("b")[0].closed
    assert not opener.members("a")[0].closed
    assert pool.snapshot()["used_bytes"] == 80


def test_what_the_server_grew_by_since_its_first_member_counts_against_the_budget() -> None:
    opener = Opener(default=30)
    process = [500]  # NOTE: what the server holds before any member; never counted
    pool = ModelPool(opener, memory_bytes=100, process_bytes=lambda: process[0])
    _use(pool, "a")
    process[0] += 15  # NOTE: each member's bookkeeping in the server
    _use(pool, "b")
    process[0] += 15
    assert pool.snapshot()["used_bytes"] == 60 + 30
    # NOTE: three members of 30 fit 100 by their own bytes, not with the server's 30 of growth.
    _use(pool, "c")
    assert sorted(pool.loaded()) == ["b", "c"]
    assert pool.snapshot()["server_growth_bytes"] == 30
    assert pool.snapshot()["used_bytes"] <= 100


def test_workers_running_with_no_member_count_against_the_budget() -> None:
    opener = Opener(default=30)
    idle = [40]  # NOTE: a shared worker kept running after its last version left
    pool = ModelPool(opener, memory_bytes=100, idle_bytes=lambda: idle[0])
    _use(pool, "a", "b")
    # NOTE: a third member of 30 fits 100 by the members' bytes, not with the idle worker's 40.
    _use(pool, "c")
    assert sorted(pool.loaded()) == ["b", "c"]
    assert pool.snapshot()["idle_workers_bytes"] == 40
    assert pool.snapshot()["used_bytes"] == 100
    idle[0] = 0  # NOTE: a version joined it, or it stopped: its memory is a member's or gone
    _use(pool, "d")
    assert sorted(pool.loaded()) == ["b", "c", "d"]


def test_workers_with_no_member_are_stopped_before_a_load_is_refused() -> None:
    opener = Opener(default=30)
    idle = [40]
    stops: list[int] = []

    def stop_idle() -> None:
        stops.append(idle[0])
        idle[0] = 0

    pool = ModelPool(
        opener, memory_bytes=100, idle_bytes=lambda: idle[0], stop_idle=stop_idle, load_wait_s=0.2
    )
    _use(pool, "a")
    # NOTE: room by evicting an idle member first: the idle worker is kept.
    _use(pool, "b", "c")
    assert stops == []
    assert sorted(pool.loaded()) == ["b", "c"]
    # NOTE: both in use, nothing to evict: the idle worker gives its room back, not a 503.
    with pool.use("b"), pool.use("c"):
        _use(pool, "d")
    assert stops == [40]
    assert sorted(pool.loaded()) == ["b", "c", "d"]


def test_a_member_in_use_or_pinned_is_never_evicted_and_a_load_that_cannot_fit_gets_503() -> None:
    opener = Opener(default=40)
    pool = ModelPool(opener, memory_bytes=100, retry_after_s=7, load_wait_s=0.3)
    pool.load("pinned", pin=True)
    with pool.use("busy"), pytest.raises(Overloaded) as refused:
        _use(pool, "third")
    assert refused.value.status_code == 503
    assert refused.value.retry_after_s == 7
    assert "busy or pinned" in str(refused.value)
    assert sorted(pool.loaded()) == ["busy", "pinned"]
    # NOTE: once busy is idle it makes room; pinned still stays.
    _use(pool, "third")
    assert sorted(pool.loaded()) == ["pinned", "third"]


def test_a_load_waits_for_a_busy_member_to_go_idle_then_evicts_it() -> None:
    opener = Opener(default=60)
    pool = ModelPool(opener, memory_bytes=100, load_wait_s=10)
    busy = pool.enter("busy")
    with ThreadPoolExecutor(1) as threads:
        other = threads.submit(_use, pool, "other")
        # NOTE: the other load waits: "busy" is the only member in the way and its request runs.
        assert not other.done()
        for _ in range(100):
            if other.done():
                break
            threading.Event().wait(0.01)
        assert not other.done()
        pool.leave(busy)
        other.result(timeout=10)
    assert pool.loaded() == ["other"]
    assert opener.members("busy")[0].closed


def test_a_member_larger_than_the_whole_budget_is_refused_and_unloaded() -> None:
    opener = Opener(sizes={"huge": 500}, default=10)
    pool = ModelPool(opener, memory_bytes=100)
    with pytest.raises(Overloaded, match="more than this replica's whole memory budget"):
        _use(pool, "huge")
    assert opener.members("huge")[0].closed
    assert pool.loaded() == []
    # NOTE: its measured size is remembered: the next request is refused without a new load.
    with pytest.raises(Overloaded):
        _use(pool, "huge")
    assert sum(m.loads for m in opener.members("huge")) == 1
    assert all(m.closed for m in opener.members("huge"))
    # NOTE: nor is it what a member never measured is expected to need.
    _use(pool, "small")
    assert pool.loaded() == ["small"]


def test_loads_of_one_member_are_single_flight() -> None:
    opener = Opener()
    opener.gate = threading.Event()
    pool = ModelPool(opener, memory_bytes=1000)
    with ThreadPoolExecutor(8) as threads:
        futures = [threads.submit(_use, pool, "m") for _ in range(8)]
        assert opener.built == [] or opener.built[0].started.wait(5)
        opener.gate.set()
        for f in futures:
            f.result(timeout=10)
    assert len(opener.members("m")) == 1
    assert opener.members("m")[0].loads == 1


def test_loads_of_different_members_run_at_once_up_to_the_bound() -> None:
    opener = Opener()
    opener.gate = threading.Event()
    pool = ModelPool(opener, memory_bytes=1000, max_concurrent_loads=2, load_wait_s=0.5)
    opener.gate.set()
    _use(pool, "warm")  # NOTE: one measured member: later loads know what to expect
    opener.gate = threading.Event()
    with ThreadPoolExecutor(3) as threads:
        first = [threads.submit(_use, pool, n) for n in ("a", "b")]
        # NOTE: both loads are inside member.load() at the same time: no pool-wide lock.
        for name in ("a", "b"):
            deadline = threading.Event()
            for _ in range(100):
                if opener.members(name) and opener.members(name)[0].started.is_set():
                    break
                deadline.wait(0.05)
            assert opener.members(name)[0].started.is_set(), f"{name} did not start loading"
        # NOTE: a third waits for a free load slot and, past load_wait_s, gets a 503.
        third = threads.submit(_use, pool, "c")
        with pytest.raises(Overloaded, match=r"waited 0\.5 s for a free load"):
            third.result(timeout=10)
        opener.gate.set()
        for f in first:
            f.result(timeout=10)
    assert sorted(pool.loaded()) == ["a", "b", "warm"]


def _started(member: FakeMember | None, within_s: float = 5.0) -> bool:
    """Whether ``member`` entered its load within ``within_s`` (polled)."""
    deadline = threading.Event()
    for _ in range(int(within_s / 0.05)):
        if member is not None and member.started.is_set():
            return True
        deadline.wait(0.05)
    return False


def test_first_loads_into_an_empty_pool_take_turns_until_one_is_measured() -> None:
    """Nothing says how big a member is until one is measured: a burst of first requests
    must not load them all at once past the budget (each is 80 of a budget of 100)."""
    opener = Opener(default=80)
    opener.gate = threading.Event()
    pool = ModelPool(opener, memory_bytes=100, max_concurrent_loads=4, load_wait_s=10)
    with ThreadPoolExecutor(2) as threads:
        first = threads.submit(_use, pool, "a")
        assert _started(next(iter(opener.members("a")), None))
        second = threads.submit(_use, pool, "b")
        # NOTE: b waits for a's measurement, not inside its own load.
        assert not _started(next(iter(opener.members("b")), None), within_s=0.5)
        opener.gate.set()
        first.result(timeout=10)
        second.result(timeout=10)
    # a was measured at 80, so b's load made room first: never both at once.
    assert pool.loaded() == ["b"]
    assert opener.members("a")[0].closed


def test_a_member_closed_after_its_name_loaded_again_leaves_the_new_series() -> None:
    """Unloading closes off-thread: a reload that beat the close keeps its metrics."""
    from prometheus_client import REGISTRY

    from serving import metrics

    opener = Opener(default=10)
    pool = ModelPool(opener, memory_bytes=100)
    _use(pool, "pool-m")
    old = pool.get_loaded("pool-m")
    assert old is not None
    pool.unload("pool-m")  # in use: it closes when its request ends
    _use(pool, "pool-m")  # loaded again meanwhile
    metrics.SWAPS.inc(model="pool-m")
    pool.leave(old)  # the old member's last request ends; it closes now
    deadline = threading.Event()
    for _ in range(100):
        if opener.members("pool-m")[0].closed:
            break
        deadline.wait(0.05)
    assert opener.members("pool-m")[0].closed
    assert REGISTRY.get_sample_value("serving_swaps_total", {"model": "pool-m"}) == 1.0
    pool.unload("pool-m")  # the last member with that name: its series go
    for _ in range(100):
        if REGISTRY.get_sample_value("serving_swaps_total", {"model": "pool-m"}) is None:
            break
        deadline.wait(0.05)
    assert REGISTRY.get_sample_value("serving_swaps_total", {"model": "pool-m"}) is None


def test_a_failed_load_is_closed_reaches_every_waiter_and_is_not_kept() -> None:
    opener = Opener()
    opener.fail["bad"] = LoadError("bad:1: refused")
    pool = ModelPool(opener, memory_bytes=1000)
    with pytest.raises(LoadError, match="refused"):
        _use(pool, "bad")
    assert opener.members("bad")[0].closed
    assert pool.loaded() == []


def test_a_name_not_in_the_store_is_remembered_for_a_while() -> None:
    now = [0.0]
    opener = Opener()
    calls = []
    pool = ModelPool(lambda n: calls.append(n) or opener(n), memory_bytes=1000, clock=lambda: now[0])
    for _ in range(3):
        with pytest.raises(ModelNotFound):
            _use(pool, "missing-1")
    assert calls == ["missing-1"]
    now[0] += pool.miss_ttl_s + 1
    with pytest.raises(ModelNotFound):
        _use(pool, "missing-1")
    assert calls == ["missing-1", "missing-1"]


def test_unload_closes_an_idle_member_now_and_a_busy_one_when_its_request_ends() -> None:
    opener = Opener()
    pool = ModelPool(opener, memory_bytes=1000)
    _use(pool, "idle")
    assert pool.unload("idle")
    assert opener.members("idle")[0].closed
    with pool.use("busy") as member:
        assert pool.unload("busy")
        assert not member.closed
        assert "busy" not in pool.loaded()
    assert member.closed
    assert not pool.unload("never-loaded")
    # NOTE: the next request loads it again.
    _use(pool, "idle")
    assert len(opener.members("idle")) == 2


def test_sizes_are_measured_again_before_eviction() -> None:
    opener = Opener(default=30)
    pool = ModelPool(opener, memory_bytes=100)
    _use(pool, "a", "b")
    # NOTE: a swapped to a bigger version since it loaded.
    opener.members("a")[0].size = 60
    _use(pool, "b", "c")
    assert "a" not in pool.loaded()
    assert sorted(pool.loaded()) == ["b", "c"]


def test_close_unloads_every_member() -> None:
    opener = Opener()
    pool = ModelPool(opener, memory_bytes=None)
    _use(pool, "a", "b", "c")
    pool.close()
    assert all(m.closed for m in opener.built)
    assert pool.loaded() == []


def test_cold_loads_run_off_the_loop_and_past_the_bound_a_request_gets_503(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from serving.server import local

    monkeypatch.setattr(local, "LOAD_THREADS", 2)
    gate = threading.Event()

    def slow(value: int) -> int:
        assert gate.wait(10)
        return value

    async def scenario() -> list[int]:
        cold = local.ColdLoads(retry_after_s=3)
        first = asyncio.ensure_future(cold.run(slow, 1))
        second = asyncio.ensure_future(cold.run(slow, 2))
        await asyncio.sleep(0)  # NOTE: lets both start their threads; the loop is never blocked
        with pytest.raises(Overloaded) as refused:
            await cold.run(slow, 3)
        assert refused.value.retry_after_s == 3
        gate.set()
        done = [await first, await second]
        # NOTE: the slots are free again once the loads are done.
        done.append(await cold.run(slow, 4))
        return done

    assert asyncio.run(scenario()) == [1, 2, 4]


def test_a_name_that_is_not_in_the_store_evicts_nothing() -> None:
    opener = Opener(default=50)
    pool = ModelPool(opener, memory_bytes=100)
    _use(pool, "a", "b")
    for i in range(5):
        with pytest.raises(ModelNotFound):
            _use(pool, f"missing-{i}")
    assert sorted(pool.loaded()) == ["a", "b"]
    assert not any(m.closed for m in opener.built)


def test_a_closed_pool_refuses_new_loads() -> None:
    opener = Opener()
    pool = ModelPool(opener, memory_bytes=1000)
    pool.close()
    with pytest.raises(Overloaded, match="stopping"):
        _use(pool, "late")
    assert opener.built == []


def test_a_cancelled_cold_request_gives_its_use_back() -> None:
    import asyncio

    from serving.server import local

    opener = Opener(default=60)
    opener.gate = threading.Event()
    pool = ModelPool(opener, memory_bytes=100, load_wait_s=5)

    async def scenario() -> None:
        cold = local.ColdLoads(retry_after_s=1)
        request = asyncio.ensure_future(cold.run(pool.enter, "a", release=pool.leave))
        for _ in range(200):
            if opener.built and opener.built[0].started.is_set():
                break
            await asyncio.sleep(0.01)
        request.cancel()  # NOTE: the client went away while its model loaded
        with pytest.raises(asyncio.CancelledError):
            await request
        opener.gate.set()
        # NOTE: the use the load took for the cancelled request is given back, so "a" can be evicted.
        for _ in range(500):
            if pool.snapshot()["members"].get("a", {}).get("users") == 0:
                break
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert pool.snapshot()["members"]["a"]["users"] == 0
    _use(pool, "b")
    assert pool.loaded() == ["b"]


def test_trim_unloads_idle_members_that_grew_past_the_budget_after_their_load() -> None:
    opener = Opener(default=30)
    pool = ModelPool(opener, memory_bytes=100)
    _use(pool, "a", "b", "c")
    assert pool.trim() == 0
    # NOTE: "a" took a canary beside its live version; nothing loads, so only trim sees it.
    opener.members("a")[0].size = 70
    with pool.use("b"):
        assert pool.trim() == 1  # "a" is the least recently used idle member
    assert sorted(pool.loaded()) == ["b", "c"]
    assert opener.members("a")[0].closed
    assert pool.snapshot()["used_bytes"] <= 100
