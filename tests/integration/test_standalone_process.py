"""What only the standalone process does: alias polling in-process, retries of a model that
does not load yet, prometheus_client metrics, ``--workers N``, and surviving every class of
crafted version (the Ray path's twin is in serve/test_serve.py).

Routes, errors and the load/index protocol are checked on every transport by
tests/integration/conformance; this file holds what the Ray path does differently.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import joblib
import pytest
import yaml
from hostile_modules import CrashOnNegative, Hog, Sleepy, hostile_versions, point_alias_at_oversized_manifest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from serving.manifest import TensorSpec
from serving.publish import publish_path
from serving.repository import Repository, SetTarget
from serving.save import save
from serving.settings import Settings
from serving.store import open_store
from serving.testing import free_port
from serving.testing.poll import wait_for
from serving.testing.process import stop_process

ROW = [[5.1, 3.5, 1.4, 0.2]]
INPUTS = [TensorSpec(name="input-0", datatype="FP64", shape=[-1, 4])]
OUTPUTS = [
    TensorSpec(name="predict", datatype="INT64", shape=[-1]),
    TensorSpec(name="predict_proba", datatype="FP64", shape=[-1, 3]),
]
MAX_BODY = 64 * 1024
RESTART_WAIT_S = 30.0
"""How long a restarted model worker may take to answer again: a worker start imports
scikit-learn, seconds on a loaded 2-core CI machine (CI once took more than 10 s)."""


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
        stop_process(self.proc)


def start_server(
    work: Path,
    store: str,
    models: list[str | dict[str, Any]],
    *,
    poll_s: float,
    extra: tuple[str, ...] = (),
    env_extra: dict[str, str] | None = None,
    app_extra: dict[str, Any] | None = None,
) -> Server:
    port, metrics_port = free_port(), free_port()
    config = work / f"app-{port}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "store": store,
                "models": [{"name": m} if isinstance(m, str) else m for m in models],
                "poll_interval_s": poll_s,
                "poll_jitter": 0.1,
                "retry_backoff_max_s": 1.0,
                "cache_dir": str(work / "cache"),
                "max_body_bytes": MAX_BODY,
                **(app_extra or {}),
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SERVING_", "AWS_"))}
    # NOTE: versions may name hostile_modules classes, as a user's installed module.
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent)
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "serving.cli", "--store", store, "serve", "--standalone"]
    cmd += ["--config", str(config), "--port", str(port), "--metrics-port", str(metrics_port)]
    # NOTE: gRPC off: the default port (8001) is one per machine; test_grpc.py covers gRPC.
    cmd += ["--grpc-port", "0", *extra]
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
    for name in ("counted", "multi", "hostile"):
        publish(repo, work, name, "1")
        repo.move_alias(name, "production", SetTarget("1"))
    for i, (path, fmt, kwargs) in enumerate(hostile_versions(work).values(), start=2):
        publish_path(repo, path, "hostile", version=str(i), format=fmt, **kwargs)
    # NOTE: v99's manifest is padded past the cap when the test points the alias at it.
    publish(repo, work, "hostile", "99")
    return uri, repo, work


@pytest.fixture(scope="module")
def server(store: tuple[str, Repository, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Polls the alias every 0.2 s."""
    srv = start_server(tmp_path_factory.mktemp("fast"), store[0], ["counted", "hostile"], poll_s=0.2)
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
    srv = start_server(tmp_path_factory.mktemp("slow"), store[0], ["late"], poll_s=3600)
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
        repo.move_alias("late", "production", SetTarget("1"))
        r = client.post(slow_server.base + "/v2/repository/models/late/load")
        assert r.status_code == 200
        assert r.json()["replicas"][0]["live_version"] == "1"
        assert served(client, slow_server.base, "late") == "1"


def _v2(shape: list[int], data: Any, datatype: str = "FP64") -> bytes:
    import orjson

    return orjson.dumps({"inputs": [{"name": "input-0", "shape": shape, "datatype": datatype, "data": data}]})


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


def index_entry(client: httpx.Client, base: str, name: str) -> dict[str, Any]:
    entries = client.get(base + "/v2/repository/index").json()
    return next(e for e in entries if e["name"] == name)


HOSTILE_CASES = [
    "admitted-class gadget",
    "skops file read",
    "native crash",
    "kd-tree out of range",
    "sparse coef heap read",
    "vectorizer n-gram bomb",
    "xz bomb",
    "skops schema bomb",
    "torch init_kwargs bomb",
    "allocation bomb",
    "sparse external data",
    "keras Lambda over keras.ops.zeros",
    "ONNX constant-fold bomb",
    "oversized manifest",
]


