"""Helpers of the Ray Serve tests; the session's one Ray instance is ``cluster`` (tests/integration)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import joblib
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from serving.manifest import TensorSpec
from serving.publish import publish_path
from serving.repository import Repository
from serving.testing import MotoS3
from serving.testing.cluster import Cluster
from serving.testing.poll import wait_for

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

IRIS_ROW = [[5.1, 3.5, 1.4, 0.2]]


def iris_model(c: float) -> LogisticRegression:
    x, y = load_iris(return_X_y=True)
    return LogisticRegression(max_iter=300, C=c).fit(x, y)


IRIS_INPUTS = [TensorSpec(name="input-0", datatype="FP64", shape=[-1, 4])]
IRIS_OUTPUTS = [
    TensorSpec(name="predict", datatype="INT64", shape=[-1]),
    TensorSpec(name="predict_proba", datatype="FP64", shape=[-1, 3]),
]


def publish_iris(
    repo: Repository, tmp: Path, version: str, c: float = 1.0, example: Any = None, name: str = "iris"
) -> None:
    path = tmp / f"{name}-{version}-{uuid.uuid4().hex[:6]}.joblib"
    joblib.dump(iris_model(c), path)
    publish_path(
        repo,
        path,
        name,
        version=version,
        format="sklearn",
        inputs=IRIS_INPUTS,
        outputs=IRIS_OUTPUTS,
        example=IRIS_ROW if example is None else example,
        metadata={"C": c},
    )


def app_args(
    store: str, cache_dir: Path, env: dict[str, str], name: str = "iris", replicas: int = 1, **overrides: Any
) -> dict[str, Any]:
    """The default (single-hop) app: ``replicas`` replicas, each serving the model."""
    model = {"name": name, "alias": "production"}
    model.update(overrides.pop("model", {}))
    args = {
        "store": store,
        "models": [model],
        "poll_interval_s": 0.3,
        "poll_jitter": 0.1,
        "retry_backoff_max_s": 2.0,
        "cache_dir": str(cache_dir),
        "max_body_bytes": 64 * 1024,
        "ingress": {
            "num_replicas": replicas,
            "ray_actor_options": {"num_cpus": 0.1, "runtime_env": {"env_vars": env}},
        },
    }
    args.update(overrides)
    return args


def s3_env(server: MotoS3) -> dict[str, str]:
    """The replicas' environment: the moto server, and tests/integration on the path, so a
    version may name ``hostile_modules`` classes as a user's installed module."""
    return {
        **server.env(),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "SERVING_S3_ADDRESSING_STYLE": "path",
        "SERVING_S3_CONNECT_TIMEOUT": "0.5",
        "SERVING_S3_READ_TIMEOUT": "2",
        "SERVING_S3_MAX_ATTEMPTS": "1",
    }


def infer(
    client: httpx.Client, base: str, rows: Any = None, version: str | None = None, name: str = "iris"
) -> httpx.Response:
    rows = IRIS_ROW if rows is None else rows
    path = f"/v2/models/{name}/versions/{version}/infer" if version else f"/v2/models/{name}/infer"
    body = {"inputs": [{"name": "input-0", "shape": [len(rows), 4], "datatype": "FP64", "data": rows}]}
    return client.post(base + path, json=body)


@pytest.fixture
def deploy(cluster: Cluster) -> Iterator[Callable[[dict[str, Any]], str]]:
    """Run the app from args (replacing any app at ``/``); returns the HTTP base URL."""
    from serving.server.ray.app import build_app, delete_app

    names: list[str] = []

    def run(args: dict[str, Any]) -> str:
        # NOTE: one app owns "/" at a time; drop any left by a module-scoped fixture.
        for other in list(serve.status().applications):
            delete_app(other)
        name = f"app-{uuid.uuid4().hex[:6]}"
        serve.run(build_app(args), name=name, route_prefix="/", blocking=False)
        names.append(name)
        wait_for(
            lambda: httpx.get(cluster.http + "/v2/health/ready", timeout=5).status_code == 200,
            what="the app to become ready",
        )
        return cluster.http

    yield run
    for name in names:
        delete_app(name)


@pytest.fixture
def s3_bucket(moto_s3: MotoS3) -> tuple[MotoS3, str]:
    if not moto_s3.running:
        moto_s3.start()
    name = f"serve-{uuid.uuid4().hex[:10]}"
    moto_s3.client().create_bucket(Bucket=name)
    return moto_s3, name
