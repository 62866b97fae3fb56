"""Model sets on the standalone server: members load on demand, under a memory budget, from a real store.

Real parts: a local store with real sklearn versions, real model workers (each member's
version predicts in its own process), the real REST API over the standalone app's data
plane, and prometheus_client's real registry.
"""

from __future__ import annotations

import asyncio
import functools
import operator
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import orjson
import prometheus_client
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from serving.config import AppConfig
from serving.publish import publish_path
from serving.repository import Repository, SetTarget
from serving.server.rest import HttpRequest
from serving.server.standalone import StandaloneApp
from serving.settings import Settings
from serving.store.local import LocalStore
from serving.testing.poll import wait_for

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


def _publish(tmp_path: Path, repo: Repository, name: str, version: str = "1", flip: bool = False) -> None:
    x, y = load_iris(return_X_y=True)
    if flip:
        y = 2 - y  # NOTE: answers differently, so a swap shows in the answer
    path = tmp_path / f"{name}-{version}.joblib"
    joblib.dump(LogisticRegression(max_iter=300).fit(x, y), path)
    publish_path(repo, path, name, version=version, example=ROWS[:1])
    repo.move_alias(name, "production", SetTarget(version))


@pytest.fixture
def store(tmp_path: Path) -> tuple[str, Repository]:
    root = str(tmp_path / "store")
    repo = Repository(LocalStore(root))
    for i in range(3):
        _publish(tmp_path, repo, f"fraud-{i}")
    _publish(tmp_path, repo, "iris")
    return root, repo


@pytest.fixture
def make_app(tmp_path: Path, store: tuple[str, Repository]) -> Iterator[Any]:
    apps: list[StandaloneApp] = []

    def make(pool: dict[str, Any] | None = None, **model: Any) -> StandaloneApp:
        config = AppConfig.model_validate(
            {
                "models": [{"name": "iris", "isolation": "none"}, {"prefix": "fraud-", **model}],
                "pool": pool or {},
                "poll_interval_s": 0.2,
            }
        )
        app = StandaloneApp(config, Settings(store=store[0], cache_dir=tmp_path / "cache"))
        app.start()
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


def _call(app: StandaloneApp, method: str, path: str, payload: Any = None) -> tuple[int, Any, dict[str, str]]:
    async def body() -> AsyncIterator[bytes]:
        if payload is not None:
            yield orjson.dumps(payload)

    reply = asyncio.run(app.rest.handle(HttpRequest(method, path, {}, body)))
    headers = {k.lower(): v for k, v in (reply.headers or {}).items()}
    return reply.status, orjson.loads(reply.body) if reply.body else None, headers


def _infer(app: StandaloneApp, model: str) -> tuple[int, Any, dict[str, str]]:
    inputs = [
        {
            "name": "input-0",
            "shape": [2, 4],
            "datatype": "FP64",
            "data": functools.reduce(operator.iadd, ROWS, []),
        }
    ]
    return _call(
        app, "POST", f"/v2/models/{model}/infer", {"inputs": inputs, "outputs": [{"name": "predict"}]}
    )


def _ok(app: StandaloneApp, model: str) -> list[int]:
    status, body, _ = _infer(app, model)
    assert status == 200, body
    return [int(v) for v in body["outputs"][0]["data"]]


