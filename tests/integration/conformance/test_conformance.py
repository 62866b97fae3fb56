"""Every route, error case and the load/index protocol, against every transport.

The REST API (serving.server.rest) over one data plane holds every route once; this suite
checks that each transport adapter (``standalone``, ``ray``) serves it the same
way over real HTTP. See conftest.py for the app and the store.
"""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import orjson
import pytest

from serving.repository import SetTarget

from .conftest import ADMIN_TOKEN, BODY_TIMEOUT_S, BOOM_VALUE, MAX_BODY, ROW, Served, wait_for

HEADER = "Inference-Header-Content-Length"


def v2(shape: list[int], data: Any, datatype: str = "FP64") -> bytes:
    return orjson.dumps({"inputs": [{"name": "input-0", "shape": shape, "datatype": datatype, "data": data}]})


def infer(
    client: httpx.Client, base: str, name: str, version: str | None = None, rows: Any = None
) -> httpx.Response:
    rows = ROW if rows is None else rows
    path = f"/v2/models/{name}/versions/{version}/infer" if version else f"/v2/models/{name}/infer"
    return client.post(base + path, content=v2([len(rows), 4], rows))


def served_version(client: httpx.Client, served: Served, name: str) -> str:
    r = infer(client, served.base, name)
    assert r.status_code == 200, r.text
    return str(r.json()["model_version"])


def index_entry(client: httpx.Client, served: Served, name: str) -> dict[str, Any]:
    entries = client.get(served.base + "/v2/repository/index").json()
    return next(e for e in entries if e["name"] == name)


def raw_exchange(served: Served, head: bytes, parts: list[bytes], timeout: float) -> bytes:
    """Send a request head and body parts on a raw socket, leave it open, read the reply's status line."""
    url = urlsplit(served.base)
    with socket.create_connection((url.hostname, url.port), timeout=timeout) as sock:
        sock.sendall(head)
        for part in parts:
            sock.sendall(part)
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        return reply


# -- routes -----------------------------------------------------------------------------------
def test_v2_v1_and_explicit_versions_predict(served: Served) -> None:
    """v2 and v1 answer from the alias's version; an explicit version from itself."""
    with httpx.Client(timeout=20) as client:
        r = infer(client, served.base, "iris")
        assert r.status_code == 200, r.text
        doc = r.json()
        assert (doc["model_name"], doc["model_version"]) == ("iris", "1")
        outputs = {o["name"]: o for o in doc["outputs"]}
        assert outputs["predict"]["data"] == [0]
        assert outputs["predict_proba"]["shape"] == [1, 3]
        v1 = client.post(served.base + "/v1/models/iris:predict", json={"instances": ROW})
        assert v1.status_code == 200, v1.text
        assert v1.json() == {"predictions": [0], "model_version": "1"}
        explicit = infer(client, served.base, "iris", version="2")
        assert explicit.status_code == 200, explicit.text
        assert explicit.json()["model_version"] == "2"
        assert served_version(client, served, "iris") == "1"


def test_health_metadata_readiness_and_index(served: Served) -> None:
    with httpx.Client(timeout=20) as client:
        assert client.get(served.base + "/v2/health/live").json() == {"live": True}
        assert client.get(served.base + "/v2/health/ready").json() == {"ready": True}
        server = client.get(served.base + "/v2").json()
        assert server["name"] == "serving"
        assert {"model_repository", "binary_tensor_data"} <= set(server["extensions"])
        meta = client.get(served.base + "/v2/models/iris").json()
        assert meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]
        assert client.get(served.base + "/v2/models/iris/versions/2").json()["versions"] == ["2"]
        assert client.get(served.base + "/v2/models/iris/ready").json() == {"name": "iris", "ready": True}
        entries = {e["name"]: e for e in client.get(served.base + "/v2/repository/index").json()}
        assert set(entries) == {"iris", "ints", "lazy", "flaky", "swap", "batch", "boom"}
        iris = entries["iris"]
        assert (iris["state"], iris["converged"], iris["version"]) == ("READY", True, "1")
        assert [r["live_version"] for r in iris["replicas"]] == ["1"]


