"""Routing by model on the Ray path: a model-set member's requests go to the replicas that own it.

Behind HAProxy (the chart's path) a request lands on any single-hop replica; HAProxy
cannot pick one by the model the path names. So the replica it lands on decides:

- it holds the member, or is loading it: it answers, as before;
- it does not: it sends the typed request to the member's **owners** through a handle
  to its own deployment (:class:`Forward`); :class:`ModelAffinityRouter`, this
  deployment's Ray request router, ranks the live replicas for the member by
  rendezvous hashing (:func:`rank`) and sends it to the least busy of the first
  ``width`` (:func:`width`), so each member is loaded by its owners only and R replicas
  hold about R budgets' worth of distinct members. The owner answers from its own pool
  (loading the member there on its first request) and never forwards again.

Rendezvous hashing moves only the members of a replica that came or went. A hot member
gets one more owner per ``pool.owner_rps`` requests per second, estimated by each
replica from the requests it forwards (:class:`Rates`); past its owners, the rest of the
ranking is a fallback, in order, for a replica whose queue is full. A forward that
cannot reach its replica (it died meanwhile) is answered here instead.

Tried and left: Ray 2.60's ingress request router (HAProxy asks a router deployment
which replica takes each request). HAProxy passes it only the session header and the
request id, not the path that names the model, and it costs one more HTTP round trip
through a Python process per request; see the README.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from serving import metrics
from serving.dataplane import ModelPort
from serving.protocol.types import InferRequest, InferResponse, ModelMetadata
from serving.runtime.pool import ModelPool
from serving.server.local import PooledModels

log = logging.getLogger(__name__)

ROUTED_METHODS = frozenset({"routed_infer", "routed_metadata", "routed_load"})
"""The replica methods a forward calls; each takes the member's name first."""


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


class ModelAffinityRouter(RequestRouter):
    """Ray request router of the single-hop deployment: a forward goes to its member's owners.

    A forward (a call of one of :data:`ROUTED_METHODS`) is routed by the member it names:
    first rank the member's ``width`` owners (Ray picks the one with the shortest queue
    that has room), then each other replica in the member's rendezvous order. Anything
    else (the Serve proxy's HTTP requests, when HAProxy is off) gets Ray's usual choice
    between two random replicas.
    """

    def initialize_state(self, owner_rps: float = 200.0, **kwargs: Any) -> None:
        self._owner_rps = float(owner_rps)
        self._rates = Rates()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        model = _member_of(pending_request)
        if not model:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranked = [by_id[i] for i in rank(model, list(by_id))]
        # NOTE: this replica sees the share of the member's requests that HAProxy sent it:
        # about 1 in R of them, so R times its own rate estimates the member's.
        wanted = width(self._rates.note(model) * len(ranked), len(ranked), self._owner_rps)
        # NOTE: shuffled: Ray takes the first of equally short queues, so an idle second
        # owner would otherwise never be picked.
        return [random.sample(ranked[:wanted], wanted), *([r] for r in ranked[wanted:])]


def _member_of(pending_request: PendingRequest | None) -> str:
    if pending_request is None or pending_request.metadata.call_method not in ROUTED_METHODS:
        return ""
    args = pending_request.args
    return args[0] if args and isinstance(args[0], str) else ""


def router_config(owner_rps: float) -> dict[str, Any]:
    """The single-hop deployment's ``request_router_config`` when it routes by model."""
    return {
        "request_router_class": f"{__name__}:{ModelAffinityRouter.__name__}",
        "request_router_kwargs": {"owner_rps": owner_rps},
    }


_UNREACHABLE = (ActorDiedError, ActorUnavailableError)
"""The forward's replica went away: this replica answers instead."""


class Forward:
    """Sends a member's request to its owners: a handle to this replica's own deployment."""

    def __init__(self, app_name: str, deployment: str) -> None:
        self._app_name = app_name
        self._deployment = deployment
        self._handle: Any = None

    def _get(self) -> Any:
        if self._handle is None:
            self._handle = serve.get_deployment_handle(self._deployment, self._app_name)
        return self._handle

    async def infer(self, name: str, request: InferRequest) -> InferResponse:
        response: InferResponse = await self._get().routed_infer.remote(name, request)
        return response

    async def metadata(self, name: str, version: str | None) -> ModelMetadata:
        meta: ModelMetadata = await self._get().routed_metadata.remote(name, version)
        return meta

    async def load(self, name: str, timeout: float) -> bool:
        return bool(await self._get().routed_load.remote(name, timeout))


class RoutedModel:
    """The model port of a member on a replica that routes by model (see the module doc)."""

    def __init__(self, local: ModelPort, pool: ModelPool[Any], name: str, forward: Forward) -> None:
        self._local = local
        self._pool = pool
        self.name = name
        self._forward = forward

    async def infer(self, request: InferRequest) -> InferResponse:
        if not self._pool.holds(self.name):
            try:
                response = await self._forward.infer(self.name, request)
            except _UNREACHABLE as exc:
                log.warning("forward of %s failed (%s); answering here", self.name, type(exc).__name__)
            else:
                metrics.POOL_LOOKUPS.inc(result="forwarded")
                return response
        return await self._local.infer(request)

    async def metadata(self, version: str | None) -> ModelMetadata:
        if not self._pool.holds(self.name):
            try:
                return await self._forward.metadata(self.name, version)
            except _UNREACHABLE as exc:
                log.warning("forward of %s failed (%s); answering here", self.name, type(exc).__name__)
        return await self._local.metadata(version)

    async def refused(self, version: str | None, status: int) -> None:
        await self._local.refused(version, status)

    async def ready(self, version: str | None) -> bool:
        return await self._local.ready(version)

    async def status(self) -> dict[str, Any]:
        return await self._local.status()


class RoutedSets:
    """A replica's model sets, routed by model: members' ports are :class:`RoutedModel`,
    and a load request goes to the member's owners too."""

    def __init__(self, local: PooledModels, forward: Forward) -> None:
        self.local = local
        self._forward = forward

    def port(self, name: str) -> RoutedModel | None:
        local = self.local.port(name)
        return None if local is None else RoutedModel(local, self.local.pool, name, self._forward)

    async def load(self, name: str, timeout: float) -> bool:
        if not self.local.pool.holds(name):
            try:
                return await self._forward.load(name, timeout)
            except _UNREACHABLE as exc:
                log.warning("forward of %s failed (%s); loading here", name, type(exc).__name__)
        return await self.local.load(name, timeout)

    async def unload(self, name: str) -> bool:
        return await self.local.unload(name)

    async def snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        return await self.local.snapshot()
