"""A store that trickles or hangs never blocks the control plane.

A real S3 server (moto on loopback) that answers a chosen key one byte a
second, or not at all, in front of a real ModelService following its alias
with the real watcher loop and real time:

- a pull that trickles is abandoned at its minimum rate, inside the blocked read;
- while it trickles, a rollback to a cached version is live within poll + 1 s;
- a hung alias check is abandoned, and a move made meanwhile is followed within
  poll + 1 s of the store answering again.

``SIGTERM`` during a hung pull is in ``test_serve_signals.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.dummy import DummyClassifier

from serving.cache import LoaderCache
from serving.config import AppConfig, ModelConfig
from serving.errors import StoreUnavailable
from serving.manifest import TensorSpec
from serving.protocol.types import InferRequest, RequestedOutput
from serving.publish import publish_path
from serving.repository import Repository, SetTarget
from serving.runtime.service import ModelService
from serving.runtime.watcher import run_forever
from serving.store.factory import open_store
from serving.testing.poll import wait_for
from serving.testing.s3 import MotoS3

pytestmark = [pytest.mark.s3, pytest.mark.faults]

POLL_S = 0.5
ALIAS_KEY = "models/m/aliases/production.json"


def publish_constant(repo: Repository, work: Path, version: str, answer: int) -> None:
    x, y = load_iris(return_X_y=True)
    path = work / f"constant-{version}.joblib"
    joblib.dump(DummyClassifier(strategy="constant", constant=answer).fit(x, y), path)
    publish_path(
        repo,
        path,
        "m",
        version=version,
        format="sklearn",
        inputs=[TensorSpec(name="input-0", datatype="FP64", shape=[-1, 4])],
        example=[[5.1, 3.5, 1.4, 0.2]],
    )


@dataclass
class Served:
    service: ModelService
    server: MotoS3
    writer: Repository
    """Writes through a second server on the same (process-wide) moto state, so the
    test can move the alias while the served store's server hangs."""

    def answer(self) -> int:
        request = InferRequest(
            model="m",
            inputs={"input-0": np.array([[5.1, 3.5, 1.4, 0.2]])},
            outputs=[RequestedOutput("predict")],
        )
        out = self.service.infer(request)
        return int(np.asarray(out.outputs["predict"]).ravel()[0])

    def live(self) -> str | None:
        return self.service.slot.version

    def key(self, version: str) -> str:
        """The served artifact's object key (without the bucket)."""
        manifest, _ = self.writer.manifest("m", version)
        return f"models/m/versions/{version}/{manifest.files[0].path}"


@pytest.fixture
def served(
    s3_env: MotoS3, bucket: str, tmp_path: Path, make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Served]:
    uri = f"s3://{bucket}/models"
    settings = make_settings(
        tmp_path / "cache",
        store=uri,
        s3_max_attempts=1,
        s3_read_timeout=30.0,
        pull_min_bytes_per_s=1024.0,
        pull_rate_window_s=2.0,
        alias_check_timeout_s=1.0,
    )
    with MotoS3() as side:
        monkeypatch.setenv("AWS_ENDPOINT_URL", side.endpoint_url)
        writer = Repository(open_store(uri, settings))
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint_url)
        work = tmp_path / "work"
        work.mkdir()
        for version, answer in (("1", 0), ("2", 1), ("3", 2)):
            publish_constant(writer, work, version, answer)
        writer.move_alias("m", "production", SetTarget("1"))
        model = ModelConfig(name="m", alias="production", isolation="none")
        app = AppConfig(models=[model], poll_interval_s=POLL_S, poll_jitter=0.0, store=uri)
        service = ModelService(model, app, settings)
        service.start()
        stop = threading.Event()
        watcher = service.watcher
        assert watcher is not None
        wait = lambda timeout, _read: stop.wait(timeout)  # noqa: E731 -- NOTE: no load requests here
        thread = threading.Thread(target=run_forever, args=(watcher, wait, stop), daemon=True)
        thread.start()
        try:
            yield Served(service, s3_env, writer)
        finally:
            stop.set()
            thread.join(timeout=30)
            service.close()


def follows_within(served: Served, version: str, seconds: float) -> float:
    """Seconds until ``version`` is live; fails if that takes longer than ``seconds``."""
    started = time.monotonic()
    wait_for(what=f"version {version} live", predicate=lambda: served.live() == version, timeout=seconds)
    return time.monotonic() - started


