"""Shared model workers (``workers: shared``): several versions in one worker process, real
crashes, and what they cost the versions beside them."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from hostile_modules import CrashOnNegative, Cyclic, Sleepy, good_iris, segfault_version
from published import Versions
from sklearn.neighbors import KNeighborsClassifier

from serving.cache import CachedVersion
from serving.errors import IsolationFailed, ServingError, WorkerFailed
from serving.formats import load_predictor
from serving.formats.base import LoadPolicy
from serving.isolation.worker import WorkerLimits, WorkerPool, WorkerPredictor
from serving.publish import publish_path
from serving.repository import Repository
from serving.runtime.memory import rss_bytes
from serving.save import save
from serving.store.local import LocalStore
from serving.testing.poll import wait_for

LIMITS = WorkerLimits(memory_bytes=1536 * 1024**2, predict_timeout_s=20.0, restart_backoff_s=0.1)
ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]])
GOOD = np.array([[1.0, 0.0]], dtype=np.float32)
CRASH = np.array([[-1.0, 0.0]], dtype=np.float32)


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Versions:
    return Versions(tmp_path_factory.mktemp("shared"))


@pytest.fixture(scope="module")
def iris(versions: Versions, tmp_path_factory: pytest.TempPathFactory) -> CachedVersion:
    path = good_iris(tmp_path_factory.mktemp("iris") / "iris.joblib")
    return versions.add(path, "sklearn", example=ROWS[:1].tolist())


class Tenants:
    """Versions loaded into one pool; every one is closed at the end."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.loaded: list[WorkerPredictor] = []

    def load(self, cached: CachedVersion, **kwargs: Any) -> WorkerPredictor:
        predictor = WorkerPredictor(cached, LoadPolicy(), LIMITS, model="m", pool=self.pool, **kwargs)
        self.loaded.append(predictor)
        return predictor


@pytest.fixture
def one_worker() -> Iterator[Tenants]:
    tenants = Tenants(WorkerPool(1, LIMITS, memory_bytes=3 * 1024**3))
    yield tenants
    for predictor in tenants.loaded:
        predictor.close()


def _answers(worker: WorkerPredictor, rows: np.ndarray) -> np.ndarray:
    return worker.predict({worker.inputs[0].name: rows})[worker.primary_output]


def _serving(worker: WorkerPredictor) -> bool:
    """Whether ``worker`` answers iris's two rows (not while its worker restarts)."""
    try:
        return len(_answers(worker, ROWS)) == 2
    except WorkerFailed:
        return False


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # NOTE: a zombie until its parent reaps it (Popen.wait in stop()) still counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[-1].startswith("Z")


def test_versions_in_one_shared_worker_each_answer_as_themselves(
    versions: Versions, iris: CachedVersion, one_worker: Tenants
) -> None:
    local = load_predictor(iris.path, iris.manifest, LoadPolicy())
    first = one_worker.load(iris)
    doubler = one_worker.load(versions.module(CrashOnNegative()))
    pid = first.pid
    assert pid is not None
    assert pid != os.getpid()
    assert doubler.pid == pid  # NOTE: one process holds both
    assert first.shared
    assert first.status()["shared"] == "shared-0"
    want = local.predict({local.inputs[0].name: ROWS})["predict"]
    np.testing.assert_array_equal(_answers(first, ROWS), want)
    np.testing.assert_array_equal(_answers(doubler, GOOD), 2 * GOOD)
    assert one_worker.pool.status()[0]["versions"] == sorted([first.where, doubler.where])

    # One leaves: the other is still served by the same process.
    doubler.close()
    np.testing.assert_array_equal(_answers(first, ROWS), want)
    assert first.pid == pid
    # The last leaves: the worker stops.
    first.close()
    wait_for(lambda: _gone(pid), timeout=10, what="the shared worker stopped with its last version")


def test_a_shared_worker_whose_last_version_left_is_kept_for_the_next_load(iris: CachedVersion) -> None:
    tenants = Tenants(WorkerPool(1, LIMITS, memory_bytes=3 * 1024**3, keep_idle_s=60))
    try:
        first = tenants.load(iris)
        pid = first.pid
        assert pid is not None
        assert tenants.pool.idle_pids() == []
        first.close()
        wait_for(lambda: tenants.pool.idle_pids() == [pid], timeout=10, what="the emptied worker kept idle")
        assert not _gone(pid)
        # The next version joins the running worker: no new process, no import of its framework.
        second = tenants.load(iris)
        assert second.pid == pid
        assert _serving(second)
        assert tenants.pool.idle_pids() == []
        second.close()
        wait_for(lambda: tenants.pool.idle_pids() == [pid], timeout=10, what="the worker idle again")
    finally:
        tenants.pool.close()
    wait_for(lambda: _gone(pid), timeout=10, what="closing the pool to stop its idle worker")


