"""A model set under a memory budget, routed by model, on a real Ray cluster of three nodes.

Two single-hop replicas, at most one per node, serve one model set from a moto S3 bucket:
``MEMBERS`` models of about ``MODEL_MB`` MB each, under a budget per replica that fits
a few of them. Requests go through the head's HAProxy (the chart's path), which sends
each to either replica; routing by model sends it on to the member's owner.

- The cluster holds about two budgets' worth of distinct members: each replica holds
  only the members it owns, so no member is on both and neither holds what the other does.
- A node with a replica is killed under load: once the replacement is running, no
  request fails, and the two replicas again hold disjoint sets.

The tests run in order; the last kills a worker node.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from serving.manifest import TensorSpec
from serving.publish import publish_path
from serving.repository import Repository, SetTarget
from serving.settings import Settings
from serving.store import open_store
from serving.testing import MotoS3
from serving.testing.multinode import MultiNodeCluster, RequestLoop, environ, multi_node_cluster
from serving.testing.poll import wait_for

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

# NOTE: only "cluster": a run selecting -m ray or -m slow must not pull this suite in.
pytestmark = pytest.mark.cluster

APP = "sets"
REPLICAS = 2
PREFIX = "set-"
MEMBERS = 24
MODEL_MB = 8.0
BUDGET = int(4.5 * MODEL_MB * 1e6)
"""Fits 4 members per replica, with room for each to be counted 10% over its files; the
members are three times what two replicas hold, so each replica owns more than it fits."""
ROW = [[5.1, 3.5, 1.4, 0.2]]
INPUTS = [TensorSpec(name="input-0", datatype="FP64", shape=[-1, 4])]
NAMES = [f"{PREFIX}{i:02d}" for i in range(MEMBERS)]


@dataclass
class Deployed:
    cluster: MultiNodeCluster
    client: httpx.Client

    @property
    def http(self) -> str:
        return self.cluster.http

    def infer(self, name: str, client: httpx.Client | None = None) -> httpx.Response:
        body = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": ROW}]}
        return (client or self.client).post(f"{self.http}/v2/models/{name}/infer", json=body)

    def holders(self) -> dict[str, set[str]]:
        """Per member in the index: the replicas that hold it."""
        rows = self.client.get(f"{self.http}/v2/repository/index").json()
        return {r["name"]: {x["replica"] for x in r["replicas"]} for r in rows if r.get("set")}

    def replica_nodes(self) -> dict[str, str]:
        """Replica actor name -> node id, for the app's live replicas (from the GCS)."""
        out: dict[str, str] = {}
        for actor in ray._private.state.actors().values():  # NOTE: private; no dashboard here
            name = actor.get("Name") or ""
            if actor["State"] == "ALIVE" and name.startswith(f"SERVE_REPLICA::{APP}#"):
                out[name] = actor["Address"]["NodeID"]
        return out


def _publish(repo: Repository, tmp: Path) -> None:
    rng = np.random.default_rng(7)
    rows = int(MODEL_MB * 1e6 / 80)  # NOTE: the fitted rows, a copy in the tree, their labels
    for name in NAMES:
        model = KNeighborsClassifier(n_neighbors=3).fit(rng.normal(size=(rows, 4)), rng.integers(0, 3, rows))
        path = tmp / f"{name}.joblib"
        joblib.dump(model, path)
        publish_path(repo, path, name, version="1", format="sklearn", inputs=INPUTS, example=ROW)
        repo.move_alias(name, "production", SetTarget("1"))
        path.unlink()