def test_a_rollback_to_a_cached_version_is_live_within_one_poll_while_a_pull_trickles(
    served: Served,
) -> None:
    served.writer.move_alias("m", "production", SetTarget("2"))
    follows_within(served, "2", 20)
    assert served.answer() == 1
    with served.server.trickle(served.key("3")):
        served.writer.move_alias("m", "production", SetTarget("3"))
        wait_for(
            what="the pull of 3 to start",
            predicate=lambda: served.server.count("GET", key=served.key("3")) >= 1,
        )
        # The operator rolls back to 1, which this node still has in its cache.
        served.writer.move_alias("m", "production", SetTarget("1"))
        follows_within(served, "1", POLL_S + 1.0)
        assert served.answer() == 0
        assert served.live() == "1"
        # The trickling pull is abandoned at its minimum rate, inside the blocked read, and
        # its partial files removed, long before the trickle would have sent the file.
        tmp = served.service.slot.cache.root / "tmp"
        wait_for(
            what="the trickling pull abandoned and cleaned up",
            predicate=lambda: not any(p.is_file() for p in tmp.rglob("*")),
            timeout=15,
        )
        assert served.service.slot.cache.get("m", "3", served.writer.resolve("m:3").manifest_sha256) is None
    # 3 never becomes live: the alias left it. Two more polls, to be sure.
    checks = served.server.count("GET", key=ALIAS_KEY)
    wait_for(
        what="two more alias checks",
        predicate=lambda: served.server.count("GET", key=ALIAS_KEY) >= checks + 2,
    )
    assert served.live() == "1"


def test_a_trickling_pull_is_abandoned_at_its_minimum_rate_and_leaves_nothing(
    s3_env: MotoS3, bucket: str, tmp_path: Path, make_settings: Any
) -> None:
    uri = f"s3://{bucket}/models"
    settings = make_settings(
        tmp_path / "cache", store=uri, s3_max_attempts=1, pull_min_bytes_per_s=1024.0, pull_rate_window_s=2.0
    )
    repo = Repository(open_store(uri, settings))
    work = tmp_path / "work"
    work.mkdir()
    publish_constant(repo, work, "1", 0)
    cache = LoaderCache.from_settings(settings)
    resolved = repo.resolve("m:1")
    key = f"models/m/versions/1/{resolved.manifest.files[0].path}"
    started = time.monotonic()
    with s3_env.trickle(key), pytest.raises(StoreUnavailable, match="minimum rate"):
        cache.fetch(repo, resolved)
    # The 2 s window, the watchdog's half-second beat, and the read returning: far from
    # the ~hour a 1 byte/s trickle of this file would take, and from the 30 s read timeout.
    assert time.monotonic() - started < 10
    assert cache.get("m", "1", resolved.manifest_sha256) is None
    assert not [p for p in (cache.root / "tmp").rglob("*") if p.is_file()]
    # The store is healthy again: the same pull succeeds.
    assert cache.fetch(repo, resolved).hit is False


def test_a_hung_alias_check_is_abandoned_and_the_next_move_followed_once_the_store_answers(
    served: Served,
) -> None:
    with served.server.hang(ALIAS_KEY):
        wait_for(
            what="an abandoned alias check",
            predicate=lambda: "abandoned" in (served.service.watcher.status().last_error or ""),
            timeout=10,
        )
        # Moved while this node's store hangs (written through the other server).
        served.writer.move_alias("m", "production", SetTarget("2"))
        # The hang lasts a few abandoned checks, as the 6 s outage did.
        hung = served.server.count("GET", key=ALIAS_KEY)
        wait_for(
            what="two more hung checks",
            predicate=lambda: served.server.count("GET", key=ALIAS_KEY) >= hung + 2,
        )
        assert served.live() == "1"
    recovered = time.monotonic()
    wait_for(what="version 2 live", predicate=lambda: served.live() == "2", timeout=POLL_S + 1.0)
    assert time.monotonic() - recovered <= POLL_S + 1.0
    assert served.answer() == 1


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_a_spoiled_body_never_goes_live_and_the_move_is_followed_once_the_store_is_good(
    served: Served, how: str
) -> None:
    """The store answers 200 with random bytes, or half the file and a dropped connection: the digest
    check refuses it, 1 keeps answering, and nothing unverified stays in the cache."""
    key = served.key("2")
    with served.server.spoil(how, key):
        served.writer.move_alias("m", "production", SetTarget("2"))
        watcher = served.service.watcher
        assert watcher is not None
        # NOTE: a truncated body is retried by s3transfer first; the pull fails once those end.
        wait_for(
            what="a failed pull of 2",
            predicate=lambda: watcher.status().failed_version == "2",
            timeout=30,
        )
        assert served.server.count("GET", key=key) >= 1
        assert served.live() == "1"
        assert served.answer() == 0
        assert served.service.slot.cache.get("m", "2", served.writer.resolve("m:2").manifest_sha256) is None
    # The store is good again: the next retry (backoff 1, 2, 4 s ...) brings 2 in.
    follows_within(served, "2", 20)
    assert served.answer() == 1
