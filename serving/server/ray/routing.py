"""Routing by model on the Ray path: a model-set member's requests go to the replicas that own it.

Behind HAProxy (the chart's path) a request lands on any single-hop replica; HAProxy
cannot pick one by the model the path names. So the replica it lands on decides:

- it is one of the member's **owners**: it answers from its own pool (loading the
  member on its first request);
- otherwise it sends the typed request to the owners through a handle to its own
  deployment (:class:`Forward`). The owners are the first ``width`` (:func:`width`) of
  the live replicas ranked for the member by rendezvous hashing (:func:`rank`);
  :class:`ModelAffinityRouter`, this deployment's Ray request router, picks the least
  busy of them. The owner answers from its pool and never forwards again.

Metadata, a readiness check for one version, and a load request go to the owners the
same way; an unload goes to every replica the board says holds the member, each by its
replica id (:data:`TARGETED_METHODS`).

So each member is loaded by its owners only, and R replicas hold about R budgets' worth
of distinct members. A replica learns the live replicas from its router
(:class:`Ownership`, one per process), so its first forward comes before it knows them.

Rendezvous hashing moves only the members of a replica that came or went. A hot member
gets one more owner per ``pool.owner_rps`` requests per second, estimated by each
replica from the requests it forwards (:class:`Rates`); past its owners, the rest of the
ranking is a fallback, in order, for a replica whose queue is full. A forward that
cannot reach its replica (it died meanwhile), or one past the bound of forwards out at
once (:class:`Forward`), is answered here instead.

Tried and left: Ray 2.60's ingress request router (HAProxy asks a router deployment
which replica takes each request). HAProxy passes it only the session header and the
request id, not the path that names the model, and it costs one more HTTP round trip
through a Python process per request; see the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from serving import metrics
from serving.dataplane import ModelPort
from serving.protocol.types import InferRequest, InferResponse, ModelMetadata
from serving.server.local import PooledModels

log = logging.getLogger(__name__)

ROUTED_METHODS = frozenset({"routed_infer", "routed_metadata", "routed_ready", "routed_load"})
"""The replica methods a forward calls; each takes the member's name first."""
TARGETED_METHODS = frozenset({"routed_unload"})
"""The replica methods sent to one named replica: each takes the member's name, then the
replica's id (a replica that is not that one does nothing)."""


