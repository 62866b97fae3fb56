"""The same app on every transport: the standalone ASGI server (a real process) and Ray Serve
in both layouts (single-hop, the default; two-hop, an ingress before per-model deployments).

``served`` is package-scoped and parametrized over the transports, so every test
of the conformance suite (REST in test_conformance.py, OIP over gRPC in
test_grpc.py, against the same servers) runs once per transport against a fresh
S3 bucket (moto on loopback) holding the same models. The app follows aliases only when
asked (``poll_interval_s`` is an hour), so every swap in these tests is a load
request's doing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import pytest
import yaml
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from serving.manifest import TensorSpec
from serving.publish import publish_path
from serving.repository import Repository, SetTarget
from serving.settings import Settings
from serving.store import open_store
from serving.testing import MotoS3, free_port
from serving.testing.models import FailsOn
from serving.testing.poll import wait_for
from serving.testing.process import stop_process

ROW = [[5.1, 3.5, 1.4, 0.2]]
MAX_BODY = 512 * 1024
BODY_TIMEOUT_S = 1.0
ADMIN_TOKEN = "conformance-admin-token"
OUTPUTS = [
    TensorSpec(name="predict", datatype="INT64", shape=[-1]),
    TensorSpec(name="predict_proba", datatype="FP64", shape=[-1, 3]),
]
MODELS = ("iris", "ints", "lazy", "flaky", "swap", "batch", "boom")
BOOM_VALUE = 666.0
"""An input value the ``boom`` model answers with an unexpected RuntimeError."""


@dataclass
class Served:
    """One transport serving the conformance app."""

    transport: str
    base: str
    grpc: str
    """The OIP gRPC address, ``host:port``."""
    repo: Repository
    s3: MotoS3
    bucket: str
    work: Path
    published: dict[str, Path] = field(default_factory=dict)
    boom_marker: str = ""
    """The message of the ``boom`` model's RuntimeError (unique to this store)."""
    logs: Callable[[], list[Path]] = field(default=lambda: [])
    """The server's log files (all of the Ray session's, for Ray)."""

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def load(self, client: httpx.Client, model: str) -> httpx.Response:
        return client.post(f"{self.base}/v2/repository/models/{model}/load", headers=self.auth())

    def publish(self, name: str, version: str, c: float = 1.0, *, ints: bool = False) -> None:
        x, y = load_iris(return_X_y=True)
        if ints:
            x = np.round(x).astype(np.int64)
        path = self.work / f"{name}-{version}-{uuid.uuid4().hex[:6]}.joblib"
        joblib.dump(LogisticRegression(max_iter=300, C=c).fit(x, y), path)
        datatype = "INT64" if ints else "FP64"
        publish_path(
            self.repo,
            path,
            name,
            version=version,
            format="sklearn",
            inputs=[TensorSpec(name="input-0", datatype=datatype, shape=[-1, 4])],
            outputs=OUTPUTS,
            example=[[5, 3, 1, 0]] if ints else ROW,
        )

    def model_key(self, name: str, version: str) -> str:
        """The S3 key (without the bucket) of a version's model file."""
        listing = self.s3.client().list_objects_v2(
            Bucket=self.bucket, Prefix=f"models/{name}/versions/{version}/"
        )
        return next(o["Key"] for o in listing["Contents"] if o["Key"].endswith(".joblib"))


def s3_env(server: MotoS3) -> dict[str, str]:
    return {
        **server.env(),
        "SERVING_S3_ADDRESSING_STYLE": "path",
        "SERVING_S3_CONNECT_TIMEOUT": "0.5",
        "SERVING_S3_READ_TIMEOUT": "2",
        "SERVING_S3_MAX_ATTEMPTS": "1",
    }


