"""Progressive delivery over real HTTP: canary weights, sticky routing, shadow, promote/abort, rollout.

Its own module-scoped server (standalone and Ray single-hop; two-hop runs the same
ModelService code behind one more hop) over a folder store, following aliases
every ``POLL_S`` seconds, so that "within one poll interval" is measurable.

Models: ``split`` (v1 live; v2 a retrained one whose labels differ on a few rows),
``roll`` (v1 live; v2 healthy) and ``bad`` (v1 live; v2 takes 5 features, so the
callers' 4-feature requests fail on it and not on v1).
"""

from __future__ import annotations

import itertools
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import orjson
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from serving.manifest import TensorSpec
from serving.publish import publish_path
from serving.repository import Abort, Promote, Repository, SetCanary, SetShadow, SetTarget
from serving.settings import Settings
from serving.store import open_store

from .conftest import OUTPUTS, ROW, Served, _ray, _standalone, wait_for

POLL_S = 0.4
"""The servers' alias poll interval (no jitter)."""
SLACK_S = 1.5
"""What "within one poll interval" allows on top, for HTTP and a busy 2-core machine."""
X, Y = load_iris(return_X_y=True)


@dataclass
class Delivery:
    transport: str
    base: str
    root: Path
    repo: Repository
    models: dict[tuple[str, str], LogisticRegression] = field(default_factory=dict)


def _publish(repo: Repository, work: Path, name: str, version: str, c: float, features: int = 4) -> Any:
    x = X if features == 4 else np.hstack([X, X[:, :1]])
    model = LogisticRegression(max_iter=300, C=c).fit(x, Y)
    path = work / f"{name}-{version}-{uuid.uuid4().hex[:6]}.joblib"
    joblib.dump(model, path)
    publish_path(
        repo,
        path,
        name,
        version=version,
        format="sklearn",
        inputs=[TensorSpec(name="input-0", datatype="FP64", shape=[-1, features])],
        outputs=OUTPUTS,
        example=[ROW[0] + [0.2] * (features - 4)],
    )
    return model


@pytest.fixture(
    scope="module",
    params=["standalone", pytest.param("ray", marks=[pytest.mark.ray, pytest.mark.slow])],
)
def delivery(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Delivery]:
    cluster = request.getfixturevalue("cluster") if request.param == "ray" else None
    work = tmp_path_factory.mktemp(f"progressive-{request.param}")
    root = work / "store"
    repo = Repository(open_store(str(root), Settings(store=str(root))))
    out = Delivery(request.param, "", root, repo)
    out.models["split", "1"] = _publish(repo, work, "split", "1", c=1.0)
    out.models["split", "2"] = _publish(repo, work, "split", "2", c=0.02)
    _publish(repo, work, "roll", "1", c=1.0)
    _publish(repo, work, "roll", "2", c=0.5)
    _publish(repo, work, "bad", "1", c=1.0)
    _publish(repo, work, "bad", "2", c=1.0, features=5)
    for name in ("split", "roll", "bad"):
        repo.move_alias(name, "production", SetTarget("1"))
    args: dict[str, Any] = {
        "store": str(root),
        # NOTE: split's versions load isolated, as in production; the rollout models skip it
        # to keep this module's time down (the canary path is the same code either way).
        "models": [
            {"name": "split", "alias": "production"},
            *({"name": n, "alias": "production", "isolation": "never"} for n in ("roll", "bad")),
        ],
        "poll_interval_s": POLL_S,
        "poll_jitter": 0,
        "retry_backoff_max_s": 2,
        "cache_dir": str(work / "cache"),
    }
    served = Served("", "", "", repo, None, "", work)  # type: ignore[arg-type]  # NOTE: no S3 here
    if request.param == "standalone":
        runner = _standalone(served, args, {})
    else:
        args["ingress"] = {"ray_actor_options": {"num_cpus": 0.2}}
        runner = _ray(served, cluster, args, "single-hop")
    for base, _grpc in runner:
        out.base = base
        yield out


def body(rows: Any) -> bytes:
    rows = np.asarray(rows, dtype=float).tolist()
    return orjson.dumps(
        {
            "inputs": [
                {"name": "input-0", "shape": [len(rows), len(rows[0])], "datatype": "FP64", "data": rows}
            ]
        }
    )


def infer(client: httpx.Client, base: str, name: str, rows: Any = None, **headers: str) -> httpx.Response:
    return client.post(
        f"{base}/v2/models/{name}/infer", content=body(ROW if rows is None else rows), headers=headers
    )


def entry(client: httpx.Client, base: str, name: str) -> dict[str, Any]:
    return next(e for e in client.get(base + "/v2/repository/index").json() if e["name"] == name)