def test_the_probe_kuberay_injects_into_ray_pods_passes(served: Served) -> None:
    """KubeRay's readiness probe on a Serve pod: ``wget -O- localhost:8000/-/healthz | grep success``.

    The chart leaves the Ray containers' probes to KubeRay; behind HAProxy it is
    HAProxy that answers, and only while it has a replica up.
    """
    if not served.transport.startswith("ray"):
        pytest.skip("the standalone server is probed on /v2/health/ready")
    resp = httpx.get(served.base + "/-/healthz", timeout=10)
    assert resp.status_code == 200
    assert "success" in resp.text


def test_binary_tensors_predict_what_json_does(served: Served) -> None:
    rows = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 2.8, 4.3, 1.3]])
    raw = rows.astype("<f8").tobytes()

    def post(size: int) -> httpx.Response:
        tensor = {
            "name": "input-0",
            "shape": list(rows.shape),
            "datatype": "FP64",
            "parameters": {"binary_data_size": size},
        }
        head = orjson.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}})
        return httpx.post(
            served.base + "/v2/models/iris/infer",
            content=head + raw,
            headers={HEADER: str(len(head)), "content-type": "application/octet-stream"},
            timeout=20,
        )

    with httpx.Client(timeout=20) as client:
        want = {
            o["name"]: o["data"]
            for o in infer(client, served.base, "iris", rows=rows.tolist()).json()["outputs"]
        }
    resp = post(len(raw))
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/octet-stream"
    n = int(resp.headers[HEADER])
    head, offset, got = orjson.loads(resp.content[:n]), n, {}
    for out in head["outputs"]:
        size = out["parameters"]["binary_data_size"]
        dtype = {"INT64": "<i8", "FP64": "<f8"}[out["datatype"]]
        got[out["name"]] = np.frombuffer(resp.content[offset : offset + size], dtype).tolist()
        offset += size
    assert got == want
    bad = post(8)
    assert bad.status_code == 400
    assert "binary_data_size" in bad.json()["error"]


