"""A rollout promotes only what it judged, with a second writer racing it (issue 22).

The second writer moves the alias at a random point of the rollout, in one of the
ways an operator would; every rollout must either promote exactly its version over
the target it measured, or stop non-zero naming what the other writer holds.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_slot_watcher import publish

from serving.errors import AliasChanged, InvalidRequest, RolloutAborted
from serving.repository import Abort, AliasMove, Promote, Repository, SetCanary, SetShadow, SetTarget
from serving.rollout import LATENCY_BUCKETS, Rollout
from serving.store.local import LocalStore


class Healthy:
    """Every version answers 100 fast requests per snapshot, none failed, all agreeing."""

    def __init__(self) -> None:
        self.calls = 0

    def figures(self) -> dict[str, dict[str, Any]]:
        self.calls += 1
        n = 100 * self.calls
        row = {"requests": n, "errors": 0, "compared": n, "disagreed": 0}
        row["buckets"] = [n] + [0] * len(LATENCY_BUCKETS)
        return {v: dict(row) for v in ("1", "2", "3")}

    def applied(self, role: str, version: str, share: float) -> tuple[bool, str]:
        return True, ""


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    repo = Repository(LocalStore(str(tmp_path / "store")))
    for v in ("1", "2", "3"):
        publish(repo, tmp_path, v, factor=int(v))
    return repo


OTHER_MOVES: dict[str, Callable[[], AliasMove]] = {
    "canary 3 over the rollout's (--replace)": lambda: SetCanary("3", 50, replace=True),
    "canary 3 (no --replace)": lambda: SetCanary("3", 50),
    "shadow 3 (--replace)": lambda: SetShadow("3", 1.0, replace=True),
    "target 3": lambda: SetTarget("3"),
    "abort": lambda: Abort(),
}


def test_twenty_races_never_promote_an_unjudged_version(repo: Repository) -> None:
    rng = random.Random(20)
    outcomes = []
    for round_ in range(20):
        repo.move_alias("m", "production", SetTarget("1"), by="operator")
        what = rng.choice(sorted(OTHER_MOVES))
        when = rng.randrange(1, 5)  # during the shadow phase, a canary step, or right before promote
        sleeps = 0

        def sleep(seconds: float, what: str = what, when: int = when) -> None:
            nonlocal sleeps
            sleeps += 1
            if sleeps == when:
                # NOTE: when the other writer is the one refused, the rollout goes on.
                with contextlib.suppress(AliasChanged, InvalidRequest):
                    repo.move_alias("m", "production", OTHER_MOVES[what](), by="other-writer")

        rollout = Rollout(repo, "m", "production", "2", Healthy(), sleep=sleep, poll_s=0)
        stopped = _run(rollout)
        if stopped is not None:
            final = repo.get_alias("m", "production")
            assert final.version != "2" or final.updated_by == "other-writer", (round_, what, final)
            assert "other-writer" in stopped, (round_, what, stopped)
            # NOTE: and its own unjudged version takes no traffic any more; the other's stays.
            assert "2" not in {x.version for x in (final.canary, final.shadow) if x is not None}, final
            outcomes.append(("stopped", what))
        else:
            final = repo.get_alias("m", "production")
            assert (final.version, final.history[-1].version) == ("2", "1"), (round_, what, final)
            assert final.canary is None
            outcomes.append(("promoted", what))
        repo.move_alias("m", "production", SetTarget("1"), by="operator")
    assert {o for o, _ in outcomes} == {"stopped", "promoted"}, outcomes


def _run(rollout: Rollout) -> str | None:
    """None when the rollout promoted, else the message it stopped with."""
    try:
        rollout.run([25, 50, 100], step_seconds=1, shadow_seconds=1)
    except (AliasChanged, RolloutAborted, InvalidRequest) as exc:
        return exc.message
    return None


def test_promote_and_abort_refuse_a_canary_they_did_not_expect(repo: Repository) -> None:
    repo.move_alias("m", "production", SetTarget("1"))
    repo.move_alias("m", "production", SetCanary("2", 10), by="rollout")
    with pytest.raises(AliasChanged, match=r"its canary is 2 \(set by rollout at .*\), not 3"):
        repo.move_alias("m", "production", SetCanary("3", 50))
    replaced = repo.move_alias("m", "production", SetCanary("3", 50, replace=True), by="other")
    before = replaced.seq
    with pytest.raises(AliasChanged, match=r"its canary is 3 \(set by other"):
        repo.move_alias("m", "production", Promote(expected="2"))
    with pytest.raises(AliasChanged, match="its canary is 3"):
        repo.move_alias("m", "production", Abort(expected="2"))
    with pytest.raises(AliasChanged, match="its target is 1"):
        repo.move_alias("m", "production", Promote(expected="3", live="7"))
    assert repo.get_alias("m", "production").seq == before  # nothing was written
    assert repo.move_alias("m", "production", Promote(expected="3", live="1")).version == "3"


def test_schema_change_lets_through_only_what_every_live_request_still_fits() -> None:
    from serving.manifest import TensorSpec
    from serving.rollout import schema_change

    def spec(shape: list[int], name: str = "x", datatype: str = "FP64") -> list[TensorSpec]:
        return [TensorSpec(name=name, datatype=datatype, shape=shape)]

    assert schema_change(spec([-1, 4]), spec([-1, 4])) == ""
    assert schema_change(spec([-1, 4]), spec([-1, -1])) == ""  # more general is fine
    assert "shape [-1, 5]" in schema_change(spec([-1, 4]), spec([-1, 5]))
    assert "shape [-1, 4]" in schema_change(spec([-1, -1]), spec([-1, 4]))  # narrower is not
    assert "shape [-1, 4, 1]" in schema_change(spec([-1, 4]), spec([-1, 4, 1]))
    assert "FP32" in schema_change(spec([-1, 4]), spec([-1, 4], datatype="FP32"))
    assert "inputs are ['y']" in schema_change(spec([-1, 4]), spec([-1, 4], name="y"))


def test_a_stopped_rollout_withdraws_its_own_canary_and_keeps_the_other_writers_shadow(
    repo: Repository,
) -> None:
    """Found in review: a shadow added by an operator mid-step stopped the rollout (right), and
    its cleanup was then refused, leaving its unjudged canary at 25% for good."""
    repo.move_alias("m", "production", SetTarget("1"))
    sleeps = 0

    def sleep(_: float) -> None:
        nonlocal sleeps
        sleeps += 1
        if sleeps == 2:  # NOTE: during the first canary step
            repo.move_alias("m", "production", SetShadow("3", 0.1), by="operator")

    assert "operator" in (_run(Rollout(repo, "m", "production", "2", Healthy(), sleep=sleep, poll_s=0)) or "")
    final = repo.get_alias("m", "production")
    assert (final.version, final.canary) == ("1", None)
    assert final.shadow is not None
    assert final.shadow.version == "3"


def test_a_rollout_whose_write_answer_was_lost_still_withdraws_its_canary(repo: Repository) -> None:
    """Found in review: the store wrote the canary and the answer was lost; the cleanup used
    the stale sequence, was refused, and the canary stayed."""
    from serving.errors import StoreUnavailable

    repo.move_alias("m", "production", SetTarget("1"))
    real_put = repo.store.put
    writes = 0

    def put(key: str, data: bytes, **kwargs: Any) -> None:
        nonlocal writes
        real_put(key, data, **kwargs)
        if key.endswith("aliases/production.json"):
            writes += 1
            if writes == 3:  # NOTE: shadow, drop the shadow, canary 25: this answer is lost
                raise StoreUnavailable("connection reset after the write (test)")

    repo.store.put = put  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable):
        Rollout(repo, "m", "production", "2", Healthy(), sleep=lambda _: None, poll_s=0).run(
            [25, 50, 100], step_seconds=1, shadow_seconds=1
        )
    repo.store.put = real_put  # type: ignore[method-assign]
    final = repo.get_alias("m", "production")
    assert (final.version, final.canary, final.shadow) == ("1", None, None)


class FailsCanaryAt(Healthy):
    """Healthy, except that the candidate fails every request once its canary reaches ``weight``."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight
        self.canary = 0.0

    def applied(self, role: str, version: str, share: float) -> tuple[bool, str]:
        if role == "canary":
            self.canary = share
        return True, ""

    def figures(self) -> dict[str, dict[str, Any]]:
        out = super().figures()
        if self.canary >= self.weight:
            out["2"]["errors"] = out["2"]["requests"]
        return out