def applied(client: httpx.Client, d: Delivery, name: str, role: str, version: str, share: float) -> bool:
    e = entry(client, d.base, name)
    key = "weight" if role == "canary" else "fraction"
    states = [r.get(role) or {} for r in e["replicas"]]
    return bool(states) and all(
        s.get("version") == version and s.get(key) == share and s.get("loaded") for s in states
    )


def dropped(client: httpx.Client, d: Delivery, name: str) -> bool:
    e = entry(client, d.base, name)
    return all(not r.get("canary") and not r.get("shadow") for r in e["replicas"])


def split_rows(d: Delivery) -> tuple[Any, int]:
    """50 distinct flowers, and on how many of them split's v1 and v2 disagree (some)."""
    rows = X[::3]
    disagreements = int(np.sum(d.models["split", "1"].predict(rows) != d.models["split", "2"].predict(rows)))
    assert disagreements > 0
    return rows, disagreements


class Traffic:
    """Requests in a loop on a thread until stopped: every reply's status, version and time."""

    def __init__(self, base: str, name: str, rows: Any = None) -> None:
        self.base, self.name = base, name
        self.rows = [ROW] if rows is None else [[list(r)] for r in np.asarray(rows, dtype=float)]
        self.replies: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with httpx.Client(timeout=20) as client:
            for i in itertools.count():
                if self._stop.is_set():
                    break
                r = infer(client, self.base, self.name, rows=self.rows[i % len(self.rows)])
                version = r.json().get("model_version", "") if r.status_code == 200 else ""
                self.replies.append((time.monotonic(), r.status_code, version))

    def failures(self) -> list[tuple[float, int, str]]:
        return [r for r in self.replies if r[1] != 200]

    def all_since(self, since: float, version: str) -> float | None:
        """When replies started to come only from ``version`` (after ``since``), or None."""
        later = [r for r in self.replies if r[0] >= since]
        for i, (t, _, _) in enumerate(later):
            if all(v == version for _, _, v in later[i:]) and len(later) - i >= 5:
                return t
        return None


def test_a_30_percent_canary_takes_30_percent_and_every_reply_names_its_version(delivery: Delivery) -> None:
    d = delivery
    d.repo.move_alias("split", "production", SetCanary("2", 30))
    with httpx.Client(timeout=20) as client:
        wait_for(lambda: applied(client, d, "split", "canary", "2", 30), what="the canary to load")
        before = entry(client, d.base, "split")["figures"].get("2", {}).get("requests", 0)
        versions = []
        for _ in range(1000):
            r = infer(client, d.base, "split")
            assert r.status_code == 200, r.text
            versions.append(r.json()["model_version"])
        share = versions.count("2") / len(versions)
        print(f"[{d.transport}] 30% canary took {share:.1%} of 1000 requests")
        assert set(versions) == {"1", "2"}
        assert abs(share - 0.30) <= 0.06
        figures = wait_for(
            lambda: (
                (f := entry(client, d.base, "split")["figures"]).get("2", {}).get("requests", 0)
                >= before + versions.count("2")
                and f
            ),
            what="the index to count the canary's requests",
        )
        assert figures["2"]["requests"] == before + versions.count("2")


def test_sticky_routing_keeps_a_header_value_on_one_version(delivery: Delivery) -> None:
    d = delivery
    with httpx.Client(timeout=20) as client:
        wait_for(lambda: applied(client, d, "split", "canary", "2", 30), what="the canary to load")
        seen: dict[str, set[str]] = {}
        for i in range(40):
            key = f"caller-{i}"
            for _ in range(4):
                r = infer(client, d.base, "split", **{"X-Request-Id": key})
                assert r.status_code == 200, r.text
                seen.setdefault(key, set()).add(r.json()["model_version"])
        assert all(len(v) == 1 for v in seen.values()), seen
        assert {next(iter(v)) for v in seen.values()} == {"1", "2"}