def _pids(app: StandaloneApp) -> dict[str, int]:
    assert app.pool is not None
    out = {}
    for name in app.pool.loaded():
        entry = app.pool.get_loaded(name, touch=False)
        assert entry is not None
        try:
            pid = entry.member.service.status().get("worker", {}).get("pid")
        finally:
            app.pool.leave(entry)
        out[name] = pid
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_members_load_on_their_first_request_and_a_model_published_later_is_served(
    make_app: Any, store: tuple[str, Repository], tmp_path: Path
) -> None:
    app = make_app()
    assert app.pool is not None
    assert app.pool.loaded() == []
    # NOTE: the cold request says how long it waited for the load; a warm one says nothing.
    status, cold, _ = _infer(app, "fraud-1")
    assert status == 200
    assert cold["parameters"]["load_wait_ms"] > 0
    assert "parameters" not in _infer(app, "fraud-1")[1]
    assert _ok(app, "fraud-1") == [0, 2]
    assert app.pool.loaded() == ["fraud-1"]
    # NOTE: published after the server started: no restart, no config change.
    _publish(tmp_path, store[1], "fraud-new", flip=True)
    assert _ok(app, "fraud-new") == [2, 0]
    # NOTE: a name outside every set, and a member that is not in the store, are 404s.
    status, body, _ = _infer(app, "other-1")
    assert status == 404
    assert "not served here" in body["error"]
    status, body, _ = _infer(app, "fraud-absent")
    assert status == 404, body
    index = {row["name"]: row for row in _call(app, "GET", "/v2/repository/index")[1]}
    assert {"iris", "fraud-1", "fraud-new"} <= set(index)
    assert index["fraud-1"]["set"] == "fraud-"


def test_a_member_follows_its_alias_while_loaded(
    make_app: Any, store: tuple[str, Repository], tmp_path: Path
) -> None:
    app = make_app()
    assert _ok(app, "fraud-0") == [0, 2]
    _root, repo = store
    _publish(tmp_path, repo, "fraud-0", version="2", flip=True)
    wait_for(lambda: _ok(app, "fraud-0") == [2, 0], timeout=30, what="fraud-0 to swap to version 2")


def test_the_budget_evicts_the_least_recently_used_member_and_unloading_ends_its_worker(
    make_app: Any,
) -> None:
    app = make_app()
    assert app.pool is not None
    _ok(app, "fraud-0")
    one = app.pool.snapshot()["members"]["fraud-0"]["bytes"]
    assert one > 10 * 2**20, "a model worker is a process of its own: it holds megabytes"
    _ok(app, "fraud-1")
    _ok(app, "fraud-0")  # fraud-1 is now the least recently used
    # NOTE: room for these two members (and the server and the zygote beside them), not a third.
    app.pool.memory_bytes = app.pool.snapshot()["used_bytes"] + one // 2
    first_pids = _pids(app)
    _ok(app, "fraud-2")
    assert sorted(app.pool.loaded()) == ["fraud-0", "fraud-2"]
    wait_for(
        lambda: not _alive(first_pids["fraud-1"]), timeout=10, what="the evicted member's worker to exit"
    )
    assert app.pool.snapshot()["used_bytes"] <= app.pool.memory_bytes
    # NOTE: an unload request frees its worker too, and the next request loads it again.
    status, body, _ = _call(app, "POST", "/v2/repository/models/fraud-0/unload")
    assert status == 200
    assert body == {"name": "fraud-0", "unloaded": True}
    wait_for(
        lambda: not _alive(first_pids["fraud-0"]), timeout=10, what="the unloaded member's worker to exit"
    )
    assert app.pool.loaded() == ["fraud-2"]
    assert _ok(app, "fraud-0") == [0, 2]
    # NOTE: a named model never unloads.
    status, body, _ = _call(app, "POST", "/v2/repository/models/iris/unload")
    assert status == 400
    assert "stays loaded" in body["error"]


