"""Progressive delivery in the core: the alias's canary and shadow, routing, figures, the watcher.

Driven tick by tick with an injected clock (helpers from test_slot_watcher).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY
from test_slot_watcher import Clock, make, publish

from serving.cache import LoaderCache
from serving.errors import AliasNotFound, InvalidRequest, VersionNotFound
from serving.manifest import Alias, CanaryTarget
from serving.repository import Abort, Promote, Repository, SetCanary, SetShadow, SetTarget
from serving.rollout import Thresholds, Window, judge_canary, judge_shadow, window
from serving.runtime.traffic import Figures, Router, disagrees, merge, quantile, sticky_bucket
from serving.signing import generate_keypair, load_signing_key, load_trusted_keys, sign_alias, verify_alias
from serving.store.local import LocalStore

SHA = "a" * 64


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository(LocalStore(str(tmp_path / "store")))


@pytest.fixture
def cache(tmp_path: Path) -> LoaderCache:
    return LoaderCache(tmp_path / "cache", max_bytes=10**9)


# -- the alias object ----------------------------------------------------------------------
def test_an_alias_without_canary_or_shadow_writes_neither_field() -> None:
    alias = Alias(name="m", alias="production", version="1", manifest_sha256=SHA)
    doc = json.loads(alias.to_json())
    assert "canary" not in doc
    assert "shadow" not in doc


def test_a_reader_that_knows_no_canary_still_reads_the_target() -> None:
    """An old reader's model (no canary field) ignores it and serves ``version``."""
    from pydantic import BaseModel

    class OldAlias(BaseModel):
        name: str
        alias: str
        version: str
        manifest_sha256: str

    alias = Alias(name="m", alias="production", version="1", manifest_sha256=SHA)
    split = alias.with_split(
        "me", canary=CanaryTarget(version="2", manifest_sha256=SHA, weight=30), shadow=None
    )
    old = OldAlias.model_validate_json(split.to_json())
    assert old.version == "1"


def test_unknown_fields_from_a_newer_writer_are_ignored() -> None:
    doc = json.loads(Alias(name="m", alias="production", version="1", manifest_sha256=SHA).to_json())
    doc["ramp"] = {"future": True}
    assert Alias.from_json(json.dumps(doc).encode()).version == "1"


def test_a_signature_covers_the_canary(tmp_path: Path) -> None:
    pair = generate_keypair(tmp_path / "k")
    key, trusted = load_signing_key(pair.key_path), load_trusted_keys([pair.pub_path])
    alias = Alias(name="m", alias="production", version="1", manifest_sha256=SHA).with_split(
        "me", canary=CanaryTarget(version="2", manifest_sha256=SHA, weight=10), shadow=None
    )
    raw = sign_alias(alias, key)
    verify_alias(raw, trusted, "m", "production")
    doc = json.loads(raw)
    doc["canary"]["weight"] = 100
    from serving.errors import UntrustedArtifact

    with pytest.raises(UntrustedArtifact):
        verify_alias(json.dumps(doc).encode(), trusted, "m", "production")


def test_canary_weight_is_a_percentage() -> None:
    with pytest.raises(ValueError, match="less than or equal to 100"):
        CanaryTarget(version="2", manifest_sha256=SHA, weight=101)


# -- the repository ----------------------------------------------------------------------------
def test_set_canary_keeps_the_target_and_promote_moves_it_with_history(repo: Repository, tmp_path) -> None:
    publish(repo, tmp_path, "1", factor=1)
    publish(repo, tmp_path, "2", factor=2)
    first = repo.move_alias("m", "production", SetTarget("1"))
    split = repo.move_alias("m", "production", SetCanary("2", 30))
    assert (split.version, split.canary and split.canary.weight, split.history) == ("1", 30, first.history)
    assert split.seq == first.seq + 1
    promoted = repo.move_alias("m", "production", Promote())
    assert (promoted.version, promoted.canary, [h.version for h in promoted.history]) == ("2", None, ["1"])
    assert promoted.seq == split.seq + 1


def test_abort_drops_canary_and_shadow_and_keeps_the_target(repo: Repository, tmp_path) -> None:
    for v in ("1", "2", "3"):
        publish(repo, tmp_path, v, factor=int(v))
    repo.move_alias("m", "production", SetTarget("1"))
    repo.move_alias("m", "production", SetCanary("2", 5))
    both = repo.move_alias("m", "production", SetShadow("3", 0.5))
    assert both.canary is not None
    assert both.shadow is not None
    aborted = repo.move_alias("m", "production", Abort())
    assert (aborted.version, aborted.canary, aborted.shadow) == ("1", None, None)