def test_a_shadow_never_changes_a_reply_and_its_disagreement_is_counted(delivery: Delivery) -> None:
    d = delivery
    d.repo.move_alias("split", "production", Abort())
    rows, expected_disagreements = split_rows(d)
    with httpx.Client(timeout=20) as client:
        wait_for(lambda: dropped(client, d, "split"), what="the canary to be dropped")

        def run() -> tuple[list[Any], list[float]]:
            replies, seconds = [], []
            for row in rows:
                started = time.perf_counter()
                r = infer(client, d.base, "split", rows=[row])
                seconds.append(time.perf_counter() - started)
                assert r.status_code == 200, r.text
                replies.append(r.json())
            return replies, seconds

        plain, plain_s = run()
        d.repo.move_alias("split", "production", SetShadow("2", 1.0))
        wait_for(lambda: applied(client, d, "split", "shadow", "2", 1.0), what="the shadow to load")
        before = entry(client, d.base, "split")["figures"].get("2", {"compared": 0, "disagreed": 0})
        shadowed, shadowed_s = run()
        assert [r["model_version"] for r in shadowed] == ["1"] * len(rows)
        assert [r["outputs"] for r in shadowed] == [r["outputs"] for r in plain]

        def counted() -> dict[str, Any] | None:
            f = entry(client, d.base, "split")["figures"].get("2", {})
            return f if f.get("compared", 0) - before["compared"] >= len(rows) else None

        f = wait_for(counted, what="the shadow's comparisons in the index")
        assert f["compared"] - before["compared"] == len(rows)
        assert f["disagreed"] - before["disagreed"] == expected_disagreements
        p_plain, p_shadow = statistics.median(plain_s), statistics.median(shadowed_s)
        print(
            f"[{d.transport}] median latency {p_plain * 1e3:.1f} ms plain, "
            f"{p_shadow * 1e3:.1f} ms with shadow"
        )
        # NOTE: loose: the shadow runs on its own thread after the reply; noise on 2 busy cores is large.
        assert p_shadow <= 2 * p_plain + 0.010
    d.repo.move_alias("split", "production", Abort())


def test_the_canarys_answers_are_checked_against_the_live_version_off_the_request_path(
    delivery: Delivery,
) -> None:
    """Each request the canary answers is predicted again by the live version, after the reply,
    and counted under the canary's version where the answers differ; those reference
    predictions are not requests of the live version."""
    d = delivery
    alias = d.repo.get_alias("split", "production")
    if alias.canary is not None or alias.shadow is not None:
        d.repo.move_alias("split", "production", Abort())
    rows, expected_disagreements = split_rows(d)
    with httpx.Client(timeout=20) as client:
        wait_for(lambda: dropped(client, d, "split"), what="the shadow or canary to be dropped")
        d.repo.move_alias("split", "production", SetCanary("2", 100))
        wait_for(lambda: applied(client, d, "split", "canary", "2", 100), what="the canary to load")
        figures = entry(client, d.base, "split")["figures"]
        before = figures.get("2", {"compared": 0, "disagreed": 0})
        live_before = figures.get("1", {}).get("requests", 0)
        replies = [infer(client, d.base, "split", rows=[row]) for row in rows]
        assert [r.status_code for r in replies] == [200] * len(rows)
        assert {r.json()["model_version"] for r in replies} == {"2"}

        def counted() -> dict[str, Any] | None:
            f = entry(client, d.base, "split")["figures"].get("2", {})
            return f if f.get("compared", 0) - before["compared"] >= len(rows) else None

        f = wait_for(counted, what="the canary's comparisons in the index")
        assert f["compared"] - before["compared"] == len(rows)
        assert f["disagreed"] - before["disagreed"] == expected_disagreements
        assert entry(client, d.base, "split")["figures"].get("1", {}).get("requests", 0) == live_before
    d.repo.move_alias("split", "production", Abort())


def test_promote_and_abort_take_effect_within_one_poll_interval_with_no_failed_request(
    delivery: Delivery,
) -> None:
    d = delivery
    with httpx.Client(timeout=20) as client:
        wait_for(lambda: dropped(client, d, "split"), what="no canary")
        d.repo.move_alias("split", "production", SetCanary("2", 50))
        wait_for(lambda: applied(client, d, "split", "canary", "2", 50), what="the canary to load")
        with Traffic(d.base, "split") as traffic:
            wait_for(lambda: {v for _, _, v in traffic.replies} >= {"1", "2"}, what="both versions answering")
            moved = time.monotonic()
            d.repo.move_alias("split", "production", Promote())
            wait_for(lambda: traffic.all_since(moved, "2"), what="every reply from 2")
            promoted_in = (traffic.all_since(moved, "2") or 0) - moved
            d.repo.move_alias("split", "production", SetCanary("1", 50))
            wait_for(lambda: applied(client, d, "split", "canary", "1", 50), what="1 as canary")
            wait_for(lambda: "1" in {v for t, _, v in traffic.replies if t > time.monotonic() - 1}, what="1")
            moved = time.monotonic()
            d.repo.move_alias("split", "production", Abort())
            wait_for(lambda: traffic.all_since(moved, "2"), what="every reply from 2 again")
            aborted_in = (traffic.all_since(moved, "2") or 0) - moved
        print(f"[{d.transport}] promote took {promoted_in:.2f}s, abort {aborted_in:.2f}s (poll {POLL_S}s)")
        assert traffic.failures() == []
        assert promoted_in <= POLL_S + SLACK_S
        assert aborted_in <= POLL_S + SLACK_S
        assert d.repo.get_alias("split", "production").version == "2"


