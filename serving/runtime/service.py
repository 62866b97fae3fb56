"""One model's serving logic, free of Ray and HTTP: lease a version, predict, follow the alias.

:class:`ModelService` takes typed requests (:mod:`serving.protocol.types`) and
returns typed responses; the transports decode and encode around it, and the
canary's routing key comes in as a field of the request. The standalone
server and each Ray replica hold one ModelService per model.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from serving import metrics
from serving.cache import CachedVersion, LoaderCache
from serving.config import AppConfig, ModelConfig
from serving.errors import InvalidInput, NotReady, ServingError
from serving.formats.base import LoadPolicy
from serving.isolation.prober import IsolationLimits, IsolationMode, Prober
from serving.isolation.worker import DEADLINE, WorkerLimits, WorkerPool, WorkerPredictor
from serving.isolation.zygote import zygote_pids
from serving.protocol.tensors import check_reply_size, conform, select_outputs
from serving.protocol.types import InferRequest, InferResponse, ModelMetadata, status_of
from serving.repository import Repository, Resolved
from serving.runtime.memory import pss_bytes
from serving.runtime.slot import Live, Loader, ModelSlot, NotLoaded, ResidentVersions, default_loader
from serving.runtime.traffic import Figures, Router, disagrees, merge
from serving.runtime.watcher import AliasWatcher, Split
from serving.settings import Settings
from serving.store import open_store
from serving.trust import check_trust

log = logging.getLogger(__name__)

LINEAGE = ("source", "derived_from")
"""Manifest metadata that OIP model metadata shows (REST ``parameters``)."""

CLIENT_GONE = 499
"""The status a request awaited on the loop is counted with when its client left (its task was
cancelled), as nginx counts it."""

_CLIENT_ERRNOS = frozenset(
    {errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EINVAL, errno.EACCES, errno.ELOOP}
)


def build_cache(app: AppConfig, settings: Settings) -> LoaderCache:
    return LoaderCache.from_settings(settings, root=app.cache_dir, max_bytes=app.cache_max_bytes)


def build_prober(model: ModelConfig, settings: Settings, cache: LoaderCache) -> Prober | None:
    """The isolation of first loads for ``model``: None for ``none`` and for workers
    (a worker's load is already confined)."""
    if model.isolation in ("never", "none", "worker"):
        return None
    limits = IsolationLimits(
        memory_bytes=settings.isolation_memory_bytes,
        cpu_seconds=settings.isolation_cpu_seconds,
        timeout_s=settings.isolation_timeout_s,
        nice=settings.isolation_nice,
    )
    mode: IsolationMode = "always" if model.isolation == "always" else "auto"
    return Prober(limits, mode=mode, memo_dir=cache.root / "isolation")


def build_loader(model: ModelConfig, app: AppConfig, settings: Settings) -> Loader:
    """How ``model``'s versions load: in a model worker, or in this process."""
    if model.isolation != "worker":
        return default_loader
    limits = WorkerLimits(
        memory_bytes=settings.isolation_memory_bytes,
        load_timeout_s=settings.isolation_timeout_s,
        load_cpu_seconds=settings.isolation_cpu_seconds,
        predict_timeout_s=model.predict_timeout_s,
        probation_requests=model.probation_requests,
        max_reply_bytes=app.reply_limit,
        start=settings.worker_start,
    )

    pool = shared_pool(app, settings) if model.workers == "shared" else None

    def load_in_worker(cached: CachedVersion, policy: LoadPolicy) -> WorkerPredictor:
        return WorkerPredictor(cached, policy, limits, model=model.name, warmup=model.warmup, pool=pool)

    return load_in_worker


_POOLS: dict[tuple[Any, ...], WorkerPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(app: AppConfig, settings: Settings) -> WorkerPool:
    """This process's shared model workers (one pool per replica, whichever models use it)."""
    config = app.shared_workers
    limits = WorkerLimits(
        load_timeout_s=settings.isolation_timeout_s,
        load_cpu_seconds=settings.isolation_cpu_seconds,
        max_reply_bytes=app.reply_limit,
        start=settings.worker_start,
    )
    key = (config.count, config.memory_bytes, config.keep_idle_s, limits)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = WorkerPool(
                config.count, limits, memory_bytes=config.memory_bytes, keep_idle_s=config.keep_idle_s
            )
            if config.prestart:
                pool.prestart(config.prestart)
        return pool


def _shared_pools() -> list[WorkerPool]:
    with _POOLS_LOCK:
        return list(_POOLS.values())


def idle_shared_bytes() -> int:
    """What this process's model-worker processes that hold no version hold (their PSS): shared
    workers with none, and the zygotes workers are forked from (whose pages the workers share:
    a worker's PSS counts only its part of them)."""
    pids = [pid for pool in _shared_pools() for pid in pool.idle_pids()] + zygote_pids()
    return sum(pss_bytes(pid, max_age_s=SHARED_PSS_AGE_S) for pid in pids)


def stop_idle_shared() -> None:
    """Stop this process's shared model workers that hold no version (a budget needs their room)."""
    for pool in _shared_pools():
        pool.stop_idle()


def close_shared_pools() -> None:
    """Stop this process's idle shared model workers (at shutdown; the others stop with their
    last version)."""
    for pool in _shared_pools():
        pool.close()


def policy_from(settings: Settings) -> LoadPolicy:
    return LoadPolicy(
        trusted_globals=frozenset(settings.trusted_globals),
        max_artifact_bytes=settings.max_artifact_bytes,
        max_expansion_ratio=settings.max_expansion_ratio,
    )


STATUS_MEMORY_AGE_S = 30.0
"""How old the memory figure in a status report may be."""
SHARED_PSS_AGE_S = 1.0
"""A shared worker's PSS read is reused this long by the versions it holds: each would read it."""


@dataclass
class _Answer:
    """What :meth:`ModelService._answering` records of one request while it is answered."""

    served: str
    """The version that answered (a label for metrics)."""
    role: str
    """``live``, ``canary`` or ``pinned``."""
    client_inputs: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)

    def done(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """It was answered from ``inputs`` (conformed) with ``outputs`` (every one computed)."""
        self.inputs, self.outputs = inputs, outputs


class ModelService:
    """Serves one model: the live version (following an alias or pinned) plus explicit versions."""

    def __init__(
        self,
        model: ModelConfig,
        app: AppConfig,
        settings: Settings,
        *,
        repo: Repository | None = None,
        cache: LoaderCache | None = None,
        poll_interval_s: float | None = None,
    ) -> None:
        """``repo`` and ``cache``: shared with other models (model-set members); by default its own.
        ``poll_interval_s``: between alias reads, instead of the app's (members, whom the alias
        feed nudges)."""
        self.config = model
        self.app = app
        repo = repo or Repository(open_store(app.store or settings.store, settings))
        cache = cache or build_cache(app, settings)

        def trust_check(repo: Repository, resolved: Resolved) -> LoadPolicy:
            # NOTE: signature and load policy, checked before any artifact byte is read.
            return check_trust(repo, resolved, settings, cache_root=cache.root).policy

        self.slot = ModelSlot(
            model.name,
            repo,
            cache,
            policy_from(settings),
            trust_check=trust_check,
            loader=build_loader(model, app, settings),
            # NOTE: a worker warms its version up itself, before it answers the load.
            warmup=model.warmup and model.isolation != "worker",
            prober=build_prober(model, settings, cache),
        )
        self.watcher = (
            AliasWatcher(
                self.slot,
                model.alias,
                interval_s=poll_interval_s or app.poll_interval_s,
                jitter=app.poll_jitter,
                backoff_max_s=app.retry_backoff_max_s,
                check_timeout_s=settings.alias_check_timeout_s,
            )
            if model.alias
            else None
        )
        self.resident = ResidentVersions(
            self.slot,
            model.max_resident_versions,
            max_loading=settings.max_concurrent_version_loads,
            miss_ttl_s=settings.version_miss_ttl_s,
        )
        self.router = Router()
        self.figures = Figures()
        self.mirror = ShadowMirror(self, queue_size=model.shadow_queue)
        self.canary_check = CanaryCheck(self, queue_size=model.shadow_queue)
        self._memory: tuple[int, float] | None = None

    def start(self) -> None:
        """Load the first version. Raises if nothing can be loaded (the replica is not ready)."""
        if self.watcher is not None:
            self.watcher.start()
        else:
            assert self.config.version is not None
            resolved, from_cache = self.slot.cache.resolve(
                self.slot.repo, f"{self.config.name}:{self.config.version}"
            )
            self.slot.swap_to(resolved, reason="start", source="cache" if from_cache else "store")

    # -- requests ------------------------------------------------------------------
    def infer(self, request: InferRequest, role: str | None = None, *, load: bool = True) -> InferResponse:
        """Answer one typed request: the one infer pipeline, whatever transport carried it.

        A request that names its version is answered by that version (loaded on
        demand, see :class:`ResidentVersions`); any other by the alias's live version,
        or its canary for the canary's share (sticky by ``request.routing_key``).
        The inputs are conformed, predicted and encoded under one lease, so a swap
        in between cannot mix two versions. ``role`` (``live`` or ``canary``) is a
        choice already made for this request by :meth:`choose`.

        ``load=False`` (a caller on the event loop): an explicit version that is not loaded
        raises :class:`~serving.runtime.slot.NotLoaded` instead of loading there.

        Raises:
            ServingError: a client's mistake (4xx) or a serving fault (5xx).
        """
        with (
            self._answering(request) as answer,
            self._lease_for(request, role, load=load) as (live, answered),
        ):
            answer.served, answer.role = live.version, answered
            inputs = conform(request.inputs, live.predictor.inputs)
            outputs = self.run(live, inputs, self._names(live, request))
            response = self.respond(live, request, outputs)
            answer.done(inputs, outputs)
        return response

    async def infer_async(self, request: InferRequest, role: str | None = None) -> InferResponse:
        """:meth:`infer` on the running loop, for versions served by model workers: the loop
        awaits the worker's answer (:meth:`WorkerPredictor.predict_async`), no thread waits
        for it. It never loads a version: one that is not loaded raises
        :class:`~serving.runtime.slot.NotLoaded`, and the caller answers from a thread instead."""
        with (
            self._answering(request) as answer,
            self._lease_for(request, role, load=False) as (live, answered),
        ):
            answer.served, answer.role = live.version, answered
            inputs = conform(request.inputs, live.predictor.inputs)
            outputs = await self.run_async(live, inputs, self._names(live, request))
            response = self.respond(live, request, outputs)
            answer.done(inputs, outputs)
        return response

    @contextmanager
    def _answering(self, request: InferRequest) -> Iterator[_Answer]:
        """One request's bookkeeping around its lease: its deadline, its count and latency under
        the version and role that answered, then the shadow's or the canary check's copy."""
        started = time.perf_counter()
        pinned = request.version is not None
        # NOTE: a client-chosen version becomes a label only once it has loaded (then it
        # exists and is one of a bounded set); misses and refusals count as "other".
        answer = _Answer(
            served="other" if pinned else self.slot.version or "none",
            role="pinned" if pinned else "live",
            client_inputs=request.inputs,
        )
        status = 200
        deadline = DEADLINE.set(time.monotonic() + request.timeout_s if request.timeout_s else None)
        try:
            yield answer
        except asyncio.CancelledError:
            status = CLIENT_GONE
            raise
        except NotLoaded:
            # NOTE: not an answer: the caller asks again, from a thread that may load it.
            status = 0
            raise
        except BaseException as exc:
            status = status_of(exc)
            raise
        finally:
            DEADLINE.reset(deadline)
            if status == CLIENT_GONE:
                # NOTE: not the version's doing: counted, but left out of the figures rollouts judge.
                metrics.REQUESTS.inc(
                    model=self.config.name, version=answer.served, status=str(status), role=answer.role
                )
            elif status:  # NOTE: 0 is a NotLoaded, asked again: no answer to count
                self.observe(answer.served, status, started, role=answer.role)
        if answer.role == "live":
            # NOTE: a non-blocking hand-off; the shadow predicts on its own thread later.
            self.mirror.offer(answer.inputs, answer.outputs)
        elif answer.role == "canary":
            # NOTE: the inputs as the client sent them: the live version conforms them
            # to its own specs (the canary's may cast or rename them differently).
            self.canary_check.offer(answer.served, answer.client_inputs, answer.outputs)

    def refused(self, version: str | None, status: int) -> None:
        """Count a request its transport refused before it reached a version (it did not decode).

        It counts as the version that would have answered it: the live one, or ``other``
        for an explicit version (a label only loaded versions get).
        """
        if version is not None:
            self.observe("other", status, time.perf_counter(), role="pinned")
        else:
            self.observe(self.slot.version or "none", status, time.perf_counter())

    def choose(self, routing_key: str | None) -> str:
        """``canary`` for the canary's share of requests (sticky by ``routing_key``), else ``live``."""
        split = self.split
        if split.canary_weight <= 0:
            return "live"
        return "canary" if self.router.to_canary(split.canary_weight, routing_key) else "live"

    @property
    def split(self) -> Split:
        return self.watcher.split if self.watcher is not None else Split()

    @contextmanager
    def _lease_for(
        self, request: InferRequest, role: str | None, *, load: bool = True
    ) -> Iterator[tuple[Live, str]]:
        """The version that answers ``request``, leased, and its role (``load``: loading an
        explicit version that is not loaded)."""
        if request.version is not None:
            with self.resident.lease(request.version, load=load) as live:
                yield live, "pinned"
            return
        if (role or self.choose(request.routing_key)) == "canary":
            with self.slot.lease_companion("canary") as canary:
                if canary is not None:
                    yield canary, "canary"
                    return
        with self.slot.lease() as live:
            yield live, "live"

    @staticmethod
    def _names(live: Live, request: InferRequest) -> list[str] | None:
        """The outputs ``request`` needs computed (None: every one)."""
        return [live.predictor.primary_output] if request.primary_only else request.output_names

    def respond(self, live: Live, request: InferRequest, outputs: dict[str, np.ndarray]) -> InferResponse:
        """The response to ``request`` from the outputs ``live`` computed."""
        if request.primary_only:
            primary = live.predictor.primary_output
            # NOTE: v1 answers one output: the primary, or the first the predictor produced.
            name = primary if primary in outputs else next(iter(outputs))
            selected = {name: outputs[name]}
        else:
            selected = select_outputs(outputs, request.output_names)
        check_reply_size(selected, self.app.reply_limit)
        return InferResponse(self.config.name, live.version, request.id, selected)

    def memory_bytes(self, max_age_s: float = 0.0) -> int:
        """What this model's loaded versions hold (:mod:`serving.runtime.memory`), measured at most
        ``max_age_s`` ago: reading a worker's PSS walks its memory map (about 1 ms)."""
        measured = self._memory
        now = time.monotonic()
        if measured is not None and now - measured[1] <= max_age_s:
            return measured[0]
        total = self._measure_memory()
        self._memory = (total, now)
        return total

    def _measure_memory(self) -> int:
        total = 0
        seen: set[int] = set()
        for live in [*self.slot.loaded(), *self.resident.loaded()]:
            if id(live) in seen:
                continue
            seen.add(id(live))
            predictor = live.predictor
            if not isinstance(predictor, WorkerPredictor):
                total += live.memory_bytes
                continue
            pid = predictor.pid
            # NOTE: a shared worker's memory is split over its versions by what each load added.
            if not pid:
                total += predictor.load_bytes
            elif predictor.shared:
                total += int(pss_bytes(pid, max_age_s=SHARED_PSS_AGE_S) * predictor.share())
            else:
                total += pss_bytes(pid)
        return total

    def close(self) -> None:
        """Stop the mirrors' threads and release every loaded version."""
        mirrors = (self.mirror, self.canary_check)
        for mirror in mirrors:
            mirror.stop()
        for mirror in mirrors:
            mirror.join()
        self.slot.close()
        self.resident.close()

    def _lease(self, version: str | None, load: bool = True) -> Any:
        return self.resident.lease(version, load=load) if version else self.slot.lease()

    @staticmethod
    def run(
        live: Live, inputs: dict[str, np.ndarray], names: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """The predictor's outputs: every one, or at least ``names`` (a request's ``outputs``)."""
        try:
            if names is not None:
                return live.predictor.predict_only(inputs, names)
            return live.predictor.predict(inputs)
        except ServingError:
            raise
        except (ValueError, TypeError) as exc:
            # NOTE: frameworks raise these for inputs that passed the schema check
            # but that the model still cannot take (e.g. wrong feature count).
            raise InvalidInput(f"the model rejected the input: {exc}") from exc
        except OSError as exc:
            # NOTE: a path or name taken from the request (no such file, a directory,
            # too long) is the caller's mistake; any other OSError is the server's.
            if exc.errno not in _CLIENT_ERRNOS:
                raise
            raise InvalidInput(f"the model could not use the input: {exc.strerror or exc}") from exc

    @classmethod
    async def run_async(
        cls, live: Live, inputs: dict[str, np.ndarray], names: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """:meth:`run`, awaited: a model worker's answer is awaited on the loop; a predictor in this
        process runs in place."""
        predictor = live.predictor
        if not isinstance(predictor, WorkerPredictor):
            return cls.run(live, inputs, names)
        # NOTE: a worker answers only ServingErrors (the model's own ValueErrors come back as 400s).
        return await predictor.predict_async(inputs, names)

    def observe(self, version: str, status: int, started: float, role: str = "live") -> None:
        """Count one answered request and, when it succeeded, its latency.

        ``role`` is ``live``, ``canary`` or ``shadow`` for requests through the alias
        (those also count in :attr:`figures`, what ``serving rollout`` compares), and
        ``pinned`` for requests that named their version.
        """
        elapsed = time.perf_counter() - started
        metrics.REQUESTS.inc(model=self.config.name, version=version, status=str(status), role=role)
        if status < 400:
            metrics.REQUEST_SECONDS.observe(elapsed, model=self.config.name, version=version, role=role)
        if role != "pinned" and version != "none":
            self.figures.observe(version, status, elapsed)

    # -- metadata ------------------------------------------------------------------------
    def metadata(self, version: str | None = None, *, load: bool = True) -> ModelMetadata:
        """OIP model metadata of the live version, or of ``version`` (``load``: as for :meth:`infer`)."""
        with self._lease(version, load) as live:
            # NOTE: where the version came from (an import's source, a conversion's derived_from).
            lineage = {k: live.manifest.metadata[k] for k in LINEAGE if k in live.manifest.metadata}
            return ModelMetadata(
                name=self.config.name,
                versions=[live.version],
                platform=live.manifest.format,
                inputs=live.predictor.inputs,
                outputs=live.predictor.outputs,
                parameters={
                    "framework": live.manifest.framework,
                    "framework_version": live.manifest.framework_version,
                    "alias": self.config.alias,
                    "created_at": live.manifest.created_at,
                    **lineage,
                },
            )

    def ready(self, version: str | None = None) -> bool:
        if version is None or version == self.slot.version:
            return self.slot.live is not None
        return version in self.resident.versions()

    def status(self) -> dict[str, Any]:
        """What this replica serves (the index's per-replica row), with its per-version figures."""
        status = {
            **self._watch_status(),
            "figures": self.figures.snapshot(),
            "memory_bytes": self.memory_bytes(max_age_s=STATUS_MEMORY_AGE_S),
        }
        live = self.slot.live
        if live is not None and isinstance(live.predictor, WorkerPredictor):
            status["worker"] = live.predictor.status()
        failed = self.slot.failed_versions()
        if failed:
            status["failed_in_probation"] = failed
        return status

    def _watch_status(self) -> dict[str, Any]:
        if self.watcher is not None:
            return asdict(self.watcher.status())
        live = self.slot.live
        return {
            "model": self.config.name,
            "alias": None,
            "target_version": self.config.version,
            "live_version": live.version if live else None,
            "last_check_age_s": None,
            "last_error": None,
            "failed_version": None,
            "source": live.source if live else None,
        }


def index_entry(config: ModelConfig, replicas: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One model's row of ``/v2/repository/index`` from what each replica reported.

    ``replicas`` maps a replica id to its :meth:`ModelService.status` (plus what the
    server adds). Converged means every replica serves the alias's target.
    """
    live = {r["live_version"] for r in replicas.values() if r["live_version"]}
    targets = [r["target_version"] for r in replicas.values() if r["target_version"]]
    target = targets[0] if targets else config.version
    converged = bool(replicas) and live == {target}
    entry: dict[str, Any] = {
        "name": config.name,
        "version": target,
        "alias": config.alias,
        "target_version": target,
        "state": "READY" if live else "UNAVAILABLE",
        "reason": "" if converged else "converging",
        "converged": converged,
    }
    for role in ("canary", "shadow"):
        # NOTE: what the alias asks for, as the replicas saw it; per-replica state stays in "replicas".
        states = [r[role] for r in replicas.values() if r.get(role)]
        if states:
            share = "weight" if role == "canary" else "fraction"
            entry[role] = {
                "version": states[0]["version"],
                share: states[0][share],
                "loaded": sum(1 for s in states if s.get("loaded")),
                "replicas": len(replicas),
            }
            if not all(s.get("loaded") for s in states) or len(states) < len(replicas):
                entry["converged"] = False
                entry["reason"] = entry["reason"] or f"{role} loading"
    entry["figures"] = merge([r.get("figures") or {} for r in replicas.values()])
    entry["replicas"] = [{"replica": rid, **state} for rid, state in sorted(replicas.items())]
    return entry


class _Mirror:
    """A bounded queue of answered requests and one thread that predicts them again.

    Never blocks a reply: an item that finds the queue full is dropped and counted.
    Subclasses say what to queue (``offer``) and what to do with each item (``_one``).
    """

    role = "mirror"

    def __init__(self, service: ModelService, queue_size: int = 64) -> None:
        self._service = service
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _put(self, item: tuple[Any, ...], version: str) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._service.figures.dropped(version)
            metrics.SHADOW_DROPPED.inc(model=self._service.config.name)
            return
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._closed:
                    self._thread = threading.Thread(
                        target=self._run, name=f"{self.role}-{self._service.config.name}", daemon=True
                    )
                    self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._one(*item)
            except Exception:
                log.exception("%s mirror failed for %s", self.role, self._service.config.name)

    def _one(self, *item: Any) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Take no more items, drop the queued ones, and tell the thread to end."""
        with self._lock:
            self._closed = True
            if self._thread is None:
                return
        while True:
            try:
                self._queue.put_nowait(None)
                break
            except queue.Full:
                with suppress(queue.Empty):
                    self._queue.get_nowait()

    def join(self, timeout: float = 5.0) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def close(self, timeout: float = 5.0) -> None:
        self.stop()
        self.join(timeout)


class ShadowMirror(_Mirror):
    """Predicts a copy of live requests with the shadow version, on its own thread.

    :meth:`offer` never blocks: it picks ``fraction`` of the requests and queues
    their decoded inputs and the live outputs; when the queue is full the mirror
    is dropped and counted. The worker compares each shadow answer with the live
    one (:func:`serving.runtime.traffic.disagrees`) and counts the request under the
    ``shadow`` role. Nothing it does reaches the client.
    """

    role = "shadow"

    def offer(self, inputs: dict[str, np.ndarray], live_outputs: dict[str, np.ndarray]) -> None:
        service = self._service
        fraction = service.split.shadow_fraction
        if fraction <= 0 or self._closed or not service.router.mirror(fraction):
            return
        shadow = service.slot.companion("shadow")
        if shadow is None:
            return
        self._put((inputs, live_outputs), shadow.version)

    def _one(self, inputs: dict[str, np.ndarray], live_outputs: dict[str, np.ndarray]) -> None:
        service = self._service
        name = service.config.name
        started = time.perf_counter()
        with service.slot.lease_companion("shadow") as shadow:
            if shadow is None:
                return
            status, outputs = 200, None
            try:
                outputs = service.run(shadow, inputs)
            except ServingError as exc:
                status = exc.status_code
            except Exception:
                # NOTE: logged once here; the client already has its live answer.
                log.exception("shadow %s:%s failed on a mirrored request", name, shadow.version)
                status = 500
            service.observe(shadow.version, status, started, role="shadow")
            if outputs is None:
                metrics.SHADOW_COMPARISONS.inc(model=name, version=shadow.version, outcome="error")
                return
            differs = disagrees(live_outputs, outputs, service.config.shadow_tolerance)
            service.figures.compared(shadow.version, differs)
            outcome = "disagree" if differs else "agree"
            metrics.SHADOW_COMPARISONS.inc(model=name, version=shadow.version, outcome=outcome)


class CanaryCheck(_Mirror):
    """Checks the canary's answers against the live version's, on its own thread.

    The live version is the canary's reference: :meth:`offer` queues
    ``canary_check_fraction`` of the requests the canary answered, with its outputs;
    the thread predicts the same inputs with the live version and compares
    (:func:`serving.runtime.traffic.disagrees`), counting under the canary's version
    (``compared`` and ``disagreed``: what ``serving rollout`` judges a canary step's
    output agreement on). The reference predictions are not requests: they count in
    no request figure, and nothing reaches the client. They do cost the live version
    one predict per checked request (its worker answers one call at a time), which
    ``canary_check_fraction`` bounds.
    """

    role = "canary-check"

    def offer(self, version: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        service = self._service
        fraction = service.config.canary_check_fraction
        if fraction <= 0 or self._closed or not service.router.mirror(fraction):
            return
        self._put((version, inputs, outputs), version)

    def _one(self, version: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        service = self._service
        name = service.config.name
        reference: dict[str, np.ndarray] | None = None
        with suppress(NotReady), service.slot.lease() as live:
            if live.version == version:
                return  # NOTE: promoted in the meantime: there is no other version to compare with
            try:
                answer = service.run(live, conform(inputs, live.predictor.inputs), list(outputs))
                # NOTE: only what both answered: a predictor may compute more than was asked for.
                reference = {k: v for k, v in answer.items() if k in outputs} or None
            except ServingError:
                pass  # NOTE: e.g. an input schema the rollout was allowed to change
            except Exception:
                log.exception("%s:%s failed on a canary's reference request", name, live.version)
        if reference is None:
            metrics.CANARY_COMPARISONS.inc(model=name, version=version, outcome="error")
            return
        differs = disagrees(reference, outputs, service.config.shadow_tolerance)
        service.figures.compared(version, differs)
        outcome = "disagree" if differs else "agree"
        metrics.CANARY_COMPARISONS.inc(model=name, version=version, outcome=outcome)