def test_canary_refusals(repo: Repository, tmp_path) -> None:
    publish(repo, tmp_path, "1", factor=1)
    with pytest.raises(AliasNotFound):
        repo.move_alias("m", "production", SetCanary("1", 5))
    repo.move_alias("m", "production", SetTarget("1"))
    with pytest.raises(InvalidRequest, match="already points at 1"):
        repo.move_alias("m", "production", SetCanary("1", 5))
    with pytest.raises(InvalidRequest, match="no canary to promote"):
        repo.move_alias("m", "production", Promote())
    with pytest.raises(InvalidRequest, match="no canary or shadow"):
        repo.move_alias("m", "production", Abort())


def test_a_move_naming_a_missing_version_fails_before_the_alias_is_read(repo: Repository, tmp_path) -> None:
    publish(repo, tmp_path, "1", factor=1)
    for move in (SetTarget("9"), SetCanary("9", 5), SetShadow("9", 0.5)):
        with pytest.raises(VersionNotFound):
            repo.move_alias("m", "production", move)
    assert repo.list_aliases("m") == []


# -- routing and figures ---------------------------------------------------------------------------
def test_random_routing_follows_the_weight() -> None:
    router = Router(random.Random(7))
    share = sum(router.to_canary(30, None) for _ in range(20_000)) / 20_000
    assert abs(share - 0.30) < 0.02


def test_a_sticky_key_always_gets_the_same_answer_and_keys_split_by_weight() -> None:
    router = Router(random.Random(1))
    keys = [f"caller-{i}" for i in range(5_000)]
    first = [router.to_canary(30, k) for k in keys]
    assert first == [router.to_canary(30, k) for k in keys]
    assert abs(sum(first) / len(keys) - 0.30) < 0.03
    # NOTE: raising the weight only moves callers towards the canary, never back.
    assert all(router.to_canary(50, k) for k, c in zip(keys, first, strict=True) if c)
    assert 0 <= sticky_bucket("x") < 100


def test_disagreement_for_classifiers_and_regressors() -> None:
    labels = {"predict": np.array([0, 1, 2])}
    assert not disagrees(labels, {"predict": np.array([0, 1, 2])}, 0.05)
    assert disagrees(labels, {"predict": np.array([0, 1, 1])}, 0.05)
    values = {"y": np.array([[10.0], [20.0]])}
    assert not disagrees(values, {"y": np.array([[10.4], [20.0]])}, 0.05)
    assert disagrees(values, {"y": np.array([[11.0], [20.0]])}, 0.05)
    assert disagrees(values, {"other": np.array([1.0])}, 0.05)


def test_figures_count_errors_and_a_cumulative_histogram() -> None:
    figures = Figures()
    for _ in range(99):
        figures.observe("1", 200, 0.002)
    figures.observe("1", 200, 0.2)
    figures.observe("1", 400, 0.001)
    snap = figures.snapshot()["1"]
    assert (snap["requests"], snap["errors"], snap["buckets"][-1]) == (101, 1, 100)
    p99 = quantile(snap["buckets"], 0.99)
    assert p99 is not None
    assert 0.001 < p99 <= 0.0025
    assert quantile(snap["buckets"], 1.0) == pytest.approx(0.25)
    total = merge([figures.snapshot(), figures.snapshot()])["1"]
    assert (total["requests"], total["buckets"][-1]) == (202, 200)


def failures() -> float:
    return (
        REGISTRY.get_sample_value("serving_swap_failures_total", {"model": "m", "reason": "LoadError"}) or 0.0
    )


# -- the watcher and the slot -----------------------------------------------------------------------
def test_the_watcher_loads_the_canary_beside_live_and_promote_adopts_it(repo, cache, tmp_path) -> None:
    publish(repo, tmp_path, "1", factor=1)
    publish(repo, tmp_path, "2", factor=2)
    repo.move_alias("m", "production", SetTarget("1"))
    slot, watcher = make(repo, cache, Clock())
    watcher.start()
    watcher.tick()
    assert watcher.split.canary_weight == 0
    repo.move_alias("m", "production", SetCanary("2", 30))
    watcher.tick()
    canary = slot.companion("canary")
    assert canary is not None
    assert canary.version == "2"
    assert watcher.split.canary_weight == 30
    assert watcher.status().canary == {"version": "2", "weight": 30, "loaded": True, "error": None}
    repo.move_alias("m", "production", Promote())
    watcher.tick()
    assert slot.live is canary  # NOTE: the loaded canary itself, not a second load
    assert slot.companion("canary") is None
    assert watcher.split.canary_weight == 0


