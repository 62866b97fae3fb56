"""The slot and the alias watcher, driven tick by tick with an injected clock."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from serving.cache import CachedVersion, LoaderCache
from serving.errors import IntegrityError, LoadError, NotReady, Overloaded
from serving.formats.base import LoadPolicy, Predictor
from serving.manifest import Manifest, TensorSpec
from serving.repository import Repository, Rollback, SetTarget, collect_files, file_entries
from serving.runtime.slot import ModelSlot, NotLoaded, ResidentVersions
from serving.runtime.watcher import AliasWatcher
from serving.store.local import LocalStore

SPEC_IN = [TensorSpec(name="x", datatype="FP64", shape=[-1, 1])]
SPEC_OUT = [TensorSpec(name="y", datatype="FP64", shape=[-1, 1])]


class Scale(Predictor):
    """A model that multiplies by the factor stored in its one file."""

    inputs = SPEC_IN
    outputs = SPEC_OUT

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.closed = False

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.factor < 0:
            raise RuntimeError("this version explodes on warm-up")
        return {"y": inputs["x"] * self.factor}

    def close(self) -> None:
        self.closed = True


def scale_loader(cached: CachedVersion, policy: LoadPolicy) -> Predictor:
    body = json.loads((cached.path / "factor.json").read_text())
    if body.get("corrupt"):
        raise ValueError("unreadable model file")
    return Scale(float(body["factor"]))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository(LocalStore(str(tmp_path / "store")))


@pytest.fixture
def cache(tmp_path: Path) -> LoaderCache:
    return LoaderCache(tmp_path / "cache", max_bytes=10**9)


def publish(repo: Repository, tmp_path: Path, version: str, **body: object) -> None:
    src = tmp_path / f"src-{version}"
    src.mkdir()
    (src / "factor.json").write_text(json.dumps(body))
    files = collect_files(src)
    manifest = Manifest(
        name="m",
        version=version,
        format="test",
        files=file_entries(files),
        inputs=SPEC_IN,
        outputs=SPEC_OUT,
        example=[[1.0]],
    )
    repo.publish(manifest, files)


def make(repo: Repository, cache: LoaderCache, clock: Clock) -> tuple[ModelSlot, AliasWatcher]:
    slot = ModelSlot("m", repo, cache, loader=scale_loader)
    watcher = AliasWatcher(slot, "production", interval_s=5, backoff_base_s=2, backoff_max_s=8, clock=clock)
    return slot, watcher


def predict(slot: ModelSlot) -> tuple[str, float]:
    with slot.lease() as live:
        return live.version, float(live.predictor.predict({"x": np.array([[1.0]])})["y"][0, 0])


def test_slot_is_not_ready_before_a_version_loads(repo, cache) -> None:
    slot = ModelSlot("m", repo, cache, loader=scale_loader)
    with pytest.raises(NotReady), slot.lease():
        pass


def test_watcher_follows_the_alias_when_it_moves(repo, cache, tmp_path) -> None:
    publish(repo, tmp_path, "1", factor=1)
    publish(repo, tmp_path, "2", factor=2)
    repo.move_alias("m", "production", SetTarget("1"))
    clock = Clock()
    slot, watcher = make(repo, cache, clock)
    watcher.start()
    assert predict(slot) == ("1", 1.0)
    assert watcher.tick() is True  # the store answered
    assert predict(slot) == ("1", 1.0)
    repo.move_alias("m", "production", SetTarget("2"))
    watcher.tick()
    assert predict(slot) == ("2", 2.0)


def test_in_flight_request_finishes_on_the_old_version_which_is_then_released(repo, cache, tmp_path) -> None:
    publish(repo, tmp_path, "1", factor=1)
    publish(repo, tmp_path, "2", factor=2)
    repo.move_alias("m", "production", SetTarget("1"))
    slot, watcher = make(repo, cache, Clock())
    watcher.start()
    with slot.lease() as old:
        repo.move_alias("m", "production", SetTarget("2"))
        watcher.tick()
        assert slot.version == "2"
        assert old.predictor.predict({"x": np.array([[3.0]])})["y"][0, 0] == 3.0
        assert not old.predictor.closed  # type: ignore[attr-defined]
    assert old.predictor.closed  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("body", "error"),
    [({"corrupt": True}, LoadError), ({"factor": -1}, LoadError)],
    ids=["load-fails", "warm-up-fails"],
)
def test_a_version_that_fails_never_serves_and_the_old_one_keeps_serving(
    repo, cache, tmp_path, body, error
) -> None:
    publish(repo, tmp_path, "1", factor=1)
    publish(repo, tmp_path, "2", **body)
    publish(repo, tmp_path, "3", factor=3)
    repo.move_alias("m", "production", SetTarget("1"))
    clock = Clock()
    slot, watcher = make(repo, cache, clock)
    watcher.start()
    repo.move_alias("m", "production", SetTarget("2"))
    watcher.tick()
    assert predict(slot) == ("1", 1.0)
    assert watcher.status().failed_version == "2"
    # Backoff: no retry before the retry time, however often it ticks.
    loads_before = len(list((cache.root / "versions" / "m").iterdir()))
    watcher.tick()
    assert predict(slot) == ("1", 1.0)
    assert watcher.next_delay() <= 2.0
    # A good version recovers.
    repo.move_alias("m", "production", SetTarget("3"))
    watcher.tick()
    assert predict(slot) == ("3", 3.0)
    assert watcher.status().failed_version is None
    assert loads_before >= 2


def test_failed_version_is_retried_with_growing_backoff(repo, cache, tmp_path) -> None:
    publish(repo, tmp_path, "1", factor=1)
    publish(repo, tmp_path, "2", corrupt=True)
    repo.move_alias("m", "production", SetTarget("1"))
    clock = Clock()
    slot, watcher = make(repo, cache, clock)
    attempts: list[float] = []
    real_load = slot.load

    def counting_load(*args, **kwargs):
        attempts.append(clock.now)
        return real_load(*args, **kwargs)

    watcher.start()
    slot.load = counting_load  # type: ignore[method-assign]
    repo.move_alias("m", "production", SetTarget("2"))
    for _ in range(40):
        watcher.tick()
        clock.now += 0.5
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[:3] == [2.0, 4.0, 8.0]
    assert max(gaps) <= 8.0
    assert slot.version == "1"


def test_a_digest_mismatch_is_refused_and_the_old_version_keeps_serving(repo, cache, tmp_path) -> None:
    publish(repo, tmp_path, "1", factor=1)
    publish(repo, tmp_path, "2", factor=2)
    repo.move_alias("m", "production", SetTarget("1"))
    slot, watcher = make(repo, cache, Clock())
    watcher.start()
    stored = Path(repo.store.root) / "m" / "versions" / "2" / "factor.json"  # type: ignore[attr-defined]
    stored.write_text(stored.read_text().replace("2", "9"))
    repo.move_alias("m", "production", SetTarget("2"))
    watcher.tick()
    assert predict(slot) == ("1", 1.0)
    assert "sha256" in (watcher.status().last_error or "")
    assert not list((cache.root / "versions" / "m").glob("2-*"))


def test_store_outage_keeps_serving_and_a_cold_start_uses_the_remembered_alias(repo, cache, tmp_path) -> None:
    publish(repo, tmp_path, "1", factor=1)
    repo.move_alias("m", "production", SetTarget("1"))
    slot, watcher = make(repo, cache, Clock())
    watcher.start()
    root = Path(repo.store.root)  # type: ignore[attr-defined]
    root.rename(tmp_path / "gone")
    assert watcher.tick() is False  # the store gave no answer: a load request is not done
    assert predict(slot) == ("1", 1.0)
    assert watcher.status().last_error
    # A new replica, store still down: ready on the version the cache remembers.
    slot2, watcher2 = make(Repository(LocalStore(str(root))), cache, Clock())
    watcher2.start()
    assert predict(slot2) == ("1", 1.0)
    assert watcher2.status().source == "cache"


def test_explicit_versions_are_kept_in_a_bounded_lru(repo, cache, tmp_path) -> None:
    for v in ("1", "2", "3", "4"):
        publish(repo, tmp_path, v, factor=int(v))
    repo.move_alias("m", "production", SetTarget("1"))
    slot, watcher = make(repo, cache, Clock())
    watcher.start()
    resident = ResidentVersions(slot, max_versions=2)
    for v in ("2", "3", "4"):
        with resident.lease(v) as live:
            assert live.predictor.predict({"x": np.array([[1.0]])})["y"][0, 0] == int(v)
    assert resident.versions() == ["3", "4"]
    with resident.lease("1") as live:
        assert live is slot.live


def _three_versions_live_on_1(repo, cache, tmp_path) -> ModelSlot:
    """Versions 1 to 3 published, the alias on 1, and a started slot serving it."""
    for v in ("1", "2", "3"):
        publish(repo, tmp_path, v, factor=int(v))
    repo.move_alias("m", "production", SetTarget("1"))
    slot, watcher = make(repo, cache, Clock())
    watcher.start()
    return slot


def test_a_lease_that_may_not_load_refuses_an_evicted_version_and_loads_nothing(
    repo, cache, tmp_path
) -> None:
    """What a request on the event loop asks for: never a load there, even for a version evicted
    after the request checked it was loaded."""
    slot = _three_versions_live_on_1(repo, cache, tmp_path)
    resident = ResidentVersions(slot, max_versions=1)
    with resident.lease("2"):
        pass
    with resident.lease("2", load=False) as live:
        assert live.version == "2"
    with resident.lease("1", load=False) as live:
        assert live is slot.live
    with resident.lease("3"):
        pass
    with pytest.raises(NotLoaded), resident.lease("2", load=False):
        pass
    assert resident.versions() == ["3"]


def test_closing_the_resident_set_retires_its_versions_and_refuses_a_late_load(repo, cache, tmp_path) -> None:
    """An unloaded model leaves no explicit version behind (each held a model worker)."""
    slot = _three_versions_live_on_1(repo, cache, tmp_path)
    resident = ResidentVersions(slot, max_versions=2)
    with resident.lease("2"):
        pass
    (two,) = resident.loaded()
    with resident.lease("3") as three:
        resident.close()
        assert three.version == "3"
    assert not two.try_acquire(), "an idle version outlived its model"
    assert not three.try_acquire(), "a version leased during the unload outlived its model"
    assert resident.versions() == []
    with pytest.raises(Overloaded):
        resident.lease("2").__enter__()
    assert resident.versions() == []


def test_manifest_changed_after_alias_set_is_refused(repo, cache, tmp_path) -> None:
    publish(repo, tmp_path, "1", factor=1)
    repo.move_alias("m", "production", SetTarget("1"))
    root = Path(repo.store.root)  # type: ignore[attr-defined]
    man = root / "m" / "versions" / "1" / "manifest.json"
    man.write_text(man.read_text().replace('"format": "test"', '"format": "test2"'))
    with pytest.raises(IntegrityError):
        repo.resolve("m@production")


def test_each_swap_and_rollback_is_one_structured_log_line(repo, cache, tmp_path, caplog) -> None:
    publish(repo, tmp_path, "1", factor=1)
    publish(repo, tmp_path, "2", factor=2)
    repo.move_alias("m", "production", SetTarget("1"))
    _slot, watcher = make(repo, cache, Clock())
    watcher.start()
    watcher.tick()
    with caplog.at_level("INFO", logger="serving.runtime.slot"):
        repo.move_alias("m", "production", SetTarget("2"))
        watcher.tick()
        repo.move_alias("m", "production", Rollback())
        watcher.tick()
    events = [
        (r.event, r.from_version, r.to_version, r.reason)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "serving.runtime.slot"
    ]
    assert events == [("swap", "1", "2", "alias moved"), ("rollback", "2", "1", "rollback")]
    assert all(isinstance(r.duration_s, float) for r in caplog.records)  # type: ignore[attr-defined]


def test_a_forced_tick_does_not_skip_the_failure_backoff(repo, cache, tmp_path) -> None:
    """POST .../load forces ticks; flooding them retries a failing version no sooner than the backoff."""
    publish(repo, tmp_path, "1", factor=1)
    publish(repo, tmp_path, "2", corrupt=True)
    repo.move_alias("m", "production", SetTarget("1"))
    clock = Clock()
    slot, watcher = make(repo, cache, clock)
    attempts: list[float] = []
    real_load = slot.load

    def counting_load(*args, **kwargs):
        attempts.append(clock.now)
        return real_load(*args, **kwargs)

    watcher.start()
    slot.load = counting_load  # type: ignore[method-assign]
    repo.move_alias("m", "production", SetTarget("2"))
    for _ in range(40):
        watcher.tick(force=True)
        clock.now += 0.1
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(attempts) == 2
    assert gaps[0] >= 2.0
    assert slot.version == "1"


def test_a_load_that_hangs_does_not_hold_up_a_rollback_and_is_discarded_when_it_ends(
    repo, cache, tmp_path
) -> None:
    """Version 3's load blocks (a pull the store holds up); the alias goes back to 1, which
    this node has: the tick follows it within one interval, and when 3's load ends at last
    it is closed, never made live."""
    import threading
    import time

    publish(repo, tmp_path, "1", factor=1)
    publish(repo, tmp_path, "2", factor=2)
    publish(repo, tmp_path, "3", factor=3)
    repo.move_alias("m", "production", SetTarget("1"))
    gate, entered, loaded = threading.Event(), threading.Event(), []

    def loader(cached: CachedVersion, policy: LoadPolicy) -> Predictor:
        predictor = scale_loader(cached, policy)
        if cached.version == "3":
            entered.set()
            gate.wait(30)
        loaded.append(predictor)
        return predictor

    slot = ModelSlot("m", repo, cache, loader=loader)
    watcher = AliasWatcher(slot, "production", interval_s=0.2, load_wait_s=1.0, clock=Clock())
    watcher.start()
    repo.move_alias("m", "production", SetTarget("2"))
    watcher.tick()
    assert predict(slot) == ("2", 2.0)
    repo.move_alias("m", "production", SetTarget("3"))
    started = time.monotonic()
    watcher.tick()  # waits for 3 at most load_wait_s, checking the alias every interval
    assert entered.is_set()
    assert time.monotonic() - started < 5
    assert predict(slot) == ("2", 2.0)
    repo.move_alias("m", "production", Rollback())
    repo.move_alias("m", "production", SetTarget("1"))
    started = time.monotonic()
    watcher.tick()
    assert time.monotonic() - started < 1.0
    assert predict(slot) == ("1", 1.0)
    gate.set()
    from serving.testing.poll import wait_for

    late = wait_for(
        lambda: next((p for p in loaded if p.factor == 3 and p.closed), None),
        timeout=10,
        what="3's late load closed",
    )
    assert late.closed
    watcher.tick()
    assert predict(slot) == ("1", 1.0)


def test_rollout_events_written_after_the_first_look_are_counted_once(repo, cache, tmp_path) -> None:
    import prometheus_client

    from serving.repository import Noted, SetCanary

    def counted(event: str) -> float:
        value = prometheus_client.REGISTRY.get_sample_value(
            "serving_alias_events_total", {"model": "m", "event": event}
        )
        return value or 0.0

    publish(repo, tmp_path, "1", factor=1)
    publish(repo, tmp_path, "2", factor=2)
    repo.move_alias("m", "production", SetTarget("1"))
    repo.move_alias("m", "production", Noted(SetCanary("2", 10), "canary", "2", "canary 10%"))
    _slot, watcher = make(repo, cache, Clock())
    watcher.start()
    before = counted("canary")
    watcher.tick()  # the first look: events already there are history, not news
    assert counted("canary") == before
    repo.move_alias("m", "production", Noted(SetCanary("2", 50), "canary", "2", "canary 50% after ..."))
    watcher.tick()
    watcher.tick()  # unchanged: nothing counted twice
    assert counted("canary") == before + 1


def test_a_hung_load_the_alias_left_for_the_live_version_is_not_waited_for(repo, cache, tmp_path) -> None:
    """2 is live, 3's load hangs, the alias goes back to 2: later ticks return at once (they
    waited the whole load_wait_s on the hung load), and 3 is closed when it ends."""
    import threading
    import time

    from serving.testing.poll import wait_for

    for v in ("1", "2", "3"):
        publish(repo, tmp_path, v, factor=int(v))
    repo.move_alias("m", "production", SetTarget("2"))
    gate, loaded = threading.Event(), []

    def loader(cached: CachedVersion, policy: LoadPolicy) -> Predictor:
        predictor = scale_loader(cached, policy)
        if cached.version == "3":
            gate.wait(30)
        loaded.append(predictor)
        return predictor

    slot = ModelSlot("m", repo, cache, loader=loader)
    watcher = AliasWatcher(slot, "production", interval_s=0.2, load_wait_s=5.0, clock=Clock())
    watcher.start()
    repo.move_alias("m", "production", SetTarget("3"))
    threading.Thread(target=watcher.tick, daemon=True).start()
    wait_for(lambda: watcher._jobs.get("live") is not None, timeout=5, what="3's load started")
    repo.move_alias("m", "production", Rollback())
    wait_for(lambda: not watcher._lock.locked(), timeout=10, what="the first tick to end")
    started = time.monotonic()
    watcher.tick()
    assert time.monotonic() - started < 1.0
    assert predict(slot) == ("2", 2.0)
    gate.set()
    wait_for(lambda: any(p.factor == 3 and p.closed for p in loaded), timeout=10, what="3 closed")
    assert predict(slot) == ("2", 2.0)


def test_a_predictor_that_fails_to_close_is_logged_and_its_pin_still_released(caplog) -> None:
    """Retiring a version never raises into the swap, eviction or request that retired it."""
    from types import SimpleNamespace

    from serving.runtime.slot import Live

    released: list[bool] = []

    class Broken:
        def close(self) -> None:
            raise RuntimeError("the worker would not stop")

    live = Live(
        name="m",
        version="2",
        manifest=SimpleNamespace(),  # type: ignore[arg-type]
        manifest_sha256="",
        predictor=Broken(),  # type: ignore[arg-type]
        pin=SimpleNamespace(release=lambda: released.append(True)),  # type: ignore[arg-type]
    )
    live.acquire()
    live.retire()
    assert released == [], "closed under a lease"
    with caplog.at_level("ERROR", logger="serving.runtime.slot"):
        live.release()
    assert released == [True]
    assert [r.getMessage() for r in caplog.records] == ["m:2: closing its predictor failed"]
    assert caplog.records[0].exc_info is not None