@pytest.mark.parametrize("case", HOSTILE_CASES)
def test_every_crafted_version_fails_while_v1_answers_every_request(
    case: str, server: Server, store: tuple[str, Repository, Path]
) -> None:
    """The alias moves to a crafted version; the server answers 200 from v1 throughout, and says why."""
    _, repo, _ = store
    version = "99" if case == "oversized manifest" else str(HOSTILE_CASES.index(case) + 2)
    results: list[tuple[int, str | None]] = []
    answered = [0]
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    r = infer(client, server.base, "hostile")
                    got = (r.status_code, r.json().get("model_version") if r.status_code == 200 else None)
                except httpx.HTTPError as exc:
                    # NOTE: recorded, so the test fails saying why instead of losing its traffic
                    got = (0, repr(exc))
                answered[0] += 1
                # NOTE: every failure is kept; successes up to a bound (a slow failure must not stop traffic)
                if got != (200, "1") or len(results) < 5000:
                    results.append(got)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        with httpx.Client(timeout=10) as client:
            wait_for(lambda: answered[0] > 20, what="traffic on v1")
            if case == "oversized manifest":
                point_alias_at_oversized_manifest(repo, "hostile", version)
            else:
                repo.move_alias("hostile", "production", SetTarget(version))
            replica = wait_for(
                lambda: (
                    (r := index_entry(client, server.base, "hostile")["replicas"][0])["failed_version"]
                    == version
                    and r
                ),
                timeout=120,
                what=f"{case} to fail",
            )
            seen = answered[0]
            wait_for(lambda: answered[0] > seen + 20, what="traffic after the failure")
    finally:
        stop.set()
        for t in threads:
            t.join()
        repo.move_alias("hostile", "production", SetTarget("1"))
    assert server.proc.poll() is None
    assert replica["live_version"] == "1"
    assert replica["last_error"]
    print(f"\n{case}: {answered[0]} requests, all 200 from v1; refused with: {replica['last_error'][:160]}")
    failed = [r for r in results if r != (200, "1")]
    assert not failed, failed[:5]
    reason = {"native crash": "crash", "allocation bomb": "oom", "ONNX constant-fold bomb": "oom"}.get(case)
    if reason is not None:
        assert f"failed isolation ({reason})" in replica["last_error"]
        text = httpx.get(server.metrics, timeout=10).text
        assert f'serving_swap_failures_total{{model="hostile",reason="{reason}"}}' in text