def test_a_worker_started_ahead_holds_its_framework_takes_the_first_load_and_stops_when_unused(
    iris: CachedVersion,
) -> None:
    tenants = Tenants(WorkerPool(1, LIMITS, memory_bytes=3 * 1024**3, keep_idle_s=1.5))
    for thread in tenants.pool.prestart(["sklearn"]):
        thread.join(60)
    [pid] = tenants.pool.idle_pids()
    with open(f"/proc/{pid}/maps") as f:
        assert "/sklearn/" in f.read()  # NOTE: scikit-learn's extensions are mapped before any version
    first = tenants.load(iris)
    assert first.pid == pid
    assert _serving(first)
    first.close()
    # NOTE: kept 1.5 s with no version, then stopped by its own timer.
    wait_for(lambda: _gone(pid), timeout=15, what="the idle worker to stop after keep_idle_s")
    assert tenants.pool.idle_pids() == []


def test_an_idle_worker_that_refuses_a_version_or_dies_is_no_ones_failure_and_a_closed_pool_starts_none(
    versions: Versions, iris: CachedVersion, tmp_path: Path
) -> None:
    pool = WorkerPool(1, LIMITS, memory_bytes=3 * 1024**3, keep_idle_s=1.5)
    tenants = Tenants(pool)
    for thread in pool.prestart(["sklearn"]):
        thread.join(60)
    [pid] = pool.idle_pids()
    # A version the loader refuses: the worker goes on, idle, and still stops on its own timer.
    (tmp_path / "garbage.joblib").write_bytes(b"not a joblib file" * 100)
    garbage = versions.add(tmp_path / "garbage.joblib", "sklearn", example=ROWS[:1].tolist())
    with pytest.raises(ServingError):
        tenants.load(garbage)
    assert pool.idle_pids() == [pid]
    wait_for(lambda: _gone(pid), timeout=15, what="the idle worker to stop after a refused version")
    # An idle worker killed from outside: no failure, no restart; the next load starts one.
    for thread in pool.prestart(["sklearn"]):
        thread.join(60)
    [second] = pool.idle_pids()
    os.kill(second, signal.SIGKILL)
    wait_for(lambda: pool.idle_pids() == [], timeout=10, what="the killed idle worker to be let go")
    host = pool.hosts[0]
    assert (host.restarts, host.last_failure, host.restarting) == (0, None, False)
    first = tenants.load(iris)
    assert first.pid not in (None, pid, second)
    assert _serving(first)
    # Closed: the last version's leaving stops the worker at once, and nothing starts ahead.
    pool.close()
    third = first.pid
    assert third is not None
    first.close()
    wait_for(lambda: _gone(third), timeout=10, what="the worker to stop with its last version")
    for thread in pool.prestart(["sklearn"]):
        thread.join(60)
    assert pool.idle_pids() == []


def _leaves_its_memory(leaving: WorkerPredictor, staying: WorkerPredictor, held: str) -> None:
    """``leaving`` (over 80 MB, the last version its worker ran) leaves the worker it shares with
    ``staying`` (an iris version): the worker's resident set drops by what it ``held``, and
    ``staying`` still answers."""
    pid = leaving.pid
    assert pid is not None
    assert staying.pid == pid
    before = rss_bytes(pid)
    leaving.close()
    wait_for(
        lambda: rss_bytes(pid) < before - 80 * 10**6,
        timeout=10,
        what=f"the worker's resident set to drop by {held}",
    )
    assert len(_answers(staying, ROWS)) == 2


def test_a_version_leaving_a_shared_worker_gives_its_memory_back(
    versions: Versions, iris: CachedVersion, one_worker: Tenants, tmp_path: Path
) -> None:
    # NOTE: the first version into a worker, and the last one it ran: neither may keep it.
    rows = 3_000_000  # NOTE: 96 MB of float64 training rows, kept by a brute-force KNN
    rng = np.random.default_rng(0)
    knn = KNeighborsClassifier(n_neighbors=1, algorithm="brute").fit(
        rng.normal(size=(rows, 4)), rng.integers(0, 3, rows)
    )
    joblib.dump(knn, tmp_path / "knn.joblib")
    del knn
    big = one_worker.load(versions.add(tmp_path / "knn.joblib", "sklearn", example=ROWS[:1].tolist()))
    small = one_worker.load(iris)
    assert len(_answers(big, ROWS)) == 2
    _leaves_its_memory(big, small, "the version's 96 MB of rows")


