"""The canary check in one ModelService: the live version predicts the canary's requests again,
after the reply, and the disagreements count under the canary's version (real store, real sklearn)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from serving.config import AppConfig, ModelConfig
from serving.protocol.types import InferRequest, RequestedOutput
from serving.publish import publish_path
from serving.repository import Promote, Repository, SetCanary, SetTarget
from serving.runtime.service import ModelService
from serving.settings import Settings
from serving.store.local import LocalStore
from serving.testing.poll import wait_for

X, Y = load_iris(return_X_y=True)


@pytest.fixture
def published(tmp_path: Path) -> tuple[Repository, str, dict[str, LogisticRegression]]:
    root = str(tmp_path / "store")
    repo = Repository(LocalStore(root))
    models = {}
    for version, c in (("1", 1.0), ("2", 0.02)):  # NOTE: 2 labels some flowers differently
        models[version] = LogisticRegression(max_iter=500, C=c).fit(X, Y)
        path = tmp_path / f"iris-{version}.joblib"
        joblib.dump(models[version], path)
        publish_path(repo, path, "iris", version=version, example=X[:1].tolist())
    repo.move_alias("iris", "production", SetTarget("1"))
    return repo, root, models


def _service(tmp_path: Path, root: str, **model: Any) -> ModelService:
    config = ModelConfig(name="iris", alias="production", isolation="never", **model)
    app = AppConfig(models=[config], poll_jitter=0)
    service = ModelService(app.models[0], app, Settings(store=root, cache_dir=tmp_path / "cache"))
    service.start()
    return service


@pytest.fixture
def canary(tmp_path: Path, published: Any) -> Iterator[tuple[ModelService, Repository, dict[str, Any]]]:
    repo, root, models = published
    service = _service(tmp_path, root)
    repo.move_alias("iris", "production", SetCanary("2", 100))
    _tick(service)
    assert service.slot.companion("canary") is not None
    yield service, repo, models
    service.close()


def _tick(service: ModelService) -> None:
    """One alias check, as the server's watcher loop runs them."""
    assert service.watcher is not None
    service.watcher.tick()


def _ask(service: ModelService, row: np.ndarray, outputs: list[str] | None = None) -> str:
    asked = [RequestedOutput(name) for name in outputs] if outputs else None
    return service.infer(InferRequest(model="iris", inputs={"input-0": row[None, :]}, outputs=asked)).version


def test_every_canary_answer_is_compared_with_the_live_versions_and_is_no_live_request(
    canary: tuple[ModelService, Repository, dict[str, Any]],
) -> None:
    service, _, models = canary
    rows = X[::3]
    expected = int(np.sum(models["1"].predict(rows) != models["2"].predict(rows)))
    assert expected > 0
    assert {_ask(service, row) for row in rows} == {"2"}
    figures = wait_for(
        lambda: (f := service.figures.snapshot().get("2", {})).get("compared") == len(rows) and f,
        what="every canary answer compared",
    )
    assert figures["disagreed"] == expected
    assert figures["requests"] == len(rows)
    # NOTE: the live version's reference predictions are not requests.
    assert service.figures.snapshot().get("1", {}).get("requests", 0) == 0


def test_a_request_for_one_output_is_compared_on_that_output_only(
    canary: tuple[ModelService, Repository, dict[str, Any]],
) -> None:
    service, _, models = canary
    agree = X[models["1"].predict(X) == models["2"].predict(X)][:10]
    for row in agree:
        assert _ask(service, row, ["predict"]) == "2"
    figures = wait_for(
        lambda: (f := service.figures.snapshot().get("2", {})).get("compared") == len(agree) and f,
        what="the comparisons",
    )
    assert figures["disagreed"] == 0


def test_no_check_with_a_fraction_of_0_and_none_once_the_canary_is_promoted(
    tmp_path: Path, published: Any
) -> None:
    repo, root, _ = published
    service = _service(tmp_path, root, canary_check_fraction=0.0)
    try:
        repo.move_alias("iris", "production", SetCanary("2", 100))
        _tick(service)
        assert {_ask(service, row) for row in X[:20]} == {"2"}
        assert service.figures.snapshot()["2"]["compared"] == 0
    finally:
        service.close()
    service = _service(tmp_path / "again", root)
    try:
        repo.move_alias("iris", "production", Promote())
        _tick(service)
        assert service.slot.version == "2"
        # NOTE: a check still queued for the canary when it was promoted has nothing to compare with.
        service.canary_check.offer("2", {"input-0": X[:1]}, {"predict": np.array([0])})
        service.canary_check.close()
        assert service.figures.snapshot().get("2", {}).get("compared", 0) == 0
    finally:
        service.close()
