"""Leases under concurrent swaps and explicit-version loads: no lease on a retired version, bounded state."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from serving.cache import CachedVersion, LoaderCache
from serving.errors import NotFound, Overloaded, VersionNotFound
from serving.formats.base import LoadPolicy, Predictor
from serving.manifest import Manifest, TensorSpec
from serving.repository import Repository, Resolved, collect_files, file_entries
from serving.runtime.slot import ModelSlot, ResidentVersions
from serving.store.local import LocalStore

SPEC = [TensorSpec(name="x", datatype="FP64", shape=[-1, 1])]


class Closable(Predictor):
    """Fails loudly when used after close(), as an ONNX session does (AttributeError there)."""

    inputs = SPEC
    outputs = SPEC

    def __init__(self) -> None:
        self.closed = False

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.closed:
            raise RuntimeError("predict on a closed predictor")
        return {"x": inputs["x"]}

    def close(self) -> None:
        self.closed = True


def closable_loader(cached: CachedVersion, policy: LoadPolicy) -> Predictor:
    return Closable()


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    repo = Repository(LocalStore(str(tmp_path / "store")))
    for version in ("1", "2"):
        src = tmp_path / f"src-{version}"
        src.mkdir()
        (src / "w.json").write_text(json.dumps({"v": version}))
        files = collect_files(src)
        manifest = Manifest(name="m", version=version, format="test", files=file_entries(files))
        repo.publish(manifest, files)
    return repo


@pytest.fixture
def slot(repo: Repository, tmp_path: Path) -> Iterator[ModelSlot]:
    slot = ModelSlot("m", repo, LoaderCache(tmp_path / "cache"), loader=closable_loader, warmup=False)
    yield slot
    slot.close()


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads every 10 microseconds, so the read-then-lease window is really exercised."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


SWAPS = 2_000
"""Swaps under two leasing threads; the deterministic race is the next test. (10,000 took 40 s on 2 cores.)"""


def test_thousands_of_swaps_under_concurrent_leases_give_no_failure(
    slot: ModelSlot, repo: Repository, fast_switching: None
) -> None:
    targets: list[Resolved] = [repo.resolve("m:1"), repo.resolve("m:2")]
    slot.swap_to(targets[0])
    stop = threading.Event()
    failures: list[BaseException] = []
    served = [0]

    def client() -> None:
        batch = {"x": np.ones((1, 1))}
        while not stop.is_set():
            try:
                with slot.lease() as live:
                    live.predictor.predict(batch)
                served[0] += 1
            except BaseException as exc:
                failures.append(exc)

    clients = [threading.Thread(target=client) for _ in range(2)]
    for t in clients:
        t.start()
    try:
        for i in range(SWAPS):
            slot.swap_to(targets[(i + 1) % 2])
    finally:
        stop.set()
        for t in clients:
            t.join()
    assert failures == []
    assert served[0] > 0


def test_a_swap_landing_between_reading_live_and_leasing_it_is_harmless(
    slot: ModelSlot, repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race made deterministic: the old version is retired (and closed) right before the lease."""
    from serving.runtime.slot import Live

    slot.swap_to(repo.resolve("m:1"))
    real = Live.try_acquire
    swapped: list[str] = []

    def swap_first(self: Live) -> bool:
        if not swapped:
            swapped.append(slot.swap_to(repo.resolve("m:2")).version)
        return real(self)

    monkeypatch.setattr(Live, "try_acquire", swap_first)
    with slot.lease() as live:
        assert (live.version, swapped) == ("2", ["2"])
        assert live.predictor.predict({"x": np.ones((1, 1))})["x"].shape == (1, 1)


def test_a_retired_version_refuses_a_lease(slot: ModelSlot, repo: Repository) -> None:
    old = slot.swap_to(repo.resolve("m:1"))
    slot.swap_to(repo.resolve("m:2"))
    assert not old.try_acquire()
    assert isinstance(old.predictor, Closable)
    assert old.predictor.closed


def test_explicit_version_leases_survive_lru_eviction_under_concurrency(
    slot: ModelSlot, repo: Repository, fast_switching: None
) -> None:
    """Two versions through a one-slot LRU: each lease sees an open predictor, never a closed one."""
    slot.swap_to(repo.resolve("m:1"))
    slot.swap_to(repo.resolve("m:2"))  # live is 2; explicit requests alternate 1 and 2
    resident = ResidentVersions(slot, max_versions=1, max_loading=4)
    failures: list[BaseException] = []

    def client(version: str) -> None:
        for _ in range(300):
            try:
                with resident.lease(version) as live:
                    live.predictor.predict({"x": np.ones((1, 1))})
            except Overloaded:
                pass
            except BaseException as exc:
                failures.append(exc)

    threads = [threading.Thread(target=client, args=(v,)) for v in ("1", "1", "2", "1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_missing_version_is_remembered_for_the_ttl_and_leaves_no_single_flight_entry(
    slot: ModelSlot, repo: Repository
) -> None:
    clock = Clock()
    resident = ResidentVersions(slot, 2, miss_ttl_s=10.0, clock=clock)
    gets = 0
    real_get = repo.store.get

    def counting_get(key: str) -> tuple[bytes, str]:
        nonlocal gets
        gets += 1
        return real_get(key)

    repo.store.get = counting_get  # type: ignore[method-assign]  # NOTE: count store requests
    for _ in range(3):
        with pytest.raises(VersionNotFound), resident.lease("404"):
            pass
    assert gets == 1
    assert resident.pending() == 0
    clock.now += 11
    with pytest.raises(NotFound), resident.lease("404"):
        pass
    assert gets == 2


def test_a_thousand_random_versions_leave_bounded_state(slot: ModelSlot) -> None:
    resident = ResidentVersions(slot, 2)
    for i in range(1000):
        with pytest.raises(NotFound), resident.lease(f"r{i:04d}"):
            pass
    assert resident.pending() == 0
    assert resident.versions() == []
    assert len(resident._misses) <= ResidentVersions.MAX_MISSES


def test_loads_beyond_the_bound_are_refused_with_retry_after(slot: ModelSlot, repo: Repository) -> None:
    """With max_loading=1, a second version requested while one loads gets Overloaded (503)."""
    entered, release = threading.Event(), threading.Event()

    def slow_loader(cached: CachedVersion, policy: LoadPolicy) -> Predictor:
        entered.set()
        assert release.wait(30)
        return Closable()

    slot._loader = slow_loader
    resident = ResidentVersions(slot, 2, max_loading=1)
    done: list[str] = []

    def first() -> None:
        with resident.lease("1") as live:
            done.append(live.version)

    t = threading.Thread(target=first)
    t.start()
    assert entered.wait(30)
    with pytest.raises(Overloaded) as info, resident.lease("2"):
        pass
    assert info.value.status_code == 503
    assert info.value.retry_after_s == 1
    release.set()
    t.join()
    assert done == ["1"]
    with resident.lease("2") as live:  # the bound is free again
        assert live.version == "2"