def _score(model: str, replica: str) -> int:
    digest = hashlib.blake2b(f"{model}\x00{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(model: str, replicas: Sequence[str]) -> list[str]:
    """The replicas in ``model``'s rendezvous order (highest random weight first).

    Every router that sees the same replicas ranks them the same; a replica that leaves
    moves only the members it ranked first for, and one that joins takes about 1/R of them.
    """
    return sorted(replicas, key=lambda replica: _score(model, replica), reverse=True)


def width(rate: float, replicas: int, owner_rps: float) -> int:
    """How many owners a member with ``rate`` requests per second gets among ``replicas``."""
    if replicas <= 1:
        return replicas
    return min(replicas, max(1, math.ceil(rate / owner_rps)))


class Rates:
    """Requests per second per member, decayed with time constant ``tau_s``; bounded.

    A member not seen for a while is dropped first when more than ``max_models`` are tracked.
    """

    def __init__(self, tau_s: float = 5.0, max_models: int = 10_000) -> None:
        self.tau_s = tau_s
        self.max_models = max_models
        self._lock = threading.Lock()
        self._state: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def note(self, model: str, now: float | None = None) -> float:
        """Count one request for ``model``; returns its rate, in requests per second."""
        now = time.monotonic() if now is None else now
        with self._lock:
            value, then = self._state.pop(model, (0.0, now))
            value = value * math.exp(-max(0.0, now - then) / self.tau_s) + 1.0
            self._state[model] = (value, now)
            while len(self._state) > self.max_models:
                self._state.popitem(last=False)
        return value / self.tau_s

    def rate(self, model: str, now: float | None = None) -> float:
        """``model``'s rate now, without counting a request."""
        now = time.monotonic() if now is None else now
        with self._lock:
            value, then = self._state.get(model, (0.0, now))
        return value * math.exp(-max(0.0, now - then) / self.tau_s) / self.tau_s


class Ownership:
    """Which replicas own each member, as this process sees it: the live replicas (from
    this deployment's router) and each member's rate (from this replica's forwards).

    One per process, shared by the router and the ports: a replica that is itself one of
    a member's owners answers it here, with no hop through Ray to itself.
    """

    def __init__(self, owner_rps: float = 200.0) -> None:
        self.owner_rps = owner_rps
        self.rates = Rates()
        self.replicas: list[str] = []
        """The live replicas' ids; empty until this replica's router first saw them."""

    def owners(self, model: str, *, count: bool = False) -> list[str]:
        """The member's owners, first choice first; ``count``: count this request in its rate.

        The rate this replica sees is its share of the member's requests that HAProxy sent
        it: about 1 in R of them, so R times it estimates the member's."""
        replicas = self.replicas
        rate = self.rates.note(model) if count else self.rates.rate(model)
        ranked = rank(model, replicas)
        return ranked[: width(rate * len(ranked), len(ranked), self.owner_rps)]


OWNERSHIP = Ownership()
"""This process's view (a replica process serves one deployment)."""


def _ownership() -> Ownership:
    # NOTE: looked up, not referenced: Serve may pickle the router class by value, with the
    # globals its methods name, and this one holds locks (and must be the process's own).
    ownership: Ownership = sys.modules[__name__].OWNERSHIP
    return ownership


class ModelAffinityRouter(RequestRouter):
    """Ray request router of the single-hop deployment: a forward goes to its member's owners.

    A forward (a call of one of :data:`ROUTED_METHODS`) is routed by the member it names:
    first rank the member's ``width`` owners (Ray picks the one with the shortest queue
    that has room), then each other replica in the member's rendezvous order. Anything
    else (the Serve proxy's HTTP requests, when HAProxy is off) gets Ray's usual choice
    between two random replicas.
    """

    def initialize_state(self, owner_rps: float = 200.0, **kwargs: Any) -> None:
        _ownership().owner_rps = float(owner_rps)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        _ownership().replicas = [r.replica_id.unique_id for r in replicas]

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # NOTE: every replica worth trying is in these ranks; when none has room, Ray
            # waits before the next round instead of probing them all again at once.
            pending_request.routing_context.should_backoff = True
        target = _target_of(pending_request)
        if target:
            # NOTE: the named replica, or, if it is gone, any one: it answers that it is not it.
            named = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            return [named or random.sample(candidate_replicas, min(1, len(candidate_replicas)))]
        model = _member_of(pending_request)
        if not model:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranked = [by_id[i] for i in rank(model, list(by_id))]
        ownership = _ownership()
        wanted = width(ownership.rates.rate(model) * len(ranked), len(ranked), ownership.owner_rps)
        # NOTE: shuffled: Ray takes the first of equally short queues, so an idle second
        # owner would otherwise never be picked.
        return [random.sample(ranked[:wanted], wanted), *([r] for r in ranked[wanted:])]


def _member_of(pending_request: PendingRequest | None) -> str:
    if pending_request is None or pending_request.metadata.call_method not in ROUTED_METHODS:
        return ""
    args = pending_request.args
    return args[0] if args and isinstance(args[0], str) else ""


def _target_of(pending_request: PendingRequest | None) -> str:
    if pending_request is None or pending_request.metadata.call_method not in TARGETED_METHODS:
        return ""
    args = pending_request.args
    return args[1] if len(args) > 1 and isinstance(args[1], str) else ""


def router_config(owner_rps: float) -> dict[str, Any]:
    """The single-hop deployment's ``request_router_config`` when it routes by model."""
    return {
        "request_router_class": f"{__name__}:{ModelAffinityRouter.__name__}",
        "request_router_kwargs": {"owner_rps": owner_rps},
    }


UNLOAD_TIMEOUT_S = 10.0
"""How long an unload waits for each other holder (a dead one is given up on)."""

_UNREACHABLE = (ActorDiedError, ActorUnavailableError, DeploymentUnavailableError)
"""The forward's replica (or the deployment's routing) went away: this replica answers instead."""


class Forward:
    """Sends a member's request to its owners: a handle to this replica's own deployment.

    At most ``max_in_flight`` forwards are out at once; past that, :meth:`room` is False
    and the replica answers itself. NOTE: a forward holds a slot here while it waits for
    one at the owner, and requests from HAProxy take the owner's freed slots first; with
    every slot of two replicas waiting on the other, neither would move. The bound keeps
    the other half of this replica's slots for requests it answers itself.
    """

    def __init__(self, app_name: str, deployment: str, max_in_flight: int) -> None:
        # NOTE: no check that the deployment exists: that is a blocking call to Serve's
        # controller, on the replica's loop. It is this replica's own deployment.
        self._handle: Any = serve.get_deployment_handle(deployment, app_name, _check_exists=False)
        self.max_in_flight = max(1, max_in_flight)
        self._in_flight = 0

    def room(self) -> bool:
        return self._in_flight < self.max_in_flight

    @contextlib.contextmanager
    def _out(self) -> Iterator[None]:
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1

    async def infer(self, name: str, request: InferRequest) -> InferResponse:
        with self._out():
            response: InferResponse = await self._handle.routed_infer.remote(name, request)
        return response

    async def metadata(self, name: str, version: str | None) -> ModelMetadata:
        with self._out():
            meta: ModelMetadata = await self._handle.routed_metadata.remote(name, version)
        return meta

    async def ready(self, name: str, version: str | None) -> bool:
        with self._out():
            return bool(await self._handle.routed_ready.remote(name, version))

    async def load(self, name: str, timeout: float) -> bool:
        with self._out():
            return bool(await self._handle.routed_load.remote(name, timeout))

    async def unload(self, name: str, replica: str, timeout: float) -> bool:
        """Unload ``name`` on ``replica`` alone; whether it held it.

        NOTE: neither bounded by nor counted in :meth:`room`: an operator's call, one per
        holder. Bounded in time instead: a replica that died and that Ray has not dropped
        yet stays its only candidate, and Ray would retry it until it does.
        """
        return bool(await asyncio.wait_for(self._handle.routed_unload.remote(name, replica), timeout))


class RoutedModel:
    """The model port of a member on a replica that routes by model (see the module doc)."""

    def __init__(
        self,
        local: ModelPort,
        name: str,
        forward: Forward,
        replica: str,
        ownership: Ownership = OWNERSHIP,
    ) -> None:
        self._local = local
        self.name = name
        self._forward = forward
        self._replica = replica
        self._ownership = ownership

    def _here(self, *, count: bool = False) -> bool:
        """Whether this replica answers: it owns the member, or may not forward now.

        NOTE: owning, not holding: a copy on a replica that no longer owns the member (its
        hot spell ended, a replica joined, the owner's queue was full once) gets no more
        requests, so the pool's LRU drops it and the density comes back."""
        return self._replica in self._ownership.owners(self.name, count=count) or not self._forward.room()

    async def infer(self, request: InferRequest) -> InferResponse:
        if not self._here(count=True):
            try:
                response = await self._forward.infer(self.name, request)
            except _UNREACHABLE as exc:
                log.warning("forward of %s failed (%s); answering here", self.name, type(exc).__name__)
            else:
                metrics.POOL_LOOKUPS.inc(result="forwarded")
                return response
        return await self._local.infer(request)

    async def metadata(self, version: str | None) -> ModelMetadata:
        if not self._here():
            try:
                return await self._forward.metadata(self.name, version)
            except _UNREACHABLE as exc:
                log.warning("forward of %s failed (%s); answering here", self.name, type(exc).__name__)
        return await self._local.metadata(version)

    async def refused(self, version: str | None, status: int) -> None:
        await self._local.refused(version, status)

    async def ready(self, version: str | None) -> bool:
        """Whether it could answer now. NOTE: a version is asked of the owners, which hold it;
        with no version, any replica answers (the member loads on its first request)."""
        if version is not None and not self._here():
            try:
                return await self._forward.ready(self.name, version)
            except _UNREACHABLE as exc:
                log.warning("forward of %s failed (%s); answering here", self.name, type(exc).__name__)
        return await self._local.ready(version)

    async def status(self) -> dict[str, Any]:
        return await self._local.status()


class RoutedSets:
    """A replica's model sets, routed by model: members' ports are :class:`RoutedModel`, a
    load request goes to the member's owners too, and an unload to every replica holding it."""

    def __init__(
        self, local: PooledModels, forward: Forward, replica: str, ownership: Ownership = OWNERSHIP
    ) -> None:
        self.local = local
        self._forward = forward
        self._replica = replica
        self._ownership = ownership

    def port(self, name: str) -> RoutedModel | None:
        local = self.local.port(name)
        if local is None:
            return None
        return RoutedModel(local, name, self._forward, self._replica, self._ownership)

    async def load(self, name: str, timeout: float) -> bool:
        if self._replica not in self._ownership.owners(name) and self._forward.room():
            try:
                return await self._forward.load(name, timeout)
            except _UNREACHABLE as exc:
                log.warning("forward of %s failed (%s); loading here", name, type(exc).__name__)
        return await self.local.load(name, timeout)

    async def unload(self, name: str) -> bool:
        """Unload ``name`` here and on every other replica the board says holds it; whether any did.

        NOTE: the board's rows are the holders' own reports, sent when a member loads: one
        that loaded after this read is not unloaded (its copy ages out of the LRU, as any)."""
        try:
            others = sorted(set((await self.local.snapshot()).get(name, {})) - {self._replica})
        except Exception:  # NOTE: no board (restarting): this replica's copy still goes
            log.warning("unload of %s: the board did not answer; unloading here only", name, exc_info=True)
            others = []
        results = await asyncio.gather(
            self.local.unload(name),
            *(self._forward.unload(name, replica, UNLOAD_TIMEOUT_S) for replica in others),
            return_exceptions=True,
        )
        unloaded = False
        for replica, result in zip([self._replica, *others], results, strict=True):
            if isinstance(result, (*_UNREACHABLE, TimeoutError)):
                log.warning("unload of %s on %s failed (%s)", name, replica, type(result).__name__)
            elif isinstance(result, BaseException):
                raise result
            else:
                unloaded = unloaded or bool(result)
        return unloaded

    async def snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        return await self.local.snapshot()