def test_a_version_held_in_reference_cycles_frees_its_memory_when_it_leaves(
    versions: Versions, iris: CachedVersion, one_worker: Tenants
) -> None:
    # NOTE: loaded first into an empty worker, where the worker freezes what it imported; a
    # frozen version's cycles would never be collected.
    cyclic = one_worker.load(versions.module(Cyclic()))
    small = one_worker.load(iris)
    np.testing.assert_array_equal(_answers(cyclic, GOOD), 2 * GOOD)
    _leaves_its_memory(cyclic, small, "the cyclic version's 100 MB")


def test_a_crash_costs_the_versions_beside_it_a_restart_and_only_the_crasher_its_probation(
    versions: Versions, iris: CachedVersion, one_worker: Tenants
) -> None:
    failed: dict[str, list[str]] = {"iris": [], "crash": []}
    good = one_worker.load(iris, on_probation_failure=failed["iris"].append)
    crasher = one_worker.load(versions.module(CrashOnNegative()), on_probation_failure=failed["crash"].append)
    before = good.pid
    with pytest.raises(WorkerFailed, match="SIGSEGV") as info:
        _answers(crasher, CRASH)
    assert info.value.status_code == 503

    wait_for(lambda: _serving(good), timeout=30, what="the version beside the crash back and serving")
    assert good.pid != before
    assert good.restarts == 1
    wait_for(lambda: failed["crash"], timeout=5, what="the crasher's probation callback")
    assert "within its first" in failed["crash"][0]
    assert failed["iris"] == []  # NOTE: a neighbour's crash never fails a good version

    # The crasher moved to a worker of its own: it answers from there, and crashing it again
    # costs its old neighbour nothing.
    def alone() -> bool:
        try:
            return crasher.pid not in (None, good.pid) and _answers(crasher, GOOD).tolist() == [[2.0, 0.0]]
        except WorkerFailed:
            return False

    wait_for(alone, timeout=30, what="the crasher answering from a worker of its own")
    assert not crasher.shared
    with pytest.raises(WorkerFailed, match="SIGSEGV"):
        _answers(crasher, CRASH)
    assert len(_answers(good, ROWS)) == 2
    assert good.restarts == 1


def test_a_crash_in_one_shared_worker_costs_the_other_workers_nothing(
    versions: Versions, iris: CachedVersion
) -> None:
    tenants = Tenants(WorkerPool(2, LIMITS, memory_bytes=3 * 1024**3))
    try:
        crasher = tenants.load(versions.module(CrashOnNegative()))
        good = tenants.load(iris)
        assert good.pid != crasher.pid  # NOTE: the second version goes to the emptier worker
        pid = good.pid
        stop = threading.Event()
        answered: list[int] = []
        errors: list[BaseException] = []

        def stream() -> None:
            while not stop.is_set():
                try:
                    answered.append(len(_answers(good, ROWS)))
                except BaseException as exc:
                    errors.append(exc)
                    return

        thread = threading.Thread(target=stream)
        thread.start()
        try:
            for _ in range(3):
                with pytest.raises(WorkerFailed):
                    _answers(crasher, CRASH)
                wait_for(lambda: crasher.pid is not None, timeout=30, what="the crasher's worker back")
        finally:
            stop.set()
            thread.join(30)
        assert errors == []
        assert answered
        assert set(answered) == {2}
        assert (good.pid, good.restarts) == (pid, 0)
    finally:
        for predictor in tenants.loaded:
            predictor.close()


def test_a_version_that_crashes_a_shared_worker_at_load_is_refused_and_the_others_come_back(
    versions: Versions, iris: CachedVersion, one_worker: Tenants, tmp_path: Path
) -> None:
    good = one_worker.load(iris)
    path, kwargs = segfault_version(tmp_path / "crash.pt")
    cached = versions.add(path, "torch-state-dict", **kwargs)
    with pytest.raises(IsolationFailed) as info:
        one_worker.load(cached)
    assert info.value.reason == "crash"

    wait_for(lambda: _serving(good), timeout=30, what="the version beside the failed load back and serving")
    assert one_worker.pool.status()[0]["versions"] == [good.where]  # NOTE: the refused one is not reloaded


def test_the_last_version_leaving_while_another_joins_does_not_stop_the_worker_under_it(
    versions: Versions, one_worker: Tenants
) -> None:
    """A leaves while B's load (a 2 s warm-up) runs in their worker: B joins, and serves."""
    leaving = one_worker.load(versions.module(CrashOnNegative()))
    slow = versions.module(Sleepy(), example=[[2.0, 0.0]])  # NOTE: its warm-up sleeps 2 s
    joined: list[WorkerPredictor] = []
    thread = threading.Thread(target=lambda: joined.append(one_worker.load(slow)))
    thread.start()
    host = one_worker.pool.hosts[0]
    wait_for(host.call_lock.locked, timeout=10, what="the join under way")
    leaving.close()
    thread.join(60)
    assert len(joined) == 1
    np.testing.assert_array_equal(_answers(joined[0], np.array([[0.0, 1.0]], dtype=np.float32)), [[0.0, 2.0]])
    assert one_worker.pool.status()[0]["versions"] == [joined[0].where]