@pytest.fixture(scope="module")
def deployed(moto_s3: MotoS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    if ray.is_initialized():
        pytest.fail("the cluster suite needs its own pytest process (make test-cluster)")
    if not moto_s3.running:
        moto_s3.start()
    bucket = f"sets-{uuid.uuid4().hex[:10]}"
    moto_s3.client().create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/models"
    env = {
        **moto_s3.env(),
        "SERVING_S3_ADDRESSING_STYLE": "path",
        "SERVING_S3_CONNECT_TIMEOUT": "0.5",
        "SERVING_S3_READ_TIMEOUT": "2",
    }
    with contextlib.ExitStack() as stack:
        stack.enter_context(environ(env))
        repo = Repository(open_store(uri, Settings(store=uri, s3_addressing_style="path")))
        _publish(repo, tmp_path_factory.mktemp("set-models"))
        from serving.server.ray.app import build_app

        args = {
            "store": uri,
            "models": [{"prefix": PREFIX, "alias": "production", "isolation": "none"}],
            "pool": {"memory_bytes": BUDGET},
            "poll_interval_s": 2.0,
            "retry_backoff_max_s": 2.0,
            "ingress": {
                "num_replicas": REPLICAS,
                "max_replicas_per_node": 1,
                "ray_actor_options": {"num_cpus": 0.1, "runtime_env": {"env_vars": env}},
            },
        }
        cluster = stack.enter_context(multi_node_cluster())
        client = stack.enter_context(httpx.Client(timeout=30))
        serve.run(build_app(args), name=APP, route_prefix="/", blocking=False)
        done = Deployed(cluster, client)

        def running() -> bool:
            app = serve.status().applications.get(APP)
            return bool(app and app.deployments["server"].replica_states.get("RUNNING", 0) == REPLICAS)

        wait_for(running, timeout=180, what="both replicas running")
        wait_for(lambda: done.infer(NAMES[0]).status_code == 200, timeout=60, what="a first answer")
        yield done


def _held(deployed: Deployed, passes: int) -> dict[str, set[str]]:
    """Send every member ``passes`` times in turn, three requests in a row each; per replica,
    the members it holds after.

    NOTE: three in a row land on both replicas 3 times in 4: without routing by model both
    load the member, and at the end both hold about the same last few members."""
    for _ in range(passes):
        for name in NAMES:
            for _ in range(3):
                reply = deployed.infer(name)
                assert reply.status_code == 200, (name, reply.text)
                assert reply.json()["model_name"] == name
    # NOTE: an eviction leaves the index when its replica's message reaches the board: read
    # until two reads agree.
    reads = [deployed.holders()]

    def settled() -> dict[str, set[str]] | None:
        reads.append(deployed.holders())
        return reads[-1] if reads[-1] == reads[-2] else None

    holders = wait_for(settled, timeout=30, what="the index to settle")
    by_replica: dict[str, set[str]] = {}
    for name, replicas in holders.items():
        for replica in replicas:
            by_replica.setdefault(replica, set()).add(name)
    return by_replica


def test_two_replicas_on_two_nodes_hold_about_two_budgets_of_distinct_members(
    deployed: Deployed, figures: dict[str, Any]
) -> None:
    by_replica = _held(deployed, passes=1)
    assert len(by_replica) == REPLICAS, by_replica
    nodes = set(deployed.replica_nodes().values())
    assert len(nodes) == REPLICAS
    per_replica = {r: len(m) for r, m in by_replica.items()}
    distinct = set().union(*by_replica.values())
    copies = sum(per_replica.values())
    figures["model sets: members held per replica (~8 MB members, budget 4.5 of them)"] = sorted(
        per_replica.values()
    )
    figures["model sets: distinct members held / one replica's"] = round(
        len(distinct) / max(per_replica.values()), 2
    )
    # NOTE: the budget binds (a replica holds a few, not all 32) ...
    assert 2 <= max(per_replica.values()) <= 5, per_replica
    # NOTE: ... and no member is on both, so the cluster holds both budgets' worth.
    assert copies == len(distinct), by_replica
    assert len(distinct) >= 1.8 * max(per_replica.values()), per_replica


def _infer_in_turn(deployed: Deployed) -> Callable[[httpx.Client], str]:
    """One inference request for the next member in turn: ``"ok"`` or the failure."""
    names = itertools.cycle(NAMES)

    def send(client: httpx.Client) -> str:
        name = next(names)
        try:
            reply = deployed.infer(name, client)
        except httpx.HTTPError as exc:
            return f"{name}: {type(exc).__name__}: {exc}"[:120]
        return "ok" if reply.status_code == 200 else f"{name}: {reply.status_code} {reply.text[:80]}"

    return send


def test_killing_a_node_with_a_replica_loses_no_request_once_its_replacement_runs(
    deployed: Deployed, figures: dict[str, Any]
) -> None:
    cluster = deployed.cluster
    replicas = deployed.replica_nodes()
    victim = next(n for n in cluster.nodes.values() if n.node_id in replicas.values() and not n.head)
    # NOTE: stamped when sent: one sent before the replacement ran belongs to the window.
    loop = RequestLoop(_infer_in_turn(deployed), max_s=180, timeout_s=10, stamp_sent=True)
    thread = threading.Thread(target=loop.run, name="set-client-loop", daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(loop.results) >= 20, timeout=60, what="the client loop to warm up")
        killed = cluster.kill(victim.name)

        def rescheduled() -> bool:
            nodes = deployed.replica_nodes()
            app = serve.status().applications.get(APP)
            running = app.deployments["server"].replica_states.get("RUNNING", 0) if app else 0
            return running == REPLICAS and len(nodes) == REPLICAS and victim.node_id not in nodes.values()

        wait_for(rescheduled, timeout=120, what="Serve to replace the lost replica")
        back = time.monotonic()
        # NOTE: after the reschedule, every member asked for three times over: none may fail.
        steady_from = len(loop.results)
        wait_for(
            lambda: len(loop.results) - steady_from >= 3 * MEMBERS,
            timeout=120,
            what=f"{3 * MEMBERS} requests after it",
        )
    finally:
        loop.stop.set()
        thread.join(timeout=30)
    window, after = loop.failures(killed, back), loop.failures(back)
    figures["model sets: node kill -> replacement replica RUNNING"] = f"{back - killed:.2f} s"
    figures["model sets: failed in the reschedule window"] = [f"+{t - killed:.2f}s {o}" for t, o in window]
    figures["model sets: failed after the reschedule"] = len(after)
    assert after == [], after
    # NOTE: the replacement took the dead replica's share: again no member on both replicas.
    by_replica = wait_for(
        lambda: (
            (held := _held(deployed, passes=1))
            and len(held) == REPLICAS
            and set(held) <= {*_live_replica_ids(deployed)}
            and held
        ),
        timeout=60,
        what="both live replicas holding members",
    )
    distinct = set().union(*by_replica.values())
    assert sum(len(m) for m in by_replica.values()) == len(distinct), by_replica


def _live_replica_ids(deployed: Deployed) -> set[str]:
    """The live replicas' ids as the index names them (the actor name's last part)."""
    return {name.rsplit("#", 1)[-1] for name in deployed.replica_nodes()}