def _store(s3: MotoS3, work: Path, monkeypatch: pytest.MonkeyPatch) -> Served:
    bucket = f"conf-{uuid.uuid4().hex[:10]}"
    s3.client().create_bucket(Bucket=bucket)
    for key, value in s3_env(s3).items():
        monkeypatch.setenv(key, value)
    uri = f"s3://{bucket}/models"
    repo = Repository(open_store(uri, Settings(s3_addressing_style="path")))
    served = Served("", "", "", repo, s3, bucket, work)
    for name in MODELS[:-1]:
        served.publish(name, "1", ints=name == "ints")
        repo.move_alias(name, "production", SetTarget("1"))
    served.boom_marker = f"boom-{uuid.uuid4().hex}"
    path = work / "boom.joblib"
    joblib.dump(FailsOn(BOOM_VALUE, served.boom_marker), path)
    publish_path(
        repo,
        path,
        "boom",
        version="1",
        format="sklearn",
        inputs=[TensorSpec(name="input-0", datatype="FP64", shape=[-1, 4])],
        outputs=[TensorSpec(name="predict", datatype="INT64", shape=[-1])],
        example=ROW,
    )
    repo.move_alias("boom", "production", SetTarget("1"))
    served.publish("iris", "2", c=0.01)
    served.publish("iris", "3", c=0.3)
    served.publish("swap", "2", c=0.01)
    served.publish("flaky", "2", c=0.7)
    # NOTE: same size, one byte flipped: the digest check refuses flaky v2 on every try.
    key = served.model_key("flaky", "2")
    data = bytearray(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    s3.client().put_object(Bucket=bucket, Key=key, Body=bytes(data))
    return served


def app_args(served: Served, env: dict[str, str]) -> dict[str, Any]:
    models: list[dict[str, Any]] = [{"name": n, "alias": "production"} for n in MODELS]
    models[-1]["batching"] = {"enabled": True, "max_batch_size": 8, "batch_wait_timeout_s": 0.05}
    return {
        "store": f"s3://{served.bucket}/models",
        "models": models,
        "poll_interval_s": 3600,
        "poll_jitter": 0,
        "retry_backoff_max_s": 60,
        "cache_dir": str(served.work / f"cache-{uuid.uuid4().hex[:6]}"),
        "max_body_bytes": MAX_BODY,
        "body_timeout_s": BODY_TIMEOUT_S,
        "ingress": {"ray_actor_options": {"num_cpus": 0.2, "runtime_env": {"env_vars": env}}},
    }


def _standalone(served: Served, args: dict[str, Any], env: dict[str, str]) -> Iterator[tuple[str, str]]:
    port, metrics_port, grpc_port = free_port(), free_port(), free_port()
    args = {k: v for k, v in args.items() if k != "ingress"}
    config = served.work / f"standalone-{port}.yaml"
    config.write_text(yaml.safe_dump(args))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SERVING_", "AWS_"))}
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--standalone", "--config", str(config)]
    cmd += ["--port", str(port), "--metrics-port", str(metrics_port), "--grpc-port", str(grpc_port)]
    log = served.work / f"standalone-{port}.log"
    served.logs = lambda: [log]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**clean, **env})
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        return httpx.get(base + "/v2/health/ready", timeout=2).status_code == 200

    try:
        # NOTE: seven isolated first loads; on a loaded 2-core machine that can take a minute or more.
        wait_for(ready, timeout=120, what="the standalone server to be ready")
        yield base, f"127.0.0.1:{grpc_port}"
    finally:
        stop_process(proc)


def _ray(served: Served, cluster: Any, args: dict[str, Any], layout: str) -> Iterator[tuple[str, str]]:
    import ray
    from ray import serve

    from serving.server.ray.app import build_app, delete_app

    for other in list(serve.status().applications):
        delete_app(other)
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    served.logs = lambda: sorted((session / "logs").rglob("*.err"))
    # NOTE: an app name per layout: each gets its own board.
    name = f"conformance-{layout}"
    serve.run(build_app({**args, "layout": layout}), name=name, route_prefix="/", blocking=False)
    try:
        wait_for(
            lambda: httpx.get(cluster.http + "/v2/health/ready", timeout=5).status_code == 200,
            timeout=120,
            what="the Ray app to be ready",
        )
        yield cluster.http, cluster.grpc
    finally:
        delete_app(name)


@pytest.fixture(
    scope="package",
    params=[
        "standalone",
        pytest.param("ray", marks=[pytest.mark.ray, pytest.mark.slow]),
        pytest.param("ray-two-hop", marks=[pytest.mark.ray, pytest.mark.slow]),
    ],
)
def served(
    request: pytest.FixtureRequest, moto_s3: MotoS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    cluster = None
    if request.param.startswith("ray"):
        pytest.importorskip("ray.serve")
        # NOTE: before the environment is patched: Ray's processes would inherit it.
        cluster = request.getfixturevalue("cluster")
    if not moto_s3.running:
        moto_s3.start()
    with pytest.MonkeyPatch.context() as monkeypatch:
        served = _store(moto_s3, tmp_path_factory.mktemp(f"conformance-{request.param}"), monkeypatch)
        # NOTE: the token goes to the servers only, never into this process's environment.
        env = {
            **s3_env(moto_s3),
            "SERVING_ADMIN_TOKEN": ADMIN_TOKEN,
            "SERVING_TRUSTED_GLOBALS": '["serving.testing.models.FailsOn"]',
        }
        args = app_args(served, env)
        if request.param == "standalone":
            runner = _standalone(served, args, env)
        else:
            layout = "two-hop" if request.param == "ray-two-hop" else "single-hop"
            # NOTE: two-hop model replicas read the store; they need the env too.
            for model in args["models"]:
                model["ray_actor_options"] = {"num_cpus": 0.1, "runtime_env": {"env_vars": env}}
            runner = _ray(served, cluster, args, layout)
        for base, grpc in runner:
            served.transport, served.base, served.grpc = request.param, base, grpc
            yield served
