"""``serving serve --standalone``: the Ray-free server as a real process on loopback.

Each test uses its own model name, so the module-scoped servers are shared
without one test's alias moves or request counts reaching another's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import joblib
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from serving.manifest import TensorSpec
from serving.publish import publish_path
from serving.repository import Repository
from serving.settings import Settings
from serving.store import open_store
from serving.testing import free_port

ROW = [[5.1, 3.5, 1.4, 0.2]]
INPUTS = [TensorSpec(name="input-0", datatype="FP64", shape=[-1, 4])]
OUTPUTS = [
    TensorSpec(name="predict", datatype="INT64", shape=[-1]),
    TensorSpec(name="predict_proba", datatype="FP64", shape=[-1, 3]),
]
MAX_BODY = 64 * 1024


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except httpx.HTTPError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}: last={last!r}")


def publish(repo: Repository, tmp: Path, name: str, version: str, c: float = 1.0) -> Path:
    x, y = load_iris(return_X_y=True)
    path = tmp / f"{name}-{version}-{uuid.uuid4().hex[:6]}.joblib"
    joblib.dump(LogisticRegression(max_iter=300, C=c).fit(x, y), path)
    publish_path(
        repo, path, name, version=version, format="sklearn", inputs=INPUTS, outputs=OUTPUTS, example=ROW
    )
    return path


@dataclass
class Server:
    base: str
    metrics: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_server(
    work: Path, store: str, models: list[str], *, poll_s: float, extra: tuple[str, ...] = ()
) -> Server:
    port, metrics_port = free_port(), free_port()
    config = work / f"app-{port}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "store": store,
                "models": [{"name": m, "alias": "production"} for m in models],
                "poll_interval_s": poll_s,
                "poll_jitter": 0.1,
                "retry_backoff_max_s": 1.0,
                "cache_dir": str(work / "cache"),
                "max_body_bytes": MAX_BODY,
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SERVING_", "AWS_"))}
    cmd = [sys.executable, "-m", "serving.cli", "--store", store, "serve", "--standalone"]
    cmd += ["--config", str(config), "--port", str(port), "--metrics-port", str(metrics_port), *extra]
    log = work / f"server-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", proc, log)

    def live() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        return httpx.get(server.base + "/v2/health/live", timeout=2).status_code == 200

    try:
        wait_for(live, what="the server to answer")
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Repository, Path]:
    root = tmp_path_factory.mktemp("store")
    work = tmp_path_factory.mktemp("models")
    uri = str(root)
    repo = Repository(open_store(uri, Settings(store=uri)))
    for name in ("iris", "swap", "bad", "counted", "lazy", "multi"):
        publish(repo, work, name, "1")
        repo.set_alias(name, "production", "1")
    publish(repo, work, "iris", "2", c=0.01)
    publish(repo, work, "swap", "2", c=0.01)
    publish(repo, work, "bad", "2", c=0.7)
    publish(repo, work, "bad", "3", c=0.3)
    # NOTE: same size, one byte flipped: the digest check refuses v2.
    blob = next((root / "bad" / "versions" / "2").glob("*.joblib"))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    return uri, repo, work


@pytest.fixture(scope="module")
def server(store: tuple[str, Repository, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Polls the alias every 0.2 s."""
    srv = start_server(
        tmp_path_factory.mktemp("fast"), store[0], ["iris", "swap", "bad", "counted"], poll_s=0.2
    )
    wait_for(
        lambda: httpx.get(srv.base + "/v2/health/ready", timeout=2).status_code == 200,
        what="every model to load",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def slow_server(
    store: tuple[str, Repository, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """Checks the alias once an hour: anything sooner is a load request's doing."""
    srv = start_server(tmp_path_factory.mktemp("slow"), store[0], ["lazy", "late"], poll_s=3600)
    yield srv
    srv.stop()


def infer(client: httpx.Client, base: str, name: str, version: str | None = None) -> httpx.Response:
    path = f"/v2/models/{name}/versions/{version}/infer" if version else f"/v2/models/{name}/infer"
    body = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": ROW}]}
    return client.post(base + path, json=body)


def served(client: httpx.Client, base: str, name: str) -> str:
    r = infer(client, base, name)
    assert r.status_code == 200, r.text
    return str(r.json()["model_version"])


def index_entry(client: httpx.Client, base: str, name: str) -> dict[str, Any]:
    entries = client.get(base + "/v2/repository/index").json()
    return next(e for e in entries if e["name"] == name)


# -- tests ------------------------------------------------------------------------------------
def test_v2_and_v1_predict_with_the_alias_version(server: Server) -> None:
    with httpx.Client(timeout=10) as client:
        r = infer(client, server.base, "iris")
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["model_name"] == "iris"
        assert doc["model_version"] == "1"
        assert {o["name"] for o in doc["outputs"]} >= {"predict", "predict_proba"}
        assert next(o for o in doc["outputs"] if o["name"] == "predict")["data"] == [0]
        v1 = client.post(server.base + "/v1/models/iris:predict", json={"instances": ROW})
        assert v1.status_code == 200
        assert v1.json() == {"predictions": [0], "model_version": "1"}
        explicit = infer(client, server.base, "iris", version="2")
        assert explicit.status_code == 200
        assert explicit.json()["model_version"] == "2"
        assert served(client, server.base, "iris") == "1"


def test_metadata_readiness_and_index_describe_this_process(server: Server) -> None:
    with httpx.Client(timeout=10) as client:
        assert client.get(server.base + "/v2/health/live").json() == {"live": True}
        assert client.get(server.base + "/v2/health/ready").json() == {"ready": True}
        assert "model_repository" in client.get(server.base + "/v2").json()["extensions"]
        meta = client.get(server.base + "/v2/models/iris").json()
        assert meta["versions"] == ["1"]
        assert meta["inputs"][0]["name"] == "input-0"
        assert client.get(server.base + "/v2/models/iris/ready").json() == {"name": "iris", "ready": True}
        entry = index_entry(client, server.base, "iris")
        assert entry["state"] == "READY"
        assert entry["converged"]
        assert entry["version"] == "1"
        (replica,) = entry["replicas"]
        assert replica["replica"].endswith(f"-{server.proc.pid}")
        assert replica["live_version"] == "1"


def test_hot_swap_under_load_fails_no_request(server: Server, store: tuple[str, Repository, Path]) -> None:
    _, repo, _ = store
    results: list[tuple[float, int, str | None]] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                r = infer(client, server.base, "swap")
                version = r.json().get("model_version") if r.status_code == 200 else None
                results.append((time.monotonic(), r.status_code, version))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) > 20, what="traffic on v1")
        for version in ("2", "1"):
            repo.set_alias("swap", "production", version)
            moved = time.monotonic()
            wait_for(
                lambda v=version, m=moved: sum(1 for t, _, got in results if t > m and got == v) >= 20,
                what=f"traffic on v{version}",
            )
    finally:
        stop.set()
        for t in threads:
            t.join()
    failed = [r for r in results if r[1] != 200]
    assert not failed, failed[:5]
    assert {v for _, _, v in results} == {"1", "2"}
    assert results[-1][2] == "1"


def test_corrupt_version_keeps_the_old_one_serving(
    server: Server, store: tuple[str, Repository, Path]
) -> None:
    """A v2 whose bytes fail the digest check never serves; v3 then swaps in."""
    _, repo, _ = store
    with httpx.Client(timeout=10) as client:
        repo.set_alias("bad", "production", "2")
        wait_for(
            lambda: index_entry(client, server.base, "bad")["replicas"][0]["failed_version"] == "2",
            what="v2 to fail",
        )
        for _ in range(5):
            assert served(client, server.base, "bad") == "1"
        assert index_entry(client, server.base, "bad")["reason"] == "converging"
        repo.set_alias("bad", "production", "3")
        wait_for(lambda: served(client, server.base, "bad") == "3", what="v3 to serve")


def test_load_request_checks_the_alias_at_once(
    slow_server: Server, store: tuple[str, Repository, Path]
) -> None:
    _, repo, work = store
    with httpx.Client(timeout=40) as client:
        wait_for(
            lambda: client.get(slow_server.base + "/v2/models/lazy/ready").status_code == 200,
            what="lazy v1 to load",
        )
        publish(repo, work, "lazy", "2", c=0.05)
        repo.set_alias("lazy", "production", "2")
        assert served(client, slow_server.base, "lazy") == "1"  # the next poll is an hour away
        r = client.post(slow_server.base + "/v2/repository/models/lazy/load")
        assert r.status_code == 200, r.text
        assert r.json()["replicas"][0]["live_version"] == "2"
        assert r.json()["converged"]
        assert served(client, slow_server.base, "lazy") == "2"


def test_model_not_loadable_yet_is_live_not_ready_until_a_load_request(
    slow_server: Server, store: tuple[str, Repository, Path]
) -> None:
    """With no alias in the store, the server answers live, not ready, 503 on infer; /load retries."""
    _, repo, work = store
    with httpx.Client(timeout=40) as client:
        assert client.get(slow_server.base + "/v2/health/live").status_code == 200
        assert client.get(slow_server.base + "/v2/health/ready").status_code == 503
        assert client.get(slow_server.base + "/v2/models/late/ready").status_code == 503
        r = infer(client, slow_server.base, "late")
        assert r.status_code == 503
        assert "no version loaded" in r.json()["error"]
        publish(repo, work, "late", "1")
        repo.set_alias("late", "production", "1")
        r = client.post(slow_server.base + "/v2/repository/models/late/load")
        assert r.status_code == 200
        assert r.json()["replicas"][0]["live_version"] == "1"
        assert served(client, slow_server.base, "late") == "1"


def test_binary_tensors_pass_through(server: Server) -> None:
    """The binary tensor extension works as on the Ray path: header in, header and raw bytes out."""
    import numpy as np
    import orjson

    rows = np.array(ROW * 3, dtype="<f8")
    raw = rows.tobytes()
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input-0",
                    "shape": list(rows.shape),
                    "datatype": "FP64",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "predict", "parameters": {"binary_data": True}}],
        }
    )
    r = httpx.post(
        server.base + "/v2/models/iris/infer",
        content=head + raw,
        headers={"Inference-Header-Content-Length": str(len(head))},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    (out,) = orjson.loads(r.content[:n])["outputs"]
    assert out["parameters"]["binary_data_size"] == 3 * 8
    assert np.frombuffer(r.content[n:], "<i8").tolist() == [0, 0, 0]


def _v2(shape: list[int], data: Any, datatype: str = "FP64") -> bytes:
    import orjson

    return orjson.dumps({"inputs": [{"name": "input-0", "shape": shape, "datatype": datatype, "data": data}]})


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "needle"),
    [
        ("POST", "/v2/models/nope/infer", _v2([1, 4], ROW), 404, "not served here"),
        ("POST", "/v2/models/iris/infer", b"{not json", 400, "malformed JSON"),
        ("POST", "/v2/models/iris/infer", _v2([1, 3], [[1.0, 2.0, 3.0]]), 400, "shape"),
        ("POST", "/v2/models/iris/infer", _v2([1, 4], ROW, "FP1024"), 400, "unknown datatype"),
        ("POST", "/v2/models/iris/infer", b'{"inputs": []}', 400, "non-empty"),
        ("POST", "/v2/models/iris/versions/99/infer", _v2([1, 4], ROW), 404, "99"),
        ("POST", "/v1/models/iris:predict", b'{"instances": 3}', 400, "instances"),
        ("POST", "/v2/models/iris/infer", b"x" * (MAX_BODY + 1), 413, "limit"),
        ("GET", "/v2/models/iris/infer", None, 405, "not allowed"),
        ("GET", "/v3/nothing", None, 404, "no route"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(
    server: Server, method: str, path: str, body: bytes | None, status: int, needle: str
) -> None:
    r = httpx.request(method, server.base + path, content=body, timeout=10)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def _requests_total(metrics_url: str, model: str) -> dict[str, float]:
    text = httpx.get(metrics_url, timeout=10).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "serving_requests_total" and sample.labels["model"] == model:
                key = f"{sample.labels['version']}/{sample.labels['status']}"
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def test_metrics_count_what_was_sent(server: Server) -> None:
    """Names as in serving.metrics, without Ray's ray_ prefix."""
    with httpx.Client(timeout=10) as client:
        for _ in range(5):
            assert infer(client, server.base, "counted").status_code == 200
        for _ in range(3):
            r = client.post(server.base + "/v1/models/counted:predict", json={"instances": ROW})
            assert r.status_code == 200
        for _ in range(2):
            r = client.post(server.base + "/v2/models/counted/infer", content=b"{bad")
            assert r.status_code == 400
    assert _requests_total(server.metrics, "counted") == {"1/200": 8.0, "1/400": 2.0}
    names = {f.name for f in text_string_to_metric_families(httpx.get(server.metrics, timeout=10).text)}
    assert {"serving_request_duration_seconds", "serving_model_loads", "serving_alias_checks"} <= names


def _live_pids(metrics_url: str, model: str) -> set[str]:
    """Worker pids whose live-version gauge is 1 (multiprocess gauges carry a pid label)."""
    text = httpx.get(metrics_url, timeout=10).text
    return {
        s.labels["pid"]
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "serving_live_version_info" and s.labels.get("model") == model and s.value == 1
    }


def test_workers_share_the_cache_and_sum_their_metrics(
    store: tuple[str, Repository, Path], tmp_path: Path
) -> None:
    """With --workers 2, every request is answered and /metrics adds up both workers."""
    srv = start_server(tmp_path, store[0], ["multi"], poll_s=0.5, extra=("--workers", "2"))
    try:
        wait_for(lambda: len(_live_pids(srv.metrics, "multi")) == 2, what="both workers to load")
        # NOTE: a fresh connection per request, so both workers get some.
        for _ in range(20):
            r = httpx.post(srv.base + "/v2/models/multi/infer", content=_v2([1, 4], ROW), timeout=10)
            assert r.status_code == 200
            assert r.json()["model_version"] == "1"
        wait_for(
            lambda: _requests_total(srv.metrics, "multi").get("1/200") == 20.0,
            what="20 requests in the summed metrics",
        )
    finally:
        srv.stop()
