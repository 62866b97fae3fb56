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
