"""A client choosing random versions cannot grow a replica's state: metric series, locks, loads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import joblib
import orjson
import prometheus_client
import pytest
from rest_client import infer_v2
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from serving.config import AppConfig, ModelConfig
from serving.publish import publish_path
from serving.repository import Repository
from serving.runtime.service import ModelService
from serving.settings import Settings
from serving.store.local import LocalStore

ROW = [[5.1, 3.5, 1.4, 0.2]]


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ModelService]:
    x, y = load_iris(return_X_y=True)
    path = tmp_path / "iris.joblib"
    joblib.dump(LogisticRegression(max_iter=300).fit(x, y), path)
    store = str(tmp_path / "store")
    publish_path(Repository(LocalStore(store)), path, "bounded", version="1", example=ROW)
    app = AppConfig(models=[ModelConfig(name="bounded", version="1")])
    svc = ModelService(app.models[0], app, Settings(store=store, cache_dir=tmp_path / "cache"))
    svc.start()
    yield svc
    svc.slot.close()


def series(model: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    out = set()
    for family in prometheus_client.REGISTRY.collect():
        for sample in family.samples:
            if sample.labels.get("model") == model:
                out.add((sample.name, tuple(sorted(sample.labels.items()))))
    return out


def body() -> bytes:
    return orjson.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": ROW}]})


def test_a_thousand_random_explicit_versions_add_no_metric_series(service: ModelService) -> None:
    assert infer_v2(service, body(), "1").status == 200
    assert infer_v2(service, body(), "nope").status == 404  # the "other" series exists from here on
    before = series("bounded")
    for i in range(1000):
        reply = infer_v2(service, body(), f"random-{i}")
        assert reply.status == 404, reply.body
    assert series("bounded") == before
    assert service.resident.pending() == 0
    versions = {dict(labels)["version"] for _, labels in before if "version" in dict(labels)}
    assert versions <= {"1", "other"}
