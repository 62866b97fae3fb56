"""ModelService.infer_v2 with the binary tensor extension: a real store, a real sklearn model, no Ray."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import joblib
import numpy as np
import orjson
import pytest
from rest_client import infer_v2
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from serving.config import AppConfig, ModelConfig
from serving.protocol.rest import INFERENCE_HEADER
from serving.publish import publish_path
from serving.repository import Repository
from serving.runtime.service import ModelService
from serving.settings import Settings
from serving.store.local import LocalStore

ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]])


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ModelService]:
    x, y = load_iris(return_X_y=True)
    path = tmp_path / "iris.joblib"
    joblib.dump(LogisticRegression(max_iter=300).fit(x, y), path)
    store = str(tmp_path / "store")
    publish_path(Repository(LocalStore(store)), path, "iris", version="1", example=ROWS[:1].tolist())
    app = AppConfig(models=[ModelConfig(name="iris", version="1")], max_body_bytes=4096)
    svc = ModelService(app.models[0], app, Settings(store=store, cache_dir=tmp_path / "cache"))
    svc.start()
    yield svc
    svc.slot.close()


def binary_body(rows: np.ndarray, size: int | None = None) -> tuple[bytes, int]:
    raw = rows.astype("<f8").tobytes()
    tensor = {
        "name": "input-0",
        "shape": list(rows.shape),
        "datatype": "FP64",
        "parameters": {"binary_data_size": len(raw) if size is None else size},
    }
    head = orjson.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}})
    return head + raw, len(head)


def test_headers_select_the_binary_path_and_predictions_match_json(service: ModelService) -> None:
    """A lower-case header name in a plain dict works, and binary predictions equal JSON's."""
    tensor = {"name": "input-0", "shape": [2, 4], "datatype": "FP64", "data": ROWS.tolist()}
    as_json = infer_v2(service, orjson.dumps({"inputs": [tensor]}))
    assert as_json.status == 200, as_json.body
    want = {o["name"]: o["data"] for o in orjson.loads(as_json.body)["outputs"]}
    body, size = binary_body(ROWS)
    reply = infer_v2(service, body, headers={INFERENCE_HEADER.lower(): str(size)})
    assert reply.status == 200, reply.body
    assert reply.content_type == "application/octet-stream"
    head_size = int(reply.headers[INFERENCE_HEADER])
    head = orjson.loads(reply.body[:head_size])
    offset = head_size
    for out in head["outputs"]:
        k = out["parameters"]["binary_data_size"]
        dtype = {"INT64": "<i8", "FP64": "<f8"}[out["datatype"]]
        got = np.frombuffer(reply.body[offset : offset + k], dtype)
        assert got.tolist() == want[out["name"]]
        offset += k


def test_bad_binary_requests_answer_400_and_big_bodies_413(service: ModelService) -> None:
    body, size = binary_body(ROWS, size=12)
    wrong_size = infer_v2(service, body, headers={INFERENCE_HEADER: str(size)})
    assert wrong_size.status == 400
    assert b"binary_data_size" in wrong_size.body
    past_end = infer_v2(service, body, headers={INFERENCE_HEADER: str(len(body) + 1)})
    assert past_end.status == 400
    big, big_size = binary_body(np.zeros((200, 4)))
    assert len(big) > 4096
    assert infer_v2(service, big, headers={INFERENCE_HEADER: str(big_size)}).status == 413
