"""Isolation through the serving core: ModelService over a real store, cache and helper."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import prometheus_client
import pytest
from hostile_modules import Sleepy, good_iris, segfault_version
from rest_client import infer_v2

from serving.cache import LoaderCache
from serving.config import AppConfig
from serving.errors import DeadlineExceeded
from serving.formats.base import LoadPolicy
from serving.isolation.worker import DEADLINE, WorkerLimits, WorkerPredictor
from serving.protocol.types import InferRequest
from serving.publish import publish_path
from serving.repository import Repository, SetTarget
from serving.runtime.service import ModelService
from serving.save import save
from serving.settings import Settings
from serving.store.local import LocalStore
from serving.testing.poll import wait_for

ROW = [[5.1, 3.5, 1.4, 0.2]]


def failures(model: str, reason: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value(
        "serving_swap_failures_total", {"model": model, "reason": reason}
    )
    return value or 0.0


def make_service(root: Path, name: str) -> ModelService:
    app = AppConfig.model_validate(
        {"store": str(root / "store"), "models": [{"name": name}], "cache_dir": str(root / "cache")}
    )
    settings = Settings(store=str(root / "store"), cache_dir=root / "cache", isolation_cpu_seconds=30)
    return ModelService(app.models[0], app, settings)


@pytest.fixture
def store(tmp_path: Path) -> Repository:
    repo = Repository(LocalStore(str(tmp_path / "store")))
    good = good_iris(tmp_path / "good.joblib")
    publish_path(repo, good, "tree", version="1", format="sklearn", example=ROW)
    crash, kwargs = segfault_version(tmp_path / "bad.pt")
    publish_path(repo, crash, "tree", version="2", format="torch-state-dict", **kwargs)
    repo.move_alias("tree", "production", SetTarget("1"))
    return repo


def infer(service: ModelService) -> tuple[int, str]:
    tensor = {"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": ROW[0]}
    body = json.dumps({"inputs": [tensor]}).encode()
    reply = infer_v2(service, body)
    return reply.status, service.slot.version or ""


def test_the_live_version_keeps_serving_while_a_segfaulting_version_fails_isolation(
    store: Repository, tmp_path: Path
) -> None:
    service = make_service(tmp_path, "tree")
    try:
        service.start()
        assert infer(service) == (200, "1")
        before = failures("tree", "crash")
        store.move_alias("tree", "production", SetTarget("2"))
        service.watcher.tick()  # type: ignore[union-attr]
        assert infer(service) == (200, "1")
        status = service.status()
        assert status["failed_version"] == "2"
        assert "crash" in status["last_error"]
        assert failures("tree", "crash") == before + 1
    finally:
        service.slot.close()


def test_a_replica_that_starts_on_a_failing_target_serves_the_last_good_version(
    store: Repository, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = make_service(tmp_path, "tree")
    first.start()  # serves v1: recorded as this node's last good version
    first.slot.close()
    store.move_alias("tree", "production", SetTarget("2"))
    restarted = make_service(tmp_path, "tree")
    try:
        with caplog.at_level(logging.WARNING, logger="serving.runtime.watcher"):
            restarted.start()
        assert infer(restarted) == (200, "1")
        status = restarted.status()
        assert status["source"] == "last_good"
        assert status["target_version"] == "2"
        assert status["failed_version"] == "2"
        assert "failed isolation (crash)" in status["last_error"]
        (line,) = [r for r in caplog.records if getattr(r, "event", None) == "last_good"]
        assert (line.from_version, line.to_version) == ("2", "1")  # type: ignore[attr-defined]
        # The target is retried with backoff and serves once the alias moves to a good version.
        store.move_alias("tree", "production", SetTarget("1"))
        restarted.watcher.tick(force=True)  # type: ignore[union-attr]
        assert restarted.status()["failed_version"] is None
    finally:
        restarted.slot.close()


def test_a_replica_with_no_last_good_version_is_not_ready(store: Repository, tmp_path: Path) -> None:
    store.move_alias("tree", "production", SetTarget("2"))
    service = make_service(tmp_path, "tree")
    try:
        with pytest.raises(Exception, match="failed isolation"):
            service.start()
        assert service.slot.live is None
    finally:
        service.slot.close()


def test_the_helper_does_not_outlive_a_terminated_parent(tmp_path: Path) -> None:
    model = good_iris(tmp_path / "iris.joblib")
    script = textwrap.dedent(
        f"""
        import sys, threading
        from serving.publish import publish_path
        from serving.repository import Repository
        from serving.store.local import LocalStore
        from serving.cache import LoaderCache
        from serving.formats.base import LoadPolicy
        from serving.isolation.prober import Prober
        repo = Repository(LocalStore({str(tmp_path / "store")!r}))
        publish_path(repo, __import__("pathlib").Path({str(model)!r}), "iris", version="1", format="sklearn")
        cache = LoaderCache({str(tmp_path / "cache")!r})
        cached = cache.fetch(repo, repo.resolve("iris:1"))
        prober = Prober()
        prober.probe(cached, LoadPolicy())
        print(prober._proc.pid, flush=True)
        threading.Event().wait()
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        assert parent.stdout is not None
        helper = int(parent.stdout.readline())
        os.kill(helper, 0)  # alive while its parent is
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(helper, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"helper {helper} outlived its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=10)
        assert parent.stdout is not None
        parent.stdout.close()


def test_a_request_whose_client_left_counts_499_and_not_against_its_version(tmp_path: Path) -> None:
    """A request awaited on the loop whose task is cancelled (its client disconnected) is counted
    with status 499; the figures a rollout judges the version by leave it out, and the worker
    answers the next request, not the abandoned one."""
    repo = Repository(LocalStore(str(tmp_path / "store")))
    save(Sleepy(), "slow", version="1", store=repo, example=[[0.0, 1.0]])
    repo.move_alias("slow", "production", SetTarget("1"))
    service = make_service(tmp_path, "slow")
    labels = {"model": "slow", "version": "1", "status": "499", "role": "live"}
    before = prometheus_client.REGISTRY.get_sample_value("serving_requests_total", labels) or 0.0

    async def run() -> dict[str, np.ndarray]:
        name = service.slot.live.predictor.inputs[0].name  # type: ignore[union-attr]
        slow = InferRequest("slow", {name: np.array([[0.8, 1.0]], dtype=np.float32)})
        task = asyncio.create_task(service.infer_async(slow))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        quick = InferRequest("slow", {name: np.array([[0.0, 3.0]], dtype=np.float32)})
        return (await service.infer_async(quick)).outputs

    try:
        service.start()
        outputs = asyncio.run(run())
        np.testing.assert_array_equal(next(iter(outputs.values())), [[0.0, 6.0]])
        assert prometheus_client.REGISTRY.get_sample_value("serving_requests_total", labels) == before + 1
        figures = service.figures.snapshot()["1"]
        assert (figures["requests"], figures["errors"]) == (1, 0)
    finally:
        service.close()


def test_a_worker_closed_on_the_loop_is_stopped_in_a_thread(tmp_path: Path) -> None:
    """``close()`` called on the loop (as the last lease of a retired version, given back by a
    request awaited there, does) returns while a drain still holds the worker, and the worker
    is stopped in a thread."""
    repo = Repository(LocalStore(str(tmp_path / "store")))
    save(Sleepy(), "slow", version="1", store=repo, example=[[0.0, 1.0]])
    cache = LoaderCache(tmp_path / "cache", max_bytes=10**9)
    worker = WorkerPredictor(
        cache.fetch(repo, repo.resolve("slow:1")),
        LoadPolicy(),
        WorkerLimits(predict_timeout_s=20),
        model="slow",
    )
    pid = worker.pid
    assert pid is not None

    async def run() -> bool:
        name = worker.inputs[0].name
        token = DEADLINE.set(time.monotonic() + 0.2)
        try:
            # NOTE: 504 at 0.2 s; a drain thread then holds the worker for about 1.3 s more.
            with pytest.raises(DeadlineExceeded, match="deadline"):
                await worker.predict_async({name: np.array([[1.5, 0.0]], dtype=np.float32)})
        finally:
            DEADLINE.reset(token)
        worker.close()
        # NOTE: a close that waited for the worker would have waited for the drain to let go.
        return worker._call_lock.locked()

    assert asyncio.run(run()), "close() on the loop waited for the drained request"
    wait_for(
        lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), timeout=30, what="the worker stopped"
    )


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return True
