"""The OIP binary tensor extension over real HTTP through real Ray Serve."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from serving.repository import Repository
from serving.store import open_store

from .conftest import app_args, infer, publish_iris, wait_for

pytestmark = pytest.mark.ray

HEADER = "Inference-Header-Content-Length"
ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 2.8, 4.3, 1.3]])


def post_binary(client: httpx.Client, base: str, rows: np.ndarray, size: int | None = None) -> httpx.Response:
    raw = rows.astype("<f8").tobytes()
    tensor = {
        "name": "input-0",
        "shape": list(rows.shape),
        "datatype": "FP64",
        "parameters": {"binary_data_size": len(raw) if size is None else size},
    }
    head = orjson.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}})
    return client.post(
        base + "/v2/models/iris/infer",
        content=head + raw,
        headers={HEADER: str(len(head)), "content-type": "application/octet-stream"},
    )


def binary_outputs(resp: httpx.Response) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    size = int(resp.headers[HEADER])
    head = orjson.loads(resp.content[:size])
    offset, values = size, {}
    for out in head["outputs"]:
        k = out["parameters"]["binary_data_size"]
        dtype = {"INT64": "<i8", "FP64": "<f8"}[out["datatype"]]
        values[out["name"]] = np.frombuffer(resp.content[offset : offset + k], dtype).tolist()
        offset += k
    return head, values


def check_binary_matches_json(base: str) -> None:
    with httpx.Client(timeout=10) as client:
        as_json = infer(client, base, rows=ROWS.tolist())
        assert as_json.status_code == 200, as_json.text
        want = {o["name"]: o["data"] for o in as_json.json()["outputs"]}
        resp = post_binary(client, base, ROWS)
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"] == "application/octet-stream"
        head, got = binary_outputs(resp)
        assert head["model_version"] == "1"
        assert got == want
        bad = post_binary(client, base, ROWS, size=8)
        assert bad.status_code == 400
        assert "binary_data_size" in bad.json()["error"]


def test_a_binary_request_predicts_what_the_json_request_does(
    tmp_path: Path, deploy: Callable[[dict[str, Any]], str]
) -> None:
    """Through the two-hop app, binary in/out gives JSON's predictions; a bad size is a 400.

    Then Triton's own HTTP client (where installed) gets the same predictions.
    """
    store = str(tmp_path / "store")
    repo = Repository(open_store(store))
    publish_iris(repo, tmp_path, "1")
    repo.set_alias("iris", "production", "1", by="test")
    base = deploy(app_args(store, tmp_path / "cache", {}))
    check_binary_matches_json(base)
    triton = pytest.importorskip("tritonclient.http")
    client = triton.InferenceServerClient(base.removeprefix("http://"))
    x = triton.InferInput("input-0", list(ROWS.shape), "FP64")
    x.set_data_from_numpy(ROWS, binary_data=True)
    result = client.infer("iris", [x])
    assert result.as_numpy("predict").tolist() == [0, 2, 1]
    assert result.as_numpy("predict_proba").shape == (3, 3)
    client.close()


def test_binary_requests_work_single_hop_with_batching(cluster: Any, tmp_path: Path) -> None:
    """The single-hop app with @serve.batch on also reads and writes binary tensors."""
    from ray import serve

    from serving.app import build_single_hop_app

    store = str(tmp_path / "store")
    repo = Repository(open_store(store))
    publish_iris(repo, tmp_path, "1")
    repo.set_alias("iris", "production", "1", by="test")
    args = app_args(store, tmp_path / "cache", {}, model={"batching": {"enabled": True}})
    serve.run(build_single_hop_app(args), name="binary-one-hop", route_prefix="/bin", blocking=False)
    base = cluster.http + "/bin"
    try:
        wait_for(lambda: httpx.get(base + "/v2/health/ready", timeout=5).status_code == 200, what="ready")
        check_binary_matches_json(base)
    finally:
        serve.delete("binary-one-hop")