def test_abort_drops_the_canary_and_live_keeps_serving(repo, cache, tmp_path) -> None:
    publish(repo, tmp_path, "1", factor=1)
    publish(repo, tmp_path, "2", factor=2)
    repo.move_alias("m", "production", SetTarget("1"))
    slot, watcher = make(repo, cache, Clock())
    watcher.start()
    repo.move_alias("m", "production", SetCanary("2", 50))
    watcher.tick()
    canary = slot.companion("canary")
    assert canary is not None
    repo.move_alias("m", "production", Abort())
    watcher.tick()
    assert slot.companion("canary") is None
    assert canary.predictor.closed
    assert slot.version == "1"
    assert watcher.split.canary_weight == 0


def test_a_canary_that_fails_to_load_takes_no_traffic_and_is_reported(repo, cache, tmp_path) -> None:
    publish(repo, tmp_path, "1", factor=1)
    publish(repo, tmp_path, "2", factor=-1)  # NOTE: explodes on warm-up
    repo.move_alias("m", "production", SetTarget("1"))
    clock = Clock()
    slot, watcher = make(repo, cache, clock)
    watcher.start()
    before = failures()
    repo.move_alias("m", "production", SetCanary("2", 30))
    watcher.tick()
    assert slot.companion("canary") is None
    assert watcher.split.canary_weight == 0
    status = watcher.status().canary
    assert status is not None
    assert status["loaded"] is False
    assert "2:" in str(status["error"])
    assert failures() == before + 1
    watcher.tick()  # NOTE: within the backoff: no second attempt
    assert failures() == before + 1
    assert slot.version == "1"


# -- rollout decisions -------------------------------------------------------------------------------
def _figures(requests: int, errors: int, fast: int) -> dict[str, Any]:
    """Cumulative figures: ``fast`` answered requests at 2 ms, the other answered ones at 200 ms."""
    f = Figures()
    for i in range(requests):
        status = 500 if i < errors else 200
        f.observe("v", status, 0.002 if i < errors + fast else 0.2)
    return f.snapshot()["v"]


def test_a_window_is_the_difference_of_two_snapshots() -> None:
    before, after = {"2": _figures(10, 1, 9)}, {"2": _figures(30, 4, 26)}
    w = window(before, after, "2")
    assert (w.requests, w.errors, w.buckets[-1]) == (20, 3, 17)
    assert window(before, after, "9").requests == 0


def test_judge_canary_on_errors_traffic_and_latency() -> None:
    t = Thresholds(max_error_ratio=0.05, max_p99_ratio=2.0, min_requests=20)
    healthy, live = window({}, {"c": _figures(50, 1, 49)}, "c"), window({}, {"l": _figures(500, 5, 495)}, "l")
    assert judge_canary(healthy, live, t) == ""
    failing = window({}, {"c": _figures(6, 6, 0)}, "c")
    assert "canary error ratio 100.0% (6/6)" in judge_canary(failing, live, t)
    quiet = window({}, {"c": _figures(5, 0, 5)}, "c")
    assert "fewer than --min-requests 20" in judge_canary(quiet, live, t)
    slow = window({}, {"c": _figures(50, 0, 0)}, "c")
    assert "--max-p99-ratio 2" in judge_canary(slow, live, t)


def test_judge_shadow_on_disagreement() -> None:
    t = Thresholds(max_disagreement=0.1, min_requests=10)
    live = Window(requests=100)
    assert judge_shadow(Window(requests=100, compared=100, disagreed=5), live, t) == ""
    assert "disagreement 20.0% (20/100)" in judge_shadow(
        Window(requests=100, compared=100, disagreed=20), live, t
    )
    assert "fewer than --min-requests 10" in judge_shadow(Window(requests=3, compared=3), live, t)


def test_judge_canary_on_its_agreement_with_the_live_version() -> None:
    t = Thresholds(max_disagreement=0.1, min_requests=10)
    live = Window(requests=100)
    assert judge_canary(Window(requests=40, compared=40, disagreed=4), live, t) == ""
    why = judge_canary(Window(requests=40, compared=40, disagreed=8), live, t)
    assert "canary disagreement 20.0% (8/40) with the live version" in why
    # NOTE: a few comparisons are enough to stop a canary that answers differently ...
    assert "canary disagreement" in judge_canary(Window(requests=3, compared=3, disagreed=3), live, t)
    # ... and with the check off (no comparisons) the step is judged on the rest.
    assert judge_canary(Window(requests=40), live, t) == ""