# -- containment: a hostile request costs only its own model --------------------------------------
@pytest.fixture(scope="module")
def contained(
    store: tuple[str, Repository, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """``counted`` (iris) beside three models whose requests crash, hang or blow up their worker."""
    uri, repo, _ = store
    for name, module in (("crashy", CrashOnNegative()), ("sleepy", Sleepy()), ("hoggy", Hog())):
        save(module, name, version="1", store=repo, example=[[0.0, 1.0]], alias="production")
    models: list[str | dict[str, Any]] = [
        "counted",
        "crashy",
        {"name": "sleepy", "predict_timeout_s": 3},
        "hoggy",
    ]
    srv = start_server(tmp_path_factory.mktemp("contained"), uri, models, poll_s=1.0)
    wait_for(
        lambda: httpx.get(srv.base + "/v2/health/ready", timeout=2).status_code == 200,
        what="every model to load",
    )
    yield srv
    srv.stop()


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _ask(client: httpx.Client, base: str, name: str, first: float, **parameters: Any) -> httpx.Response:
    tensor = {"name": "input-0", "shape": [1, 2], "datatype": "FP32", "data": [first, 1.0]}
    body: dict[str, Any] = {"inputs": [tensor]}
    if parameters:
        body["parameters"] = parameters
    return client.post(f"{base}/v2/models/{name}/infer", json=body)


def test_a_crash_a_hang_and_a_memory_blow_up_cost_only_their_own_model(contained: Server) -> None:
    """Each hostile request gets a clear 5xx within its deadline; ``counted`` answers every one
    of a concurrent stream; the serving process's RSS grows by at most 50 MB."""
    results: list[int] = []
    stop = threading.Event()

    def stream() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                results.append(infer(client, contained.base, "counted").status_code)

    with httpx.Client(timeout=60) as client:
        for _ in range(20):
            assert infer(client, contained.base, "counted").status_code == 200
        before = _rss(contained.proc.pid)
        threads = [threading.Thread(target=stream) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            crash = _ask(client, contained.base, "crashy", -1.0)
            assert crash.status_code == 503, crash.text
            assert "SIGSEGV" in crash.json()["error"]
            started = time.monotonic()
            hang = _ask(client, contained.base, "sleepy", 600.0, timeout=1_000_000)
            assert hang.status_code == 504, hang.text
            assert time.monotonic() - started < 10
            wait_for(
                lambda: _ask(client, contained.base, "sleepy", 0.0).status_code == 200,
                timeout=RESTART_WAIT_S,
                what="sleepy's worker back",
            )
            started = time.monotonic()
            assert _ask(client, contained.base, "sleepy", 600.0).status_code == 504  # the model's 3 s
            assert time.monotonic() - started < 15
            oom = _ask(client, contained.base, "hoggy", 64.0)
            assert oom.status_code == 503, oom.text
            assert "memory" in oom.json()["error"]
            for name in ("crashy", "sleepy", "hoggy"):
                back = wait_for(
                    lambda name=name: _ask(client, contained.base, name, 0.0).status_code == 200,
                    timeout=RESTART_WAIT_S,
                    what=f"{name}'s worker back",
                )
                assert back
            seen = len(results)
            wait_for(lambda: len(results) > seen + 20, what="traffic after the failures")
        finally:
            stop.set()
            for t in threads:
                t.join()
        grown = _rss(contained.proc.pid) - before
    assert contained.proc.poll() is None
    assert len(results) > 50
    assert set(results) == {200}, {s: results.count(s) for s in set(results)}
    assert grown < 50 * 1024**2, f"RSS grew by {grown / 1024**2:.1f} MB"
    text = httpx.get(contained.metrics, timeout=10).text
    for model, reason in (("crashy", "crash"), ("sleepy", "timeout"), ("hoggy", "oom")):
        assert f'serving_worker_failures_total{{model="{model}",reason="{reason}"}}' in text


def test_a_crash_in_a_shared_worker_costs_its_neighbour_a_restart_and_no_other_model_anything(
    store: tuple[str, Repository, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``workers: shared``: ``crashy2`` and ``twice`` share one worker beside ``counted`` in its own.
    A crashing request gets 503; ``twice`` is back within the restart wait; ``counted`` answers
    every request of a concurrent stream; the failure is counted under the crasher's name."""
    uri, repo, _ = store
    save(CrashOnNegative(), "crashy2", version="1", store=repo, example=[[0.0, 1.0]], alias="production")
    save(CrashOnNegative(), "twice", version="1", store=repo, example=[[0.0, 1.0]], alias="production")
    models: list[str | dict[str, Any]] = [
        "counted",
        {"name": "crashy2", "workers": "shared"},
        {"name": "twice", "workers": "shared"},
    ]
    srv = start_server(
        tmp_path_factory.mktemp("shared"), uri, models, poll_s=1.0, app_extra={"shared_workers": {"count": 1}}
    )
    try:
        wait_for(
            lambda: httpx.get(srv.base + "/v2/health/ready", timeout=2).status_code == 200,
            what="every model to load",
        )
        with httpx.Client(timeout=10) as client:
            workers = {
                n: index_entry(client, srv.base, n)["replicas"][0]["worker"] for n in ("crashy2", "twice")
            }
        assert workers["crashy2"]["pid"] == workers["twice"]["pid"]
        assert workers["twice"]["shared"] == "shared-0"
        results: list[int] = []
        stop = threading.Event()

        def stream() -> None:
            with httpx.Client(timeout=10) as client:
                while not stop.is_set():
                    results.append(infer(client, srv.base, "counted").status_code)

        thread = threading.Thread(target=stream)
        thread.start()
        try:
            with httpx.Client(timeout=60) as client:
                crash = _ask(client, srv.base, "crashy2", -1.0)
                assert crash.status_code == 503, crash.text
                assert "SIGSEGV" in crash.json()["error"]
                wait_for(
                    lambda: _ask(client, srv.base, "twice", 3.0).status_code == 200,
                    timeout=RESTART_WAIT_S,
                    what="twice back in its restarted worker",
                )
                assert _ask(client, srv.base, "twice", 3.0).json()["outputs"][0]["data"] == [6.0, 2.0]
                seen = len(results)
                wait_for(lambda: len(results) > seen + 20, what="traffic after the failure")
        finally:
            stop.set()
            thread.join()
        assert set(results) == {200}, {s: results.count(s) for s in set(results)}
        text = httpx.get(srv.metrics, timeout=10).text
        assert 'serving_worker_failures_total{model="crashy2",reason="crash"}' in text
        assert 'serving_worker_restarts_total{model="shared-0"}' in text
    finally:
        srv.stop()


# -- connections: idle ones never lock a real client out ------------------------------------------
def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _open(base: str, count: int, first: bytes = b"") -> list[socket.socket]:
    host, port = base.removeprefix("http://").split(":")
    socks = []
    for i in range(count):
        sock = socket.create_connection((host, int(port)))
        if first and i % 2:
            sock.sendall(first)
        socks.append(sock)
    return socks


_HALF_A_HEADER = b"POST /v2/models/counted/infer HTTP/1.1\r\nHost: x\r\n"


def test_idle_connections_past_the_limit_never_lock_out_a_real_client(
    store: tuple[str, Repository, Path], tmp_path: Path
) -> None:
    """Three times the connection limit in sockets that send nothing or half a header: a real
    client still gets its answer within 1 s, because new connections evict the longest idle."""
    uri, _, _ = store
    limits = {"SERVING_HTTP_MAX_CONNECTIONS": "40", "SERVING_HTTP_HEADER_TIMEOUT_S": "120"}
    srv = start_server(tmp_path, uri, ["counted"], poll_s=5.0, env_extra=limits)
    idle: list[socket.socket] = []
    try:
        wait_for(
            lambda: httpx.get(srv.base + "/v2/health/ready", timeout=2).status_code == 200,
            what="counted to load",
        )
        idle = _open(srv.base, 120, _HALF_A_HEADER)
        for _ in range(5):
            with httpx.Client(timeout=1.0) as client:
                assert infer(client, srv.base, "counted").status_code == 200
        for sock in idle:
            sock.setblocking(False)
        # NOTE: well before the 120 s header deadline, eviction alone closed them.
        wait_for(
            lambda: sum(_closed_by_server(s) for s in idle) >= 80,
            timeout=10,
            what="the oldest idle connections to be evicted",
        )
    finally:
        for sock in idle:
            sock.close()
        srv.stop()


def test_a_connection_that_never_finishes_its_headers_is_closed_at_the_deadline(
    store: tuple[str, Repository, Path], tmp_path: Path
) -> None:
    """Silent, half-a-header and one-byte-at-a-time (slowloris) connections are all closed."""
    uri, _, _ = store
    srv = start_server(
        tmp_path, uri, ["counted"], poll_s=5.0, env_extra={"SERVING_HTTP_HEADER_TIMEOUT_S": "2"}
    )
    idle = _open(srv.base, 10, _HALF_A_HEADER)
    slow = _open(srv.base, 1)[0]
    try:
        for sock in idle:
            sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 15
        while not _closed_after_send(slow, _HALF_A_HEADER[sent : sent + 1]):
            sent += 1
            assert time.monotonic() < deadline, "a one-byte-a-second client was never closed"
            time.sleep(0.3)  # NOTE: the client's pace under test, not a wait for a result
        assert sent < len(_HALF_A_HEADER)
        wait_for(
            lambda: all(_closed_by_server(s) for s in idle), timeout=10, what="the idle connections closed"
        )
        with httpx.Client(timeout=5) as client:
            # NOTE: the model may still be loading (start_server waits for liveness only): 503 until it is
            wait_for(
                lambda: infer(client, srv.base, "counted").status_code == 200,
                what="a real request answered beside the closed connections",
            )
    finally:
        for sock in [*idle, slow]:
            sock.close()
        srv.stop()


def _closed_after_send(sock: socket.socket, byte: bytes) -> bool:
    try:
        sock.sendall(byte)
    except OSError:
        return True
    sock.setblocking(False)
    try:
        return _closed_by_server(sock)
    finally:
        sock.setblocking(True)


@pytest.mark.parametrize("standalone", [True, False], ids=["standalone", "ray"])
def test_an_empty_admin_token_refuses_to_start_with_the_reason(
    store: tuple[str, Repository, Path], standalone: bool
) -> None:
    """Before Ray or any socket starts: exit code and one line, not open admin routes."""
    uri, _, _ = store
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVING_")}
    env["SERVING_ADMIN_TOKEN"] = ""
    cmd = [sys.executable, "-m", "serving.cli", "--store", uri, "serve", "--model", "counted@production"]
    cmd += ["--port", str(free_port()), "--metrics-port", str(free_port()), "--grpc-port", "0"]
    done = subprocess.run(
        [*cmd, "--standalone"] if standalone else cmd, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "SERVING_ADMIN_TOKEN is set but empty" in done.stderr
    assert "Traceback" not in done.stderr


def test_without_an_admin_token_the_log_says_the_admin_routes_are_open(server: Server) -> None:
    text = server.log.read_text()
    assert "no SERVING_ADMIN_TOKEN: the admin routes (POST .../load) need no credentials" in text