def test_unloading_a_member_ends_the_worker_of_an_explicit_version_too(
    make_app: Any, store: tuple[str, Repository], tmp_path: Path
) -> None:
    """A version a client named (not the live one) has a model worker of its own; the unload
    must end it with the live version's, or the memory the budget freed stays taken."""
    app = make_app()
    _root, repo = store
    _publish(tmp_path, repo, "fraud-0", version="2", flip=True)
    repo.move_alias("fraud-0", "production", SetTarget("1"))
    wait_for(lambda: _ok(app, "fraud-0") == [0, 2], timeout=30, what="fraud-0 to serve version 1")
    status, body, _ = _call(
        app,
        "POST",
        "/v2/models/fraud-0/versions/2/infer",
        {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": ROWS[0]}]},
    )
    assert status == 200, body
    assert app.pool is not None
    entry = app.pool.get_loaded("fraud-0", touch=False)
    assert entry is not None
    try:
        (explicit,) = entry.member.service.resident.loaded()
        pid = explicit.predictor.pid
    finally:
        app.pool.leave(entry)
    assert explicit.version == "2"
    assert pid is not None
    assert _alive(pid)
    assert _call(app, "POST", "/v2/repository/models/fraud-0/unload")[0] == 200
    wait_for(lambda: not _alive(pid), timeout=10, what="the explicit version's worker to exit")


def test_a_member_that_cannot_fit_gets_503_with_retry_after(make_app: Any) -> None:
    app = make_app(pool={"memory_bytes": 2**20, "retry_after_s": 9})
    status, body, headers = _infer(app, "fraud-1")
    assert status == 503, body
    assert "memory budget" in body["error"]
    assert headers.get("retry-after") == "9"
    assert app.pool is not None
    assert app.pool.loaded() == []
    # NOTE: the named model is untouched.
    wait_for(lambda: _infer(app, "iris")[0] == 200, timeout=30, what="iris to answer")


def test_the_model_label_holds_loaded_members_only(make_app: Any) -> None:
    app = make_app()

    def labelled(model: str) -> bool:
        return (
            prometheus_client.REGISTRY.get_sample_value(
                "serving_requests_total", {"model": model, "version": "1", "status": "200", "role": "live"}
            )
            is not None
        )

    _ok(app, "fraud-2")
    assert labelled("fraud-2")
    assert _call(app, "POST", "/v2/repository/models/fraud-2/unload")[0] == 200
    # NOTE: the member is closed off the request's thread, then its series are dropped.
    wait_for(lambda: not labelled("fraud-2"), timeout=10, what="fraud-2's series to be dropped")
    assert app.pool is not None
    assert prometheus_client.REGISTRY.get_sample_value("serving_pool_models") == len(app.pool.loaded())


def test_pinned_and_prefetched_members_load_at_start(make_app: Any) -> None:
    app = make_app(pool={"pinned": ["fraud-0"], "prefetch": ["fraud-1"]}, isolation="none")
    assert app.pool is not None
    wait_for(lambda: sorted(app.pool.loaded()) == ["fraud-0", "fraud-1"], timeout=60, what="prefetch")
    assert app.pool.snapshot()["members"]["fraud-0"]["pinned"]
    assert not app.pool.snapshot()["members"]["fraud-1"]["pinned"]
    assert np.array_equal(_ok(app, "fraud-1"), [0, 2])


def test_with_signatures_required_an_unsigned_member_is_refused_and_a_signed_one_served(
    tmp_path: Path,
) -> None:
    from serving.signing import alias_signer, generate_keypair, load_signing_key

    trusted = generate_keypair(tmp_path / "keys" / "release")
    key = load_signing_key(trusted.key_path)
    repo = Repository(LocalStore(str(tmp_path / "store")))
    x, y = load_iris(return_X_y=True)
    for name, signed in (("fraud-signed", True), ("fraud-planted", False)):
        path = tmp_path / f"{name}.joblib"
        joblib.dump(LogisticRegression(max_iter=300).fit(x, y), path)
        publish_path(repo, path, name, version="1", example=ROWS[:1], signing_key=key if signed else None)
        repo.move_alias(name, "production", SetTarget("1"), writer=alias_signer(key))
    settings = Settings(
        store=str(tmp_path / "store"),
        cache_dir=tmp_path / "cache",
        require_signature=True,
        trusted_keys=[trusted.pub_path],
    )
    config = AppConfig.model_validate({"models": [{"prefix": "fraud-", "isolation": "none"}]})
    app = StandaloneApp(config, settings)
    app.start()
    try:
        assert _ok(app, "fraud-signed") == [0, 2]
        status, body, _ = _infer(app, "fraud-planted")
        assert status == 403, body
        assert "signature" in body["error"]
        assert app.pool is not None
        assert app.pool.loaded() == ["fraud-signed"]
    finally:
        app.close()
