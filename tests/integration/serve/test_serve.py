"""What only the Ray path does, end to end: several replicas, Ray metrics, restarts, store outages.

Real Ray Serve (behind HAProxy, as the chart runs it), real HTTP, a real S3 server
on loopback. Routes, errors and the load/index protocol are checked on every
transport by tests/integration/conformance.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
from hostile_modules import hostile_versions, point_alias_at_oversized_manifest, segfault_version
from prometheus_client.parser import text_string_to_metric_families

from serving.publish import publish_path
from serving.repository import Repository, SetTarget
from serving.settings import Settings
from serving.store import open_store

from .conftest import Cluster, app_args, infer, publish_iris, s3_env, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]


def s3_repo(server: Any, bucket: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Repository, str]:
    for key, value in s3_env(server).items():
        monkeypatch.setenv(key, value)
    uri = f"s3://{bucket}/models"
    return Repository(open_store(uri, Settings(s3_addressing_style="path"))), uri


def served_version(client: httpx.Client, base: str, name: str = "iris") -> str | None:
    resp = infer(client, base, name=name)
    return resp.json()["model_version"] if resp.status_code == 200 else None


def test_hot_swap_under_load_fails_no_request(deploy, s3_bucket, tmp_path, monkeypatch) -> None:
    """A client sending continuously sees 0 failures while the alias moves; then only v2."""
    server, bucket = s3_bucket
    repo, uri = s3_repo(server, bucket, monkeypatch)
    publish_iris(repo, tmp_path, "1")
    publish_iris(repo, tmp_path, "2", c=0.5)
    repo.move_alias("iris", "production", SetTarget("1"))
    base = deploy(app_args(uri, tmp_path / "cache", s3_env(server), replicas=2))
    results: list[tuple[float, int, str | None]] = []
    stop = threading.Event()

    def client_loop() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set() and len(results) < 20_000:
                resp = infer(client, base)
                version = resp.json().get("model_version") if resp.status_code == 200 else None
                results.append((time.monotonic(), resp.status_code, version))

    thread = threading.Thread(target=client_loop)
    thread.start()
    try:
        wait_for(lambda: len(results) > 20, what="traffic on v1")
        moved_at = time.monotonic()
        repo.move_alias("iris", "production", SetTarget("2"))
        wait_for(
            lambda: any(v == "2" for _, _, v in results[-5:]) and all(v == "2" for _, _, v in results[-20:]),
            what="convergence on v2",
        )
        converged_at = next(t for t, _, v in results if t > moved_at and v == "2")
        count = len(results)
        wait_for(lambda: len(results) > count + 30, what="traffic after convergence")
    finally:
        stop.set()
        thread.join()
    failures = [r for r in results if r[1] != 200]
    assert failures == []
    last_v1 = max(t for t, _, v in results if v == "1")
    after = [v for t, _, v in results if t > last_v1]
    assert after
    assert set(after) == {"2"}
    print(
        f"\nswap: {len(results)} requests, 0 failed, first v2 after {converged_at - moved_at:.2f}s, "
        f"all replicas on v2 after {last_v1 - moved_at:.2f}s"
    )


def test_bad_version_keeps_the_old_one_serving_until_a_good_one(
    deploy, s3_bucket, tmp_path, monkeypatch, cluster: Cluster
) -> None:
    """A corrupt v3 and a v4 that fails warm-up never serve; v5 recovers."""
    server, bucket = s3_bucket
    repo, uri = s3_repo(server, bucket, monkeypatch)
    publish_iris(repo, tmp_path, "2", name="iris-bad")
    # NOTE: a different C, so v3's bytes differ from v2's (the cache would reuse v2's verified blob).
    publish_iris(repo, tmp_path, "3", name="iris-bad", c=0.7)
    publish_iris(repo, tmp_path, "4", name="iris-bad", example=[[1.0, 2.0]])  # wrong width: warm-up fails
    publish_iris(repo, tmp_path, "5", name="iris-bad", c=0.3)
    repo.move_alias("iris-bad", "production", SetTarget("2"))
    # Corrupt v3's model file in the bucket: same size, one byte flipped.
    s3 = server.client()
    key = next(
        o["Key"]
        for o in s3.list_objects_v2(Bucket=bucket, Prefix="models/iris-bad/versions/3/")["Contents"]
        if o["Key"].endswith(".joblib")
    )
    data = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    base = deploy(app_args(uri, tmp_path / "cache", s3_env(server), name="iris-bad"))
    with httpx.Client(timeout=10) as client:
        for bad in ("3", "4"):
            repo.move_alias("iris-bad", "production", SetTarget(bad))
            wait_for(
                lambda bad=bad: _index(client, base, "iris-bad")["replicas"][0]["failed_version"] == bad,
                what=f"v{bad} to fail",
            )
            for _ in range(5):
                assert served_version(client, base, "iris-bad") == "2"
        wait_for(
            lambda: _metric(cluster, "ray_serving_swap_failures_total", model="iris-bad") >= 2,
            what="failed swaps in metrics",
        )
        assert _metric(cluster, "ray_serving_model_loads_total", model="iris-bad", outcome="failure") >= 2
        repo.move_alias("iris-bad", "production", SetTarget("5"))
        wait_for(lambda: served_version(client, base, "iris-bad") == "5", what="recovery on v5")


def test_a_segfaulting_version_fails_isolation_and_a_new_replica_starts_on_the_last_good(
    deploy, s3_bucket, tmp_path, monkeypatch, cluster: Cluster
) -> None:
    """v2 kills its model worker, not the replica; a redeployed replica on v2 serves v1 and says so."""
    server, bucket = s3_bucket
    repo, uri = s3_repo(server, bucket, monkeypatch)
    publish_iris(repo, tmp_path, "1", name="iris-crash")
    crash, kwargs = segfault_version(tmp_path / "crash-2.pt")
    publish_path(repo, crash, "iris-crash", version="2", format="torch-state-dict", **kwargs)
    repo.move_alias("iris-crash", "production", SetTarget("1"))
    args = app_args(uri, tmp_path / "cache", s3_env(server), name="iris-crash")
    base = deploy(args)
    with httpx.Client(timeout=10) as client:
        repo.move_alias("iris-crash", "production", SetTarget("2"))
        wait_for(
            lambda: _index(client, base, "iris-crash")["replicas"][0]["failed_version"] == "2",
            what="v2 to fail isolation",
        )
        for _ in range(5):
            assert served_version(client, base, "iris-crash") == "1"
        wait_for(
            lambda: (
                _metric(cluster, "ray_serving_swap_failures_total", model="iris-crash", reason="crash") >= 1
            ),
            what="the crash in metrics",
        )
        base = deploy(args)  # a new replica, the alias still on v2
        (replica,) = _index(client, base, "iris-crash")["replicas"]
        assert replica["live_version"] == "1"
        assert replica["source"] == "last_good"
        assert replica["failed_version"] == "2"
        assert "failed isolation (crash)" in replica["last_error"]
        assert served_version(client, base, "iris-crash") == "1"


def test_every_crafted_version_fails_on_ray_while_v1_answers_every_request(
    deploy, s3_bucket, tmp_path, monkeypatch
) -> None:
    """Each class of crafted version, one after another, under a client loop: 0 failed requests."""
    server, bucket = s3_bucket
    repo, uri = s3_repo(server, bucket, monkeypatch)
    name = "iris-hostile"
    publish_iris(repo, tmp_path, "1", name=name)
    repo.move_alias(name, "production", SetTarget("1"))
    cases = hostile_versions(tmp_path)
    for i, (path, fmt, kwargs) in enumerate(cases.values(), start=2):
        publish_path(repo, path, name, version=str(i), format=fmt, **kwargs)
    publish_iris(repo, tmp_path, "99", name=name)
    base = deploy(app_args(uri, tmp_path / "cache", s3_env(server), name=name))
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set() and len(results) < 20_000:
                try:
                    r = infer(client, base, name=name)
                except httpx.HTTPError as exc:
                    # NOTE: recorded, so the test fails saying why instead of losing its traffic
                    results.append((0, repr(exc)))
                    continue
                results.append(
                    (r.status_code, r.json().get("model_version") if r.status_code == 200 else None)
                )

    thread = threading.Thread(target=hammer)
    thread.start()
    reasons = {}
    try:
        with httpx.Client(timeout=10) as client:
            for version, case in [*((str(i), c) for i, c in enumerate(cases, start=2)), ("99", "manifest")]:
                if version == "99":
                    point_alias_at_oversized_manifest(repo, name, version)
                else:
                    repo.move_alias(name, "production", SetTarget(version))
                replica = wait_for(
                    lambda v=version: (
                        (reps := _index(client, base, name)["replicas"])
                        and (r := reps[0])["failed_version"] == v
                        and r
                    ),
                    timeout=120,
                    what=f"{case} to fail",
                )
                reasons[case] = replica["last_error"]
                seen = len(results)
                wait_for(lambda s=seen: len(results) > s + 10, what=f"traffic after {case}")
    finally:
        stop.set()
        thread.join()
    print(f"\n{len(results)} requests over {len(reasons)} crafted versions; refusals: {reasons}")
    assert len(reasons) == len(cases) + 1
    failed = [r for r in results if r != (200, "1")]
    assert not failed, failed[:5]


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_a_crash_a_hang_and_a_memory_blow_up_cost_only_their_own_model_on_ray(
    deploy, s3_bucket, tmp_path, monkeypatch
) -> None:
    """The Ray path's replica runs no model code: each hostile request gets a clear 5xx within
    its deadline, iris answers every request of a concurrent stream, and the replica's RSS grows
    by at most 50 MB."""
    from hostile_modules import CrashOnNegative, Hog, Sleepy

    from serving.save import save

    server, bucket = s3_bucket
    repo, uri = s3_repo(server, bucket, monkeypatch)
    publish_iris(repo, tmp_path, "1", name="iris-beside")
    repo.move_alias("iris-beside", "production", SetTarget("1"))
    for name, module in (("crashy", CrashOnNegative()), ("sleepy", Sleepy()), ("hoggy", Hog())):
        save(module, name, version="1", store=repo, example=[[0.0, 1.0]], alias="production")
    args = app_args(uri, tmp_path / "cache", s3_env(server), name="iris-beside")
    args["models"] += [
        {"name": "crashy", "alias": "production"},
        {"name": "sleepy", "alias": "production", "predict_timeout_s": 3},
        {"name": "hoggy", "alias": "production"},
    ]
    base = deploy(args)

    def ask(client: httpx.Client, name: str, first: float) -> httpx.Response:
        tensor = {"name": "input-0", "shape": [1, 2], "datatype": "FP32", "data": [first, 1.0]}
        return client.post(f"{base}/v2/models/{name}/infer", json={"inputs": [tensor]})

    results: list[int] = []
    stop = threading.Event()

    def stream() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                results.append(infer(client, base, name="iris-beside").status_code)

    with httpx.Client(timeout=60) as client:
        worker_pid = _index(client, base, "crashy")["replicas"][0]["worker"]["pid"]
        replica = _parent(worker_pid)
        for _ in range(20):
            assert infer(client, base, name="iris-beside").status_code == 200
        before = _rss(replica)
        thread = threading.Thread(target=stream)
        thread.start()
        try:
            crash = ask(client, "crashy", -1.0)
            assert crash.status_code == 503, crash.text
            assert "SIGSEGV" in crash.json()["error"]
            started = time.monotonic()
            hang = ask(client, "sleepy", 600.0)
            assert hang.status_code == 504, hang.text
            assert time.monotonic() - started < 15
            oom = ask(client, "hoggy", 64.0)
            assert oom.status_code == 503, oom.text
            assert "memory" in oom.json()["error"]
            for name in ("crashy", "sleepy", "hoggy"):
                wait_for(
                    lambda name=name: ask(client, name, 0.0).status_code == 200,
                    timeout=30,
                    what=f"{name}'s worker back",
                )
            seen = len(results)
            wait_for(lambda: len(results) > seen + 20, what="traffic after the failures")
        finally:
            stop.set()
            thread.join()
        grown = _rss(replica) - before
    assert len(results) > 50
    assert set(results) == {200}, {s: results.count(s) for s in set(results)}
    assert grown < 50 * 1024**2, f"the replica's RSS grew by {grown / 1024**2:.1f} MB"


def test_silent_connections_are_closed_by_haproxy_and_never_delay_a_real_client(
    deploy, s3_bucket, tmp_path, monkeypatch
) -> None:
    """The chart's HAProxy settings (timeout client 10 s, not Ray's 3600): 300 connections that
    send nothing or half a header are answered 408 or closed, and a real client meanwhile gets
    its answer within 1 s."""
    import socket

    from serving.server.launch import FAST_PATH_ENV

    server, bucket = s3_bucket
    repo, uri = s3_repo(server, bucket, monkeypatch)
    publish_iris(repo, tmp_path, "1", name="iris-conn")
    repo.move_alias("iris-conn", "production", SetTarget("1"))
    base = deploy(app_args(uri, tmp_path / "cache", s3_env(server), name="iris-conn"))
    host, port = base.removeprefix("http://").split(":")
    silent = []
    try:
        for i in range(300):
            sock = socket.create_connection((host, int(port)))
            if i % 2:
                sock.sendall(b"POST /v2/models/iris-conn/infer HTTP/1.1\r\nHost: x\r\n")
            sock.setblocking(False)
            silent.append(sock)
        with httpx.Client(timeout=1.0) as client:
            for _ in range(5):
                assert infer(client, base, name="iris-conn").status_code == 200

        def ended(sock: socket.socket) -> bool:
            try:
                data = sock.recv(64)
            except BlockingIOError:
                return False
            except OSError:
                return True
            return data == b"" or data.startswith(b"HTTP/1.1 408")

        timeout_s = float(FAST_PATH_ENV["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"])
        left = list(silent)

        def all_ended() -> bool:
            # NOTE: a socket is read until it has ended, then left alone: reading each one again
            # at every poll drained a 408 reply 64 bytes at a time, socket after socket, and
            # could take longer than the deadline (it failed once in a full CI run).
            left[:] = [s for s in left if not ended(s)]
            return not left

        try:
            wait_for(all_ended, timeout=timeout_s + 10, what="HAProxy to end them")
        except AssertionError:
            raise AssertionError(
                f"{len(left)} of {len(silent)} silent connections still open after {timeout_s + 10:g} s"
            ) from None
    finally:
        for sock in silent:
            sock.close()


def test_store_outage_keeps_serving_and_counts_failed_checks(
    deploy, s3_bucket, tmp_path, monkeypatch, cluster: Cluster
) -> None:
    server, bucket = s3_bucket
    repo, uri = s3_repo(server, bucket, monkeypatch)
    publish_iris(repo, tmp_path, "1", name="iris-out")
    publish_iris(repo, tmp_path, "2", name="iris-out", c=0.5)
    repo.move_alias("iris-out", "production", SetTarget("1"))
    base = deploy(app_args(uri, tmp_path / "cache", s3_env(server), name="iris-out"))
    with httpx.Client(timeout=10) as client:
        server.stop()
        try:
            errors_before = _metric(
                cluster, "ray_serving_alias_checks_total", model="iris-out", outcome="error"
            )
            for _ in range(20):
                assert served_version(client, base, "iris-out") == "1"
            wait_for(
                lambda: (
                    _metric(cluster, "ray_serving_alias_checks_total", model="iris-out", outcome="error")
                    > errors_before + 1
                ),
                what="failed alias checks",
            )
        finally:
            server.start()
        repo.move_alias("iris-out", "production", SetTarget("2"))
        wait_for(lambda: served_version(client, base, "iris-out") == "2", what="v2 after the outage")


def test_cold_start_with_the_store_down_uses_the_warm_cache(deploy, s3_bucket, tmp_path, monkeypatch) -> None:
    server, bucket = s3_bucket
    repo, uri = s3_repo(server, bucket, monkeypatch)
    publish_iris(repo, tmp_path, "1", name="iris-cold")
    repo.move_alias("iris-cold", "production", SetTarget("1"))
    cache = tmp_path / "cache"
    args = app_args(uri, cache, s3_env(server), name="iris-cold")
    base = deploy(args)
    with httpx.Client(timeout=10) as client:
        assert served_version(client, base, "iris-cold") == "1"
        from ray import serve

        from serving.server.ray.app import delete_app

        for app_name in list(serve.status().applications):
            delete_app(app_name)
        server.stop()
        try:
            base = deploy(args)
            assert served_version(client, base, "iris-cold") == "1"
            replica = _index(client, base, "iris-cold")["replicas"][0]
            assert replica["source"] == "cache"
        finally:
            server.start()


def test_a_pinned_version_answers_a_load_request_at_once_and_stays_in_the_index(
    deploy, s3_bucket, tmp_path, monkeypatch
) -> None:
    """A pinned model has no alias to follow, yet its replica reports like any other."""
    server, bucket = s3_bucket
    repo, uri = s3_repo(server, bucket, monkeypatch)
    publish_iris(repo, tmp_path, "1", name="iris-pin")
    args = app_args(uri, tmp_path / "cache", s3_env(server), name="iris-pin", model={"version": "1"})
    args["models"][0].pop("alias")
    base = deploy(args)
    with httpx.Client(timeout=40) as client:
        loaded = client.post(base + "/v2/repository/models/iris-pin/load")
        # NOTE: before, nothing ever reported the request done: 202 after the 30 s wait.
        assert loaded.status_code == 200, loaded.text
        assert [r["live_version"] for r in _index(client, base, "iris-pin")["replicas"]] == ["1"]


def test_the_autoscaler_adds_a_replica_and_both_converge_downloading_once(
    deploy, s3_bucket, tmp_path, monkeypatch
) -> None:
    """16 clients against a target of 4 ongoing requests per replica add a second replica;
    then an alias move reaches both, and the node's cache downloads the version once.

    Behind HAProxy no handle sees a request; only the replicas' own counts reach Serve's
    autoscaler (no test here had shown it scale on the fast path before)."""
    server, bucket = s3_bucket
    repo, uri = s3_repo(server, bucket, monkeypatch)
    publish_iris(repo, tmp_path, "1", name="iris-two")
    publish_iris(repo, tmp_path, "2", name="iris-two", c=0.5)
    repo.move_alias("iris-two", "production", SetTarget("1"))
    args = app_args(uri, tmp_path / "cache", s3_env(server), name="iris-two")
    args["ingress"].pop("num_replicas")
    args["ingress"]["autoscaling_config"] = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 4,
        "upscale_delay_s": 1,
        "look_back_period_s": 2,
        "downscale_delay_s": 600,
    }
    base = deploy(args)
    stop = threading.Event()
    failed: list[int] = []

    def hammer() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                status = infer(client, base, name="iris-two").status_code
                if status != 200:
                    failed.append(status)

    threads = [threading.Thread(target=hammer) for _ in range(16)]
    for thread in threads:
        thread.start()
    try:
        with httpx.Client(timeout=10) as client:
            wait_for(
                lambda: len(_index(client, base, "iris-two")["replicas"]) == 2,
                timeout=90,
                interval=0.5,
                what="the autoscaler's second replica",
            )
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failed == []
    with httpx.Client(timeout=10) as client:
        server.reset_counts()
        repo.move_alias("iris-two", "production", SetTarget("2"))
        load = client.post(base + "/v2/repository/models/iris-two/load")
        assert load.status_code == 200, load.text
        entry = wait_for(
            lambda: (e := _index(client, base, "iris-two"))["converged"] and e, what="convergence"
        )
        assert {r["live_version"] for r in entry["replicas"]} == {"2"}
    model_gets = [r for r in server.requests if r.method == "GET" and r.key and r.key.endswith(".joblib")]
    assert len(model_gets) == 1


def test_metrics_count_what_was_sent(deploy, s3_bucket, tmp_path, monkeypatch, cluster: Cluster) -> None:
    server, bucket = s3_bucket
    repo, uri = s3_repo(server, bucket, monkeypatch)
    publish_iris(repo, tmp_path, "1", name="iris-metrics")
    repo.move_alias("iris-metrics", "production", SetTarget("1"))
    base = deploy(app_args(uri, tmp_path / "cache", s3_env(server), name="iris-metrics"))
    with httpx.Client(timeout=10) as client:
        for _ in range(7):
            assert infer(client, base, name="iris-metrics").status_code == 200
        for _ in range(3):
            assert (
                client.post(base + "/v2/models/iris-metrics/infer", content=b"{not json").status_code == 400
            )
    wait_for(
        lambda: _metric(cluster, "ray_serving_requests_total", model="iris-metrics", status="200") == 7,
        what="7 successful requests in metrics",
    )
    wait_for(
        lambda: _metric(cluster, "ray_serving_requests_total", model="iris-metrics", status="400") == 3,
        what="3 bad requests in metrics",
    )
    # NOTE: each series reaches the node exporter on its own flush; poll every one.
    expected = [
        ("ray_serving_request_duration_seconds_count", {}, lambda v: v == 7),
        ("ray_serving_live_version_info", {"version": "1"}, lambda v: v == 1),
        ("ray_serving_model_loads_total", {"outcome": "success"}, lambda v: v == 1),
        ("ray_serving_alias_checks_total", {"outcome": "unchanged"}, lambda v: v >= 1),
    ]
    for name, labels, check in expected:
        wait_for(
            lambda name=name, labels=labels, check=check: check(
                _metric(cluster, name, model="iris-metrics", **labels)
            ),
            what=f"{name} {labels}",
        )


def _index(client: httpx.Client, base: str, name: str) -> dict[str, Any]:
    entries = client.get(base + "/v2/repository/index").json()
    return next(e for e in entries if e["name"] == name)


def _metric(cluster: Cluster, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
    text = httpx.get(cluster.metrics, timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