@pytest.mark.faults
def test_a_shared_worker_killed_from_outside_blames_no_version(versions: Versions) -> None:
    """SIGKILL from outside (the OOM killer, an operator) between requests: the next request fails
    with 503, the worker comes back, and no version in probation is blamed for it."""
    failed: list[str] = []
    # NOTE: a 1 s backoff: the request after each kill finds the worker still down on a busy machine.
    limits = WorkerLimits(memory_bytes=1536 * 1024**2, restart_backoff_s=1.0)
    one_worker = Tenants(WorkerPool(1, limits, memory_bytes=3 * 1024**3))
    try:
        _killed_from_outside(versions, one_worker, failed)
    finally:
        for predictor in one_worker.loaded:
            predictor.close()
    assert failed == []


def _killed_from_outside(versions: Versions, one_worker: Tenants, failed: list[str]) -> None:
    first = one_worker.load(versions.module(CrashOnNegative()), on_probation_failure=failed.append)
    second = one_worker.load(versions.module(CrashOnNegative()), on_probation_failure=failed.append)
    for _ in range(3):
        wait_for(lambda: second.pid is not None, timeout=30, what="the worker back")
        pid = second.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerFailed):
            _answers(second, GOOD)
    wait_for(lambda: second.pid is not None, timeout=30, what="the worker back")
    np.testing.assert_array_equal(_answers(first, GOOD), 2 * GOOD)
    assert first.shared
    assert second.shared  # NOTE: nobody was moved out for a kill that was not theirs


def test_a_version_that_failed_to_join_loads_in_a_worker_of_its_own_next_time(
    versions: Versions, iris: CachedVersion, one_worker: Tenants, tmp_path: Path
) -> None:
    good = one_worker.load(iris)
    path, kwargs = segfault_version(tmp_path / "crash.pt")
    cached = versions.add(path, "torch-state-dict", **kwargs)
    with pytest.raises(IsolationFailed):
        one_worker.load(cached)
    assert one_worker.pool.refused(cached.manifest_sha256) is not None
    # NOTE: the next try crashes a worker of its own, and nobody restarts for it.
    wait_for(lambda: good.pid is not None, timeout=30, what="the neighbour back")
    restarts = good.restarts
    with pytest.raises(IsolationFailed):
        one_worker.load(cached)
    assert good.restarts == restarts
    assert len(_answers(good, ROWS)) == 2


def test_a_model_service_with_shared_workers_counts_its_share(tmp_path: Path) -> None:
    """Two models configured ``workers: shared`` share one worker, and split its measured memory
    by what each load added."""
    from serving.config import AppConfig
    from serving.protocol.types import InferRequest
    from serving.runtime.memory import pss_bytes
    from serving.runtime.service import ModelService
    from serving.settings import Settings

    store = str(tmp_path / "store")
    repo = Repository(LocalStore(store))
    iris_path = good_iris(tmp_path / "iris.joblib")
    publish_path(
        repo, iris_path, "iris", version="1", format="sklearn", example=ROWS[:1].tolist(), alias="production"
    )
    save(CrashOnNegative(), "twice", version="1", store=repo, example=[[0.0, 1.0]], alias="production")
    app = AppConfig.model_validate(
        {
            "models": [{"name": "iris", "workers": "shared"}, {"name": "twice", "workers": "shared"}],
            "shared_workers": {"count": 1, "memory_bytes": 3 * 1024**3},
            "poll_interval_s": 60,
        }
    )
    settings = Settings(store=store, cache_dir=tmp_path / "cache")
    services = [ModelService(model, app, settings) for model in app.models]
    try:
        for service in services:
            service.start()
        iris, twice = services
        assert iris.status()["worker"]["pid"] == twice.status()["worker"]["pid"]
        assert iris.status()["worker"]["shared"] == "shared-0"
        answer = twice.infer(InferRequest(model="twice", inputs={"input-0": GOOD}))
        workers = [s.slot.live.predictor if s.slot.live else None for s in services]
        assert all(isinstance(w, WorkerPredictor) and w.shared for w in workers)
        np.testing.assert_array_equal(answer.outputs[workers[1].primary_output], 2 * GOOD)  # type: ignore[union-attr]
        # NOTE: together they count their worker once (each counting it whole would double it).
        pid = workers[0].pid  # type: ignore[union-attr]
        assert pid is not None
        whole = pss_bytes(pid)
        both = iris.memory_bytes() + twice.memory_bytes()
        assert abs(both - whole) <= 0.1 * whole  # NOTE: PSS measured twice, a moment apart
    finally:
        for service in services:
            service.close()
