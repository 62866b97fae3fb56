"""The single-hop app (ingress and model in one replica) answers like the two-hop app."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.repository import Repository
from serving.store import open_store

from .conftest import IRIS_ROW, app_args, infer, publish_iris, wait_for

pytestmark = pytest.mark.ray


def test_single_hop_serves_v2_v1_and_follows_the_alias(
    cluster: Any, tmp_path: Path, deploy: Callable[[dict[str, Any]], str]
) -> None:
    """One replica routes, predicts and swaps when the alias moves."""
    from ray import serve

    from serving.app import build_single_hop_app

    store = str(tmp_path / "store")
    repo = Repository(open_store(store))
    publish_iris(repo, tmp_path, "1")
    publish_iris(repo, tmp_path, "2", c=0.01)
    repo.set_alias("iris", "production", "1", by="test")
    args = app_args(store, tmp_path / "cache", {})
    serve.run(build_single_hop_app(args), name="one-hop", route_prefix="/one", blocking=False)
    base = cluster.http + "/one"
    try:
        wait_for(lambda: httpx.get(base + "/v2/health/ready", timeout=5).status_code == 200, what="ready")
        with httpx.Client(timeout=10) as client:
            first = infer(client, base)
            assert first.status_code == 200
            assert first.json()["model_version"] == "1"
            v1 = client.post(base + "/v1/models/iris:predict", json={"instances": IRIS_ROW})
            assert v1.status_code == 200
            assert v1.json()["predictions"] == [0]
            assert client.get(base + "/v2/models/nope").status_code == 404
            repo.set_alias("iris", "production", "2", by="test")
            wait_for(lambda: infer(client, base).json().get("model_version") == "2", what="the swap")
    finally:
        serve.delete("one-hop")