# -- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path", "body", "status", "needle"),
    [
        ("POST", "/v2/models/nope/infer", v2([1, 4], ROW), 404, "not served here"),
        ("POST", "/v2/models/iris/infer", b"{not json", 400, "malformed JSON"),
        ("POST", "/v2/models/iris/infer", b'{"inputs": []}', 400, "non-empty"),
        ("POST", "/v2/models/iris/infer", v2([1, 3], [[1.0, 2.0, 3.0]]), 400, "shape"),
        ("POST", "/v2/models/iris/infer", v2([1, 4], [1, 2, 3]), 400, "fill shape"),
        ("POST", "/v2/models/iris/infer", v2([1, 4], ["a", "b", "c", "d"], "BYTES"), 400, "datatype"),
        ("POST", "/v2/models/iris/infer", v2([1, 4], ROW, "FP1024"), 400, "unknown datatype"),
        ("POST", "/v2/models/iris/versions/99/infer", v2([1, 4], ROW), 404, "99"),
        ("POST", "/v2/models/iris/infer", b"x" * (MAX_BODY + 1), 413, "limit"),
        ("POST", "/v1/models/iris:predict", b'{"instances": 3}', 400, "instances"),
        ("POST", "/v1/models/ints:predict", b'{"instances": [[9223372036854775808, 1, 1, 1]]}', 400, "INT64"),
        ("POST", "/v2/models/ints/infer", v2([1, 4], [[2**63, 1, 1, 1]], "INT64"), 400, "INT64"),
        ("GET", "/v2/models/iris/infer", None, 405, "not allowed"),
        ("GET", "/v3/nothing", None, 404, "no route"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(
    served: Served, method: str, path: str, body: bytes | None, status: int, needle: str
) -> None:
    r = httpx.request(method, served.base + path, content=body, timeout=20)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_an_unexpected_error_is_a_500_logged_once_with_its_traceback(served: Served) -> None:
    """No details in the reply; one log record (one JSON line) with the traceback; still serving."""

    def logged() -> list[str]:
        lines = []
        for path in served.logs():
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            lines += [ln for ln in text.splitlines() if served.boom_marker in ln]
        return lines

    # NOTE: the servers are shared with test_grpc.py, whose own boom request may have logged.
    before = len(logged())
    with httpx.Client(timeout=20) as client:
        r = infer(client, served.base, "boom", rows=[[BOOM_VALUE, 1.0, 1.0, 1.0]])
        assert r.status_code == 500, r.text
        assert r.json() == {"error": "internal error: RuntimeError"}
        lines = wait_for(lambda: logged()[before:], what="the error in the server's log")
        (line,) = lines
        # NOTE: the model runs in its model worker; the serving process logs what it sent back.
        assert '"logger": "serving.isolation.worker"' in line
        assert "Traceback" in line
        assert served_version(client, served, "boom") == "1"
    assert len(logged()) == before + 1


def test_a_chunked_body_is_refused_once_it_passes_the_limit(served: Served) -> None:
    """The 413 comes while the body is still arriving: it is never buffered whole."""
    url = urlsplit(served.base)
    head = (
        f"POST /v2/models/iris/infer HTTP/1.1\r\nHost: {url.hostname}\r\n"
        "Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
    ).encode()
    chunk = b"x" * 16384
    parts = [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"] * (MAX_BODY // len(chunk) + 2)
    # NOTE: no terminating 0-length chunk: a server that waited for the whole body would never answer.
    status_line = raw_exchange(served, head, parts, timeout=15)
    assert status_line.startswith(b"HTTP/1.1 413"), status_line[:200]


def test_a_body_that_stops_arriving_gets_408(served: Served) -> None:
    url = urlsplit(served.base)
    head = (
        f"POST /v2/models/iris/infer HTTP/1.1\r\nHost: {url.hostname}\r\n"
        "Content-Length: 1000\r\nContent-Type: application/json\r\n\r\n"
    ).encode()
    started = time.monotonic()
    status_line = raw_exchange(served, head, [b'{"inputs": ['], timeout=BODY_TIMEOUT_S + 15)
    assert status_line.startswith(b"HTTP/1.1 408"), status_line[:200]
    assert time.monotonic() - started >= BODY_TIMEOUT_S * 0.9


# -- load requests ------------------------------------------------------------------------------
def test_load_requires_the_admin_token(served: Served) -> None:
    with httpx.Client(timeout=40) as client:
        url = served.base + "/v2/repository/models/iris/load"
        missing = client.post(url)
        assert missing.status_code == 401
        assert "Bearer" in missing.json()["error"]
        wrong = client.post(url, headers={"Authorization": "Bearer not-" + ADMIN_TOKEN})
        assert wrong.status_code == 403
        assert client.post(url, headers=served.auth()).status_code == 200
        assert served.load(client, "nope").status_code == 404


def test_a_load_request_checks_the_alias_at_once(served: Served) -> None:
    with httpx.Client(timeout=40) as client:
        served.publish("lazy", "2", c=0.05)
        served.repo.move_alias("lazy", "production", SetTarget("2"))
        assert served_version(client, served, "lazy") == "1"  # the next poll is an hour away
        r = served.load(client, "lazy")
        assert r.status_code == 200, r.text
        assert r.json()["converged"]
        assert [rep["live_version"] for rep in r.json()["replicas"]] == ["2"]
        assert served_version(client, served, "lazy") == "2"


def test_flooding_load_never_bypasses_the_backoff(served: Served) -> None:
    """60 concurrent load requests against a failing version: it is downloaded at most twice,
    and the alias is read far fewer times than checks were asked for (one check in flight,
    one queued; without that, every request costs a read)."""
    s3, key = served.s3, served.model_key("flaky", "2")
    alias_key = "models/flaky/aliases/production.json"
    flood = 60
    with httpx.Client(timeout=40) as client:
        served.repo.move_alias("flaky", "production", SetTarget("2"))
        first = served.load(client, "flaky")
        assert first.status_code == 200, first.text
        assert first.json()["replicas"][0]["failed_version"] == "2"
        s3.reset_counts()
        with concurrent.futures.ThreadPoolExecutor(30) as pool:
            replies = list(pool.map(lambda _: served.load(client, "flaky").status_code, range(flood)))
        assert set(replies) == {200}
        downloads = s3.count("GET", bucket=served.bucket, key=key)
        reads = s3.count("GET", bucket=served.bucket, key=alias_key)
        assert downloads <= 2, downloads
        assert 1 <= reads <= flood // 3, reads
        assert served_version(client, served, "flaky") == "1"


def test_loading_an_explicit_version_does_not_stall_the_live_one(served: Served) -> None:
    """While v3's download hangs, requests for the live version keep being answered at once."""
    key = served.model_key("iris", "3")
    with httpx.Client(timeout=20) as client, served.s3.stall(key, after_bytes=0):
        slow: list[httpx.Response] = []

        def ask_v3() -> None:
            # NOTE: its own client, closed here: a leaked one is closed by the GC at a random
            # point of a later test.
            with httpx.Client(timeout=30) as own:
                slow.append(infer(own, served.base, "iris", "3"))

        thread = threading.Thread(target=ask_v3)
        thread.start()
        try:
            wait_for(lambda: served.s3.count("GET", bucket=served.bucket, key=key) >= 1, what="v3's download")
            for _ in range(5):
                started = time.monotonic()
                assert served_version(client, served, "iris") == "1"
                assert time.monotonic() - started < 1.0
        finally:
            thread.join(timeout=30)
    assert slow, "the explicit-version request never finished"
    # NOTE: the hung download ends in an error reply (its status is the store layer's business).
    assert "error" in slow[0].json()


def test_a_swap_under_load_fails_no_request(served: Served) -> None:
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(timeout=20) as client:
            while not stop.is_set():
                r = infer(client, served.base, "swap")
                results.append(
                    (r.status_code, r.json().get("model_version") if r.status_code == 200 else None)
                )

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) > 20, what="traffic on v1")
        with httpx.Client(timeout=40) as client:
            for version in ("2", "1"):
                served.repo.move_alias("swap", "production", SetTarget(version))
                assert served.load(client, "swap").status_code == 200
                count = len(results)
                wait_for(lambda c=count: len(results) > c + 20, what="traffic after the swap")
                assert {v for _, v in results[-10:]} == {version}
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert [r for r in results if r[0] != 200] == []


# -- batching ---------------------------------------------------------------------------------
def test_one_bad_request_in_a_batch_fails_only_itself(served: Served) -> None:
    """Concurrent requests, a few carrying NaN (the model refuses it): the others still succeed."""
    rows = {0: [[5.1, 3.5, 1.4, 0.2]], 2: [[7.7, 3.0, 6.1, 2.3]] * 2}

    def one(i: int) -> tuple[int, int, Any]:
        label = i % 3
        with httpx.Client(timeout=30) as client:
            if label == 1:
                # NOTE: JSON has no NaN; binary tensor data does, and the model refuses it.
                raw = np.array([[np.nan, 1.0, 1.0, 1.0]], dtype="<f8").tobytes()
                tensor = {"name": "input-0", "shape": [1, 4], "datatype": "FP64"}
                head = orjson.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}]})
                r = client.post(
                    served.base + "/v2/models/batch/infer",
                    content=head + raw,
                    headers={HEADER: str(len(head))},
                )
            else:
                r = infer(client, served.base, "batch", rows=rows[label])
            predict = next((o["data"] for o in r.json().get("outputs", []) if o["name"] == "predict"), None)
            return label, r.status_code, predict

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(24)))
    for label, status, predicted in results:
        if label == 1:
            assert status == 400
        else:
            assert status == 200
            assert predicted == [label] * len(rows[label])