def rollout(d: Delivery, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "serving.cli", "--store", str(d.root), "rollout", name, "production", "2"]
    cmd += ["--url", d.base, "--steps", "20,50,100", "--step-seconds", "1", "--min-requests", "5", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_rollout_promotes_a_healthy_version_through_every_step(delivery: Delivery) -> None:
    d = delivery
    with Traffic(d.base, "roll") as traffic:
        started = time.monotonic()
        done = rollout(d, "roll", "--json", "--max-p99-ratio", "20")
        took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    lines = [orjson.loads(line) for line in done.stdout.splitlines()]
    steps = [line["step"] for line in lines if "step" in line]
    # NOTE: safe by default: a shadow phase (no client exposed) before the canary steps.
    assert [(s["phase"], s["share"], s["ok"]) for s in steps] == [
        ("shadow", 1.0, True),
        ("canary", 20, True),
        ("canary", 50, True),
        ("canary", 100, True),
    ]
    assert lines[-1]["result"]["outcome"] == "promoted"
    alias = d.repo.get_alias("roll", "production")
    assert (alias.version, alias.canary, alias.history[-1].version) == ("2", None, "1")
    assert traffic.failures() == []
    print(f"[{d.transport}] healthy rollout, 3 steps of 1 s: {took:.1f}s")


def test_a_version_whose_input_schema_changed_is_refused_before_any_traffic(delivery: Delivery) -> None:
    """5 features against 4: the schema gate refuses it before the alias is touched, so no
    client request ever reaches it (116 of 624 failed while it took its canary share)."""
    d = delivery
    before = d.repo.get_alias("bad", "production")
    with Traffic(d.base, "bad") as traffic:
        done = rollout(d, "bad")
        seen = len(traffic.replies)
        wait_for(lambda: len(traffic.replies) > seen + 5, what="traffic after the refusal")
    assert done.returncode == 12, (done.stdout, done.stderr)
    assert "refused before any traffic: input 'input-0' has shape [-1, 5], the live version's [-1, 4]" in (
        done.stderr
    )
    assert "--allow-schema-change" in done.stderr
    assert d.repo.get_alias("bad", "production").seq == before.seq  # never moved
    assert traffic.failures() == []


def test_a_schema_change_let_through_is_caught_in_shadow_with_no_failed_request(delivery: Delivery) -> None:
    """With --allow-schema-change the shadow phase comes first: every mirrored request fails
    on the candidate, the rollout aborts there, and no client ever got an error."""
    d = delivery
    with Traffic(d.base, "bad") as traffic:
        started = time.monotonic()
        done = rollout(d, "bad", "--allow-schema-change")
        took = time.monotonic() - started
        with httpx.Client(timeout=20) as client:
            wait_for(lambda: dropped(client, d, "bad"), what="the shadow to be dropped")
        seen = len(traffic.replies)
        wait_for(lambda: len(traffic.replies) > seen + 5, what="traffic after the abort")
    assert done.returncode == 12, (done.stdout, done.stderr)
    assert "bad@production stays on 1" in done.stderr
    assert "shadow error ratio 100.0%" in done.stderr
    assert done.stdout.count("ABORT") == 1
    alias = d.repo.get_alias("bad", "production")
    assert (alias.version, alias.canary, alias.shadow) == ("1", None, None)
    assert traffic.failures() == []
    assert {v for _, s, v in traffic.replies if s == 200} == {"1"}
    print(f"[{d.transport}] schema change aborted in shadow in {took:.1f}s, 0 failed requests")


def test_a_canary_that_answers_differently_is_aborted_without_a_shadow_phase(delivery: Delivery) -> None:
    """No shadow phase: the first canary step sees the candidate's answers differ from the live
    version's on the same requests (checked off the request path) and aborts."""
    d = delivery
    v1, v2 = d.models["split", "1"], d.models["split", "2"]
    rows = X[v1.predict(X) != v2.predict(X)]  # NOTE: flowers the two versions label differently
    assert len(rows) > 0
    with httpx.Client(timeout=20) as client:
        d.repo.move_alias("split", "production", SetTarget("1"))
        wait_for(lambda: dropped(client, d, "split"), what="the shadow or canary to be dropped")
    with Traffic(d.base, "split", rows=rows) as traffic:
        moved = time.monotonic()
        wait_for(lambda: traffic.all_since(moved, "1"), what="every reply from 1")
        done = rollout(d, "split", "--shadow-seconds", "0", "--max-disagreement", "0.01")
    assert done.returncode == 12, (done.stdout, done.stderr)
    assert "canary disagreement" in done.stderr
    assert "with the live version is over --max-disagreement 0.01" in done.stderr
    assert "split@production stays on 1" in done.stderr
    assert d.repo.get_alias("split", "production").version == "1"
    assert traffic.failures() == []