def test_each_step_promotion_and_abort_is_recorded_in_the_alias_with_what_was_judged(
    repo: Repository,
) -> None:
    repo.move_alias("m", "production", SetTarget("1"), by="operator")
    Rollout(repo, "m", "production", "2", Healthy(), sleep=lambda _: None, poll_s=0).run(
        [25, 100], step_seconds=1, shadow_seconds=1
    )
    promoted = repo.get_alias("m", "production")
    events = [(e.event, e.version) for e in promoted.events or []]
    # The shadow set, the shadow dropped once it passed, two canary steps, the promotion.
    assert events == [("shadow", "2"), ("shadow", "2"), ("canary", "2"), ("canary", "2"), ("promoted", "2")]
    details = [e.detail for e in promoted.events or []]
    assert details[1].startswith("shadow passed: shadow 2 at 100% of requests")
    assert "canary 100%" in details[3]
    assert "after canary 2 at 25%" in details[3]
    assert "canary 2 at 100%" in details[4]
    assert details[4].endswith("-> ok")
    # Each event carries the sequence of the write it came with: one write, one event.
    assert promoted.events is not None
    assert promoted.events[-1].sequence == promoted.seq

    # An abort keeps the history of the promotion before it, and says why.
    repo.move_alias("m", "production", SetTarget("1"), by="operator")
    with pytest.raises(RolloutAborted):
        Rollout(repo, "m", "production", "2", FailsCanaryAt(50), sleep=lambda _: None, poll_s=0).run(
            [25, 50, 100], step_seconds=1
        )
    aborted = repo.get_alias("m", "production")
    assert aborted.version == "1"
    assert aborted.canary is None
    last = (aborted.events or [])[-1]
    assert (last.event, last.version) == ("aborted", "2")
    assert "error" in last.detail
    assert [e.event for e in aborted.events or []].count("promoted") == 1
