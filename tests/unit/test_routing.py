"""Routing by model on the Ray path: rendezvous ranks, owner counts, and when a replica forwards.

The replica side runs against Ray Serve in
``tests/integration/serve/test_ray_model_sets.py``; here are the decisions alone.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest
from ray.exceptions import ActorDiedError

from serving.protocol.types import InferRequest, InferResponse
from serving.server.ray.routing import Ownership, Rates, RoutedModel, rank, width


def test_every_router_ranks_the_same_and_a_leaving_replica_moves_only_its_own_members() -> None:
    replicas = [f"r{i}" for i in range(5)]
    members = [f"m{i}" for i in range(2000)]
    first = {m: rank(m, replicas)[0] for m in members}
    assert first == {m: rank(m, list(reversed(replicas)))[0] for m in members}
    # NOTE: about 1 in 5 each; a modulo of a hash would do as well on this count alone.
    assert all(300 < n < 500 for n in Counter(first.values()).values()), Counter(first.values())
    after = {m: rank(m, [r for r in replicas if r != "r2"])[0] for m in members}
    moved = {m for m in members if after[m] != first[m]}
    assert moved == {m for m in members if first[m] == "r2"}
    # NOTE: a member's second choice is where it goes when its first leaves.
    assert all(after[m] == rank(m, replicas)[1] for m in moved)


@pytest.mark.parametrize(
    ("rate", "replicas", "owners"),
    [(0.0, 4, 1), (199.0, 4, 1), (201.0, 4, 2), (650.0, 4, 4), (10_000.0, 4, 4), (50.0, 1, 1)],
)
def test_a_member_gets_one_more_owner_per_owner_rps_up_to_every_replica(
    rate: float, replicas: int, owners: int
) -> None:
    assert width(rate, replicas, owner_rps=200.0) == owners


def test_rates_follow_a_steady_stream_and_decay_when_it_stops() -> None:
    rates = Rates(tau_s=5.0)
    now = 0.0
    rate = 0.0
    for _ in range(500):  # NOTE: 20 a second for 25 s
        now += 0.05
        rate = rates.note("m", now)
    assert 18.0 < rate < 21.0
    later = rates.note("m", now + 25.0)
    assert later < 0.5


def test_a_hot_member_counts_more_owners_as_this_replica_forwards_more_of_it() -> None:
    ownership = Ownership(owner_rps=10.0)
    ownership.replicas = ["a", "b", "c", "d"]
    assert len(ownership.owners("m", count=True)) == 1
    for _ in range(40):
        owners = ownership.owners("m", count=True)
    # NOTE: 40 at once is a rate of 8/s here, 32/s over 4 replicas: 4 owners at 10/s each.
    assert owners == rank("m", ownership.replicas)
    assert ownership.owners("m") == owners  # NOTE: reading does not count


def test_rates_forget_the_longest_unseen_member_past_their_bound() -> None:
    rates = Rates(tau_s=5.0, max_models=2)
    for name in ("a", "b", "a", "c"):
        rates.note(name, 0.0)
    # NOTE: "b" was dropped ("a" was seen after it): seen again, it starts from one request.
    assert rates.note("b", 0.0) == pytest.approx(1 / 5.0)
    # NOTE: "c" was kept and counts on; "a" went to make room for "b".
    assert rates.note("c", 0.0) == pytest.approx(2 / 5.0)
    assert rates.note("a", 0.0) == pytest.approx(1 / 5.0)


class _Port:
    def __init__(self, where: str) -> None:
        self.where = where
        self.calls = 0

    async def infer(self, request: InferRequest) -> InferResponse:
        self.calls += 1
        return InferResponse(model=request.model, version=self.where, id="", outputs={})


class _Forward:
    def __init__(self, error: Exception | None = None, room: bool = True) -> None:
        self.error = error
        self.sent: list[str] = []
        self._room = room

    def room(self) -> bool:
        return self._room

    async def infer(self, name: str, request: InferRequest) -> InferResponse:
        self.sent.append(name)
        if self.error is not None:
            raise self.error
        return InferResponse(model=name, version="owner", id="", outputs={})


def _request(name: str) -> InferRequest:
    return InferRequest(model=name, inputs={"x": np.zeros((1, 4))})


def _answer(
    forward: _Forward, name: str = "m", replicas: tuple[str, ...] = ("a", "b", "c")
) -> tuple[str, _Port]:
    """Where replica ``a`` answers ``name`` from, and its local port."""
    ownership = Ownership(owner_rps=200.0)
    ownership.replicas = list(replicas)
    local = _Port("here")
    port = RoutedModel(local, name, forward, "a", ownership)  # type: ignore[arg-type]
    response = asyncio.run(port.infer(_request(name)))
    return response.version, local


def _owned_by(replica: str, replicas: tuple[str, ...] = ("a", "b", "c")) -> str:
    return next(f"m{i}" for i in range(1000) if rank(f"m{i}", replicas)[0] == replica)


def test_a_member_another_replica_owns_goes_there_and_one_this_replica_owns_stays_here() -> None:
    forward = _Forward()
    other, mine = _owned_by("b"), _owned_by("a")
    where, local = _answer(forward, other)
    assert (where, local.calls, forward.sent) == ("owner", 0, [other])
    where, local = _answer(forward, mine)
    assert (where, local.calls, forward.sent) == ("here", 1, [other])


def test_past_the_bound_of_forwards_out_at_once_a_replica_answers_itself() -> None:
    forward = _Forward(room=False)
    where, local = _answer(forward, _owned_by("b"))
    assert (where, local.calls, forward.sent) == ("here", 1, [])


def test_forwards_out_at_once_are_counted_until_each_ends() -> None:
    from serving.server.ray.routing import Forward

    class _Method:
        def __init__(self) -> None:
            self.release = asyncio.Event()

        async def remote(self, *args: object) -> InferResponse:
            await self.release.wait()
            return InferResponse(model="m", version="owner", id="", outputs={})

    forward = Forward.__new__(Forward)
    forward.max_in_flight, forward._in_flight = 2, 0
    method = _Method()
    forward._handle = type("H", (), {"routed_infer": method})()

    async def scenario() -> list[bool]:
        seen = [forward.room()]
        tasks = [asyncio.create_task(forward.infer("m", _request("m"))) for _ in range(2)]
        await asyncio.sleep(0)
        seen.append(forward.room())
        method.release.set()
        await asyncio.gather(*tasks)
        seen.append(forward.room())
        return seen

    assert asyncio.run(scenario()) == [True, False, True]


def test_before_the_router_has_seen_the_replicas_a_member_not_held_is_forwarded() -> None:
    forward = _Forward()
    where, _ = _answer(forward, "m0", replicas=())
    assert (where, forward.sent) == ("owner", ["m0"])


def test_a_forward_whose_replica_died_is_answered_here() -> None:
    forward = _Forward(ActorDiedError())
    other = _owned_by("b")
    where, local = _answer(forward, other)
    assert (where, local.calls, forward.sent) == ("here", 1, [other])


def test_a_client_error_from_the_owner_reaches_the_client_and_is_not_answered_again() -> None:
    from serving.errors import InvalidInput

    forward = _Forward(InvalidInput("bad shape"))
    local = _Port("here")
    port = RoutedModel(local, "m", forward, "a", Ownership())  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        asyncio.run(port.infer(_request("m")))
    assert local.calls == 0


# -- the router's ranks, a targeted unload, a version's readiness ------------------------


class _Replica:
    def __init__(self, unique_id: str) -> None:
        self.replica_id = type("Id", (), {"unique_id": unique_id})()


class _Pending:
    def __init__(self, method: str, *args: object) -> None:
        self.metadata = type("Meta", (), {"call_method": method})()
        self.args = args
        self.routing_context = type("Ctx", (), {"should_backoff": False})()


def _ranks(monkeypatch: pytest.MonkeyPatch, pending: _Pending, ids: tuple[str, ...]) -> list[list[str]]:
    from serving.server.ray import routing

    monkeypatch.setattr(routing, "OWNERSHIP", Ownership(owner_rps=200.0))
    router = routing.ModelAffinityRouter.__new__(routing.ModelAffinityRouter)
    chosen = asyncio.run(router.choose_replicas([_Replica(i) for i in ids], pending))  # type: ignore[arg-type]
    assert pending.routing_context.should_backoff is True
    return [[r.replica_id.unique_id for r in group] for group in chosen]


def test_the_router_ranks_a_forward_by_its_member_owner_first_then_the_rest_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = ("a", "b", "c", "d")
    for method in ("routed_infer", "routed_metadata", "routed_ready", "routed_load"):
        ranks = _ranks(monkeypatch, _Pending(method, "m7", None), ids)
        assert ranks == [[r] for r in rank("m7", ids)], method
    # NOTE: the Serve proxy's own requests (HAProxy off): two random replicas, Ray's usual choice.
    ranks = _ranks(monkeypatch, _Pending("__call__", object()), ids)
    assert [len(group) for group in ranks] == [2]
    assert set(ranks[0]) <= set(ids)


def test_an_unload_goes_to_the_replica_it_names_or_any_one_when_that_one_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = ("a", "b", "c")
    assert _ranks(monkeypatch, _Pending("routed_unload", "m", "b"), ids) == [["b"]]
    gone = _ranks(monkeypatch, _Pending("routed_unload", "m", "z"), ids)
    assert [len(group) for group in gone] == [1]
    assert gone[0][0] in ids


class _Sets:
    """The local pool of replica ``a``: the board says ``holders`` hold ``m``."""

    def __init__(self, holders: list[str]) -> None:
        self.holders = holders
        self.unloaded: list[str] = []

    async def snapshot(self) -> dict[str, dict[str, dict[str, object]]]:
        return {"m": {r: {} for r in self.holders}}

    async def unload(self, name: str) -> bool:
        self.unloaded.append(name)
        return "a" in self.holders


class _Unloads:
    def __init__(
        self, dead: set[str], hung: frozenset[str] = frozenset(), broken: frozenset[str] = frozenset()
    ) -> None:
        self.dead, self.hung, self.broken = dead, hung, broken
        self.sent: list[tuple[str, str]] = []

    def room(self) -> bool:
        return False  # NOTE: an unload is sent anyway: one per holder, not bounded

    async def unload(self, name: str, replica: str, timeout: float) -> bool:
        self.sent.append((name, replica))
        if replica in self.dead:
            raise ActorDiedError()
        if replica in self.hung:
            raise TimeoutError()
        if replica in self.broken:
            raise RuntimeError("a bug at the holder")
        return True


def test_an_unload_reaches_every_holder_the_board_knows_and_a_dead_one_is_skipped() -> None:
    from serving.server.ray.routing import RoutedSets

    local, forward = _Sets(["a", "b", "c", "d", "e"]), _Unloads(dead={"d"}, hung=frozenset({"e"}))
    sets = RoutedSets(local, forward, "a", Ownership())  # type: ignore[arg-type]
    assert asyncio.run(sets.unload("m")) is True
    # NOTE: here, locally; every other holder through the router; never "a" through it.
    assert local.unloaded == ["m"]
    assert sorted(forward.sent) == [("m", "b"), ("m", "c"), ("m", "d"), ("m", "e")]
    # NOTE: a bug at a holder is not taken for an unreachable replica.
    sets = RoutedSets(_Sets(["b"]), _Unloads(dead=set(), broken=frozenset({"b"})), "a", Ownership())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="a bug at the holder"):
        asyncio.run(sets.unload("m"))
    # NOTE: held nowhere but on a dead replica: nothing was unloaded.
    local, forward = _Sets(["d"]), _Unloads(dead={"d"})
    sets = RoutedSets(local, forward, "a", Ownership())  # type: ignore[arg-type]
    assert asyncio.run(sets.unload("m")) is False


def test_a_version_s_readiness_is_asked_of_the_owner_and_no_version_is_answered_here() -> None:
    class _Ready(_Forward):
        async def ready(self, name: str, version: str | None) -> bool:
            self.sent.append(f"{name}@{version}")
            return True

    class _NotLoaded(_Port):
        async def ready(self, version: str | None) -> bool:
            return version is None

    ownership = Ownership()
    ownership.replicas = ["a", "b", "c"]
    other = _owned_by("b")
    forward = _Ready()
    port = RoutedModel(_NotLoaded("here"), other, forward, "a", ownership)  # type: ignore[arg-type]
    assert asyncio.run(port.ready("3")) is True
    assert asyncio.run(port.ready(None)) is True
    assert forward.sent == [f"{other}@3"]
