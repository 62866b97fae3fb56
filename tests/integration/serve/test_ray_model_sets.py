"""Model sets on the chart's path (Ray Serve, single-hop): members load on demand under a budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from ray import serve

from serving.repository import SetTarget
from serving.server.ray.board import BOARD_NAMESPACE, board_name
from serving.testing.poll import wait_for

from .conftest import app_args, infer, publish_iris, s3_env
from .test_serve import s3_repo

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]


def test_members_load_on_demand_within_the_budget_and_a_late_one_is_served(
    deploy, s3_bucket, tmp_path: Path, monkeypatch
) -> None:
    server, bucket = s3_bucket
    repo, store = s3_repo(server, bucket, monkeypatch)
    publish_iris(repo, tmp_path, "1")
    repo.move_alias("iris", "production", SetTarget("1"))
    for name in ("fraud-a", "fraud-b"):
        publish_iris(repo, tmp_path, "1", name=name)
        repo.move_alias(name, "production", SetTarget("1"))
    args: dict[str, Any] = app_args(store, tmp_path / "cache", s3_env(server), model={"isolation": "none"})
    args["models"].append({"prefix": "fraud-", "isolation": "none"})
    base = deploy(args)
    with httpx.Client(timeout=60) as client:
        # NOTE: ready with no member loaded: members load on their first request.
        index = client.get(base + "/v2/repository/index").json()
        assert [row["name"] for row in index] == ["iris"]
        assert infer(client, base, name="fraud-a").status_code == 200
        publish_iris(repo, tmp_path, "1", name="fraud-late")
        repo.move_alias("fraud-late", "production", SetTarget("1"))
        late = infer(client, base, name="fraud-late")
        assert late.status_code == 200, late.text
        assert late.json()["model_name"] == "fraud-late"
        assert infer(client, base, name="nobody").status_code == 404
        # NOTE: the index shows which replica holds which member, with its measured bytes.
        rows = wait_for(
            lambda: {r["name"]: r for r in client.get(base + "/v2/repository/index").json()}.get(
                "fraud-late"
            ),
            timeout=30,
            what="fraud-late in the index",
        )
        assert rows["set"] == "fraud-"
        # NOTE: the replica long-polls its board once for all it serves (a thread and a wait
        # per member cost about 1 ms of CPU each per second): one wait covers the three.
        (app_name,) = serve.status().applications
        (replica,) = {x["replica"] for x in rows["replicas"]}
        board = ray.get_actor(board_name(app_name), namespace=BOARD_NAMESPACE)
        wait_for(
            lambda: (
                ray.get(
                    board.__ray_call__.remote(
                        lambda b: [sorted(w.models) for w in b._replica_waits.get(replica, ())]
                    )
                )
                == [["fraud-a", "fraud-late", "iris"]]
            ),
            timeout=30,
            what="one wait from the replica covering its three models",
        )
        # NOTE: a load request acts on the member (loads it, checks its alias); unload frees it.
        loaded = client.post(base + "/v2/repository/models/fraud-b/load")
        assert loaded.status_code == 200, loaded.text
        unloaded = client.post(base + "/v2/repository/models/fraud-b/unload")
        assert unloaded.json() == {"name": "fraud-b", "unloaded": True}
        # NOTE: its row goes at once, not when it ages out of the board (10.9 s here): a
        # report its follower sent before it stopped must not bring it back.
        wait_for(
            lambda: "fraud-b" not in {r["name"] for r in client.get(base + "/v2/repository/index").json()},
            timeout=8,
            what="fraud-b off the index",
        )
        # NOTE: a member follows its alias while it is loaded.
        publish_iris(repo, tmp_path, "2", c=0.01, name="fraud-a")
        repo.move_alias("fraud-a", "production", SetTarget("2"))
        wait_for(
            lambda: infer(client, base, name="fraud-a").json()["model_version"] == "2",
            timeout=60,
            what="fraud-a to swap to version 2",
        )


def _holders(client: httpx.Client, base: str) -> dict[str, set[str]]:
    """Per member in the index: the replicas that hold it."""
    rows = client.get(base + "/v2/repository/index").json()
    return {r["name"]: {x["replica"] for x in r["replicas"]} for r in rows if r.get("set")}


def test_two_replicas_each_load_only_the_members_they_own_and_a_hot_one_spreads(
    deploy, s3_bucket, tmp_path: Path, monkeypatch
) -> None:
    """HAProxy spreads requests over both replicas; each member is still loaded by one of them.

    Without routing by model, every member asked for through both replicas is loaded by both.
    """
    server, bucket = s3_bucket
    repo, store = s3_repo(server, bucket, monkeypatch)
    publish_iris(repo, tmp_path, "1")
    repo.move_alias("iris", "production", SetTarget("1"))
    members = [f"shard-{i}" for i in range(16)]
    for name in [*members, "shard-hot"]:
        publish_iris(repo, tmp_path, "1", name=name)
        repo.move_alias(name, "production", SetTarget("1"))
    args: dict[str, Any] = app_args(
        store, tmp_path / "cache", s3_env(server), replicas=2, model={"isolation": "none"}
    )
    args["models"].append({"prefix": "shard-", "isolation": "none"})
    # NOTE: 3 requests of a member in a row stay under one owner; the hot member's stream does not.
    args["pool"] = {"owner_rps": 3.0}
    base = deploy(args)
    with httpx.Client(timeout=60) as client:
        for name in members:
            for _ in range(3):
                answer = infer(client, base, name=name)
                assert answer.status_code == 200, answer.text
                assert answer.json()["model_name"] == name

        def indexed() -> dict[str, set[str]] | None:
            held = _holders(client, base)
            return held if all(m in held for m in members) else None

        holders = wait_for(
            indexed,
            timeout=30,
            what="every member in the index",
        )
        assert {m: len(holders[m]) for m in members} == dict.fromkeys(members, 1)
        # NOTE: rendezvous hashing gives both replicas some of the 16 (all on one: 1 in 32,768).
        owners = {next(iter(holders[m])) for m in members}
        assert len(owners) == 2, holders
        # NOTE: a version's readiness is asked of the member's owner, wherever HAProxy sends it.
        for name in members:
            ready = client.get(f"{base}/v2/models/{name}/versions/1/ready")
            assert ready.status_code == 200, (name, ready.text)

        # NOTE: a hot member gets more owners as its rate grows past owner_rps.
        def spread() -> set[str] | None:
            for _ in range(20):
                assert infer(client, base, name="shard-hot").status_code == 200
            held = _holders(client, base).get("shard-hot", set())
            return held if len(held) == 2 else None

        wait_for(spread, timeout=60, what="shard-hot held by both replicas")
        # NOTE: the cold members stayed where they were.
        after = _holders(client, base)
        assert {m: after[m] for m in members} == {m: holders[m] for m in members}
        # NOTE: an unload reaches every replica holding the member, wherever HAProxy sends it.
        for name in [*members, "shard-hot"]:
            reply = client.post(f"{base}/v2/repository/models/{name}/unload")
            assert reply.json() == {"name": name, "unloaded": True}, reply.text
        wait_for(
            lambda: not set(_holders(client, base)) & {*members, "shard-hot"},
            timeout=8,
            what="every member off both replicas",
        )
