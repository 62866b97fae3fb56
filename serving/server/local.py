"""Ports over models in this process: used by the standalone server and single-hop Ray replicas.

:class:`LocalModel` is a :class:`~serving.dataplane.ModelPort` over a
:class:`~serving.runtime.service.ModelService`. It decides what may run on the event
loop: a request that would load an explicit version never does; predict does
while the model's recent requests are fast (under ``offload_predict_after_ms``),
because for small models a thread hop costs more than the model. A model served
by model workers is awaited on the loop (the loop sends the request and wakes
when the worker answers), so no thread waits for a worker.

A request is timed by the CPU time of the thread that ran it, not the wall clock:
a threaded request's wall time also counts its waits for the GIL, and any
request's counts the time the OS ran other processes, so under load a fast model
would look slow and leave the loop just when the hop costs most. One slow
request moves the average by at most a bounded step, and a model goes back to
the loop only below half the bound, so it does not flap between the two.

:class:`Waker` and :class:`LocalLoads` are the standalone server's
:class:`~serving.dataplane.LoadPort`: each model's watcher thread waits on
its waker between ticks, and a load request cuts that wait short.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from serving.config import AppConfig
from serving.errors import ModelNotFound, NotFound, Overloaded, StoreError
from serving.protocol.types import InferRequest, InferResponse, ModelMetadata
from serving.repository import Repository
from serving.runtime.feed import AliasFeed, run_feed
from serving.runtime.memory import pss_bytes
from serving.runtime.pool import Entry, ModelPool
from serving.runtime.service import (
    ModelService,
    build_cache,
    idle_shared_bytes,
    shared_pool,
    stop_idle_shared,
)
from serving.runtime.slot import NotLoaded
from serving.settings import Settings
from serving.store import open_store

log = logging.getLogger(__name__)

T = TypeVar("T")

MEMBER_MEMORY_AGE_S = 5.0
"""How old a pool member's memory figure may be when a load decides what to evict (a fresh
one is taken right after its own load)."""
SERVER_PSS_AGE_S = 1.0
"""How old a read of the server's own PSS may be when the pool weighs a load."""

LOAD_THREADS = 64
"""Cold requests that may wait for their model-set member to load at once, per process."""

_WORKER_THREADS = 4
"""Threads per model served by model workers, for requests that load a version first."""
LOOP_MAX_BYTES = 4 << 20
"""A model worker's request with more input bytes than this goes through a thread: conforming it
and copying it into the worker's memory file would hold the loop (10,000 iris rows are 320 KB)."""
_EWMA = 0.2
"""Weight of the newest request in a model's recent request time."""


class LocalModel:
    """A ModelService as a model port, on the loop or off it.

    Args:
        service: the model.
        offload_after_s: requests run in a worker thread once the model's recent
            request time reaches this (0: always; ``math.inf``: only version loads).
            A model served by model workers never blocks the loop: the loop awaits
            the worker's answer, and only requests that load a version run in a thread.
    """

    def __init__(self, service: ModelService, offload_after_s: float | None = None) -> None:
        self.service = service
        if offload_after_s is None:
            offload_after_s = service.config.offload_predict_after_ms / 1000
        self._threads: ThreadPoolExecutor | None = None
        if service.config.isolation == "worker":
            # NOTE: the loop awaits a worker's answer (infer); what must block (a load, a request
            # from a thread) runs on threads of the model's own, so requests queued for one slow
            # or hung model cannot take every thread of the shared pool from the other models.
            offload_after_s = 0.0
            self._threads = ThreadPoolExecutor(
                _WORKER_THREADS, thread_name_prefix=f"model-{service.config.name}"
            )
        self.offload_after_s = offload_after_s
        self._recent_s = 0.0
        self._offloaded = offload_after_s <= 0

    def close(self) -> None:
        """Stop this model's own threads (a model-set member is unloaded)."""
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)

    def on_loop(self, version: str | None) -> bool:
        """Whether a request for ``version`` may run on the event loop."""
        # NOTE: an explicit version not loaded yet means a download and a load.
        if not self.loaded(version):
            return False
        # NOTE: hysteresis: off the loop at the bound, back on below half of it, so a
        # model whose requests take about the bound does not flap between the two.
        if self._offloaded:
            self._offloaded = not self._recent_s < self.offload_after_s / 2
        else:
            self._offloaded = self._recent_s >= self.offload_after_s
        return not self._offloaded

    async def _run(self, version: str | None, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args, load=...)`` on the loop while the model is fast and ``version`` loaded, else
        on a thread (``load=False`` on the loop: a version evicted since is not loaded there)."""
        if self.on_loop(version):
            try:
                return self._timed(functools.partial(fn, load=False), *args)
            except NotLoaded:
                pass  # NOTE: evicted since on_loop() saw it: loaded on a thread below.
        if self._threads is not None:
            return await asyncio.get_running_loop().run_in_executor(
                self._threads, functools.partial(self._timed, fn, *args)
            )
        return await asyncio.to_thread(self._timed, fn, *args)

    def _timed(self, fn: Callable[..., T], *args: Any) -> T:
        started = time.thread_time()
        try:
            return fn(*args)
        finally:
            # NOTE: one outlier (a GC pause) moves the average by a bounded step, so it takes a
            # few slow requests in a row, not one, to move a model off the loop.
            elapsed = min(time.thread_time() - started, 2 * self.offload_after_s)
            self._recent_s += _EWMA * (elapsed - self._recent_s)

    async def infer(self, request: InferRequest) -> InferResponse:
        if self._threads is not None and self.loaded(request.version) and _nbytes(request) <= LOOP_MAX_BYTES:
            # NOTE: the loop sends the request and awaits the worker's answer: no thread hop.
            try:
                return await self.service.infer_async(request)
            except NotLoaded:
                # NOTE: evicted since loaded() said it was: loading it again blocks, so not here.
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._threads, self.service.infer, request)
        return await self._run(request.version, self.service.infer, request)

    def loaded(self, version: str | None) -> bool:
        """Whether a request for ``version`` is answered without loading one."""
        slot, resident = self.service.slot, self.service.resident
        return version is None or version == slot.version or version in resident.versions()

    async def metadata(self, version: str | None) -> ModelMetadata:
        if self.on_loop(version):
            with contextlib.suppress(NotLoaded):
                return self.service.metadata(version, load=False)
        return await asyncio.to_thread(self.service.metadata, version)

    async def refused(self, version: str | None, status: int) -> None:
        self.service.refused(version, status)

    async def ready(self, version: str | None) -> bool:
        return self.service.ready(version)

    async def status(self) -> dict[str, Any]:
        return self.service.status()


def _nbytes(request: InferRequest) -> int:
    return sum(array.nbytes for array in request.inputs.values())


class Waker:
    """One model's wait between watcher ticks, which a load request cuts short.

    Generations count load requests; ``seen`` is the newest one a tick has
    started on, ``done`` the newest whose tick has finished (``run_forever``
    calls :meth:`wait` after every tick). A request that arrives while another
    is still queued joins it, so at most one forced check runs and one waits.
    """

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop
        self._cond = threading.Condition()
        self._requested = 0
        self._seen = 0
        self._done = 0

    def wait(self, timeout: float, read: bool = True) -> bool:
        """Mark the last tick done if it ``read`` the alias, then sleep until ``timeout`` or a
        load request (True then). A tick the store failed leaves the requests it started on
        waiting for a later tick that reads it."""
        with self._cond:
            if read:
                self._done = self._seen
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._requested > self._seen or self._stop.is_set(), timeout)
            forced = self._requested > self._seen
            self._seen = self._requested
            return forced

    def request(self) -> int:
        with self._cond:
            if self._requested == self._seen:
                self._requested += 1
                self._cond.notify_all()
            return self._requested

    def wait_done(self, generation: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._done >= generation or self._stop.is_set(), timeout)

    @property
    def generation(self) -> int:
        return self._done

    def wake_all(self) -> None:
        with self._cond:
            self._cond.notify_all()


def replica_id() -> str:
    """This process, as the repository index names its one replica."""
    return f"{socket.gethostname()}-{os.getpid()}"


class LocalLoads:
    """The load port of one process that serves every model itself.

    ``members``: the model-set members loaded now, each with its service and waker
    (they come and go with the pool)."""

    def __init__(
        self,
        models: Mapping[str, tuple[ModelService, Waker]],
        members: Callable[[], Mapping[str, tuple[ModelService, Waker]]] | None = None,
    ) -> None:
        self._models = dict(models)
        self._members = members
        self.replica = replica_id()

    def _all(self) -> dict[str, tuple[ModelService, Waker]]:
        return {**(self._members() if self._members else {}), **self._models}

    async def request(self, model: str) -> int:
        found = self._all().get(model)
        return found[1].request() if found else 0

    async def wait_done(self, model: str, generation: int, timeout: float) -> bool:
        found = self._all().get(model)
        return await asyncio.to_thread(found[1].wait_done, generation, timeout) if found else True

    async def snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        now = time.time()
        return {
            name: {self.replica: {**service.status(), "generation": waker.generation, "reported_at": now}}
            for name, (service, waker) in self._all().items()
        }


class LocalMember(Protocol):
    """A model-set member served in this process: a ModelService, its port, and a forced check."""

    name: str
    service: ModelService
    port: LocalModel

    def load(self) -> None: ...

    def close(self) -> None: ...

    def memory_bytes(self) -> int: ...

    def nudge(self) -> None:
        """Have its watcher read its alias now (the alias feed saw it move)."""
        ...


class ColdLoads:
    """Runs cold requests' loads on daemon threads, at most LOAD_THREADS at once.

    Daemon threads: a load still running never holds up the process at exit. Past the
    bound, a cold request gets 503 at once instead of a thread.

    NOTE: tried and dropped: a lower CPU priority for these threads. Against in-process
    loads it did not help (the loop waits for the GIL, not a core: the hot set's share
    under churn went from 0.65 to 0.50, bench/density.py), and a model worker started
    from such a thread inherits its nice value for good.
    """

    def __init__(self, retry_after_s: int) -> None:
        self._slots = threading.BoundedSemaphore(LOAD_THREADS)
        self._retry_after_s = retry_after_s

    async def run(self, fn: Callable[..., T], *args: Any, release: Callable[[T], None] | None = None) -> T:
        """``fn(*args)`` on a daemon thread. ``release`` gives back what it returned if the
        awaiting request was cancelled meanwhile (a client gone, a gRPC deadline)."""
        if not self._slots.acquire(blocking=False):
            raise Overloaded(
                f"{LOAD_THREADS} requests already wait for models to load here", self._retry_after_s
            )
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def give_back(result: Any) -> None:
            if release is not None:
                threading.Thread(target=release, args=(result,), name="pool-release", daemon=True).start()

        def settle(result: Any, error: BaseException | None) -> None:
            if done.cancelled():
                if error is None:
                    give_back(result)
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)

        def work() -> None:
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 -- NOTE: handed to the awaiting request
                with contextlib.suppress(RuntimeError):  # NOTE: the loop is closed: nobody waits
                    loop.call_soon_threadsafe(settle, None, exc)
            else:
                try:
                    loop.call_soon_threadsafe(settle, result, None)
                except RuntimeError:
                    give_back(result)  # NOTE: the loop is closed (the server stopped meanwhile)
            finally:
                self._slots.release()

        threading.Thread(target=work, name="pool-load", daemon=True).start()
        try:
            return await done
        except asyncio.CancelledError:
            # NOTE: cancelled after the result arrived but before this task resumed.
            if done.done() and not done.cancelled() and done.exception() is None:
                give_back(done.result())
            raise


class PooledModel:
    """The model port of a model-set member: takes a use of it in the pool, loading it if needed.

    A member already loaded is used at once, on the loop; a cold one is loaded by a
    thread (:meth:`ModelPool.enter` blocks on the pull and the load) while the loop
    serves other requests.
    """

    def __init__(self, pool: ModelPool[LocalMember], name: str, cold: ColdLoads) -> None:
        self._pool = pool
        self.name = name
        self._cold = cold

    async def _use(self) -> tuple[Entry[LocalMember], float]:
        """A use of the member, and how long it took to load for this request (0 when warm)."""
        entry = self._pool.get_loaded(self.name)
        if entry is not None:
            return entry, 0.0
        started = time.perf_counter()
        entry = await self._cold.run(self._pool.enter, self.name, release=self._pool.leave)
        return entry, time.perf_counter() - started

    async def infer(self, request: InferRequest) -> InferResponse:
        entry, waited_s = await self._use()
        try:
            response = await entry.member.port.infer(request)
        finally:
            self._pool.leave(entry)
        if waited_s:
            # NOTE: a cold request says so in OIP's response parameters: a client (or a bench)
            # can tell a slow model from one that was loaded for it.
            parameters = {**response.parameters, "load_wait_ms": round(waited_s * 1000, 3)}
            response = dataclasses.replace(response, parameters=parameters)
        return response

    async def metadata(self, version: str | None) -> ModelMetadata:
        entry, _ = await self._use()
        try:
            return await entry.member.port.metadata(version)
        finally:
            self._pool.leave(entry)

    async def refused(self, version: str | None, status: int) -> None:
        # NOTE: a member that is not loaded has no series; its refusals count nowhere rather
        # than grow the model label.
        entry = self._pool.get_loaded(self.name, touch=False)
        if entry is not None:
            try:
                await entry.member.port.refused(version, status)
            finally:
                self._pool.leave(entry)

    async def ready(self, version: str | None) -> bool:
        """Whether it could answer now: loaded, or loadable on its first request (True)."""
        entry = self._pool.get_loaded(self.name, touch=False)
        if entry is None:
            return version is None
        try:
            ready: bool = await entry.member.port.ready(version)
            return ready
        finally:
            self._pool.leave(entry)

    async def status(self) -> dict[str, Any]:
        entry = self._pool.get_loaded(self.name, touch=False)
        if entry is None:
            return {"model": self.name, "loaded": False}
        try:
            status: dict[str, Any] = await entry.member.port.status()
            return status
        finally:
            self._pool.leave(entry)


class PooledModels:
    """The members of this process's model sets: their pool, the alias feed that nudges them,
    and prefetch (built by :func:`open_pool`).

    Args:
        pool: the members loaded here.
        app: the app config (which names the model sets admit; pinned and prefetched members).
        loads: the load port that reaches every replica of a member (alias checks and
            reports): :class:`LocalLoads` over the pool here, the board on Ray.
        feed: the alias feed over the pool's members.
    """

    def __init__(self, pool: ModelPool[LocalMember], app: AppConfig, loads: Any, feed: AliasFeed) -> None:
        self.pool = pool
        self._app = app
        self._loads = loads
        self._feed = feed
        self._cold = ColdLoads(pool.retry_after_s)

    def _admits(self, name: str) -> bool:
        return self._app.set_for(name) is not None

    def start(self, stop: threading.Event) -> None:
        """Load the pinned and prefetched members, and run the alias feed, each in a daemon
        thread until ``stop``."""
        threading.Thread(target=self._prefetch, args=(stop,), name="prefetch", daemon=True).start()
        args = (self._feed, self._app.poll_interval_s, self._app.poll_jitter, stop)
        threading.Thread(target=run_feed, args=args, name="alias-feed", daemon=True).start()

    def _prefetch(self, stop: threading.Event) -> None:
        """Load the pinned and prefetched members, each once; a failure is logged."""
        config = self._app.pool
        for name, pin in [*((n, True) for n in config.pinned), *((n, False) for n in config.prefetch)]:
            if stop.is_set():
                return
            try:
                self.pool.load(name, pin=pin)
            except Exception as exc:  # noqa: BLE001 -- NOTE: it loads on its first request instead
                log.warning("could not prefetch %s: %s", name, exc)

    def port(self, name: str) -> PooledModel | None:
        return PooledModel(self.pool, name, self._cold) if self._admits(name) else None

    async def load(self, name: str, timeout: float) -> bool:
        """Load ``name`` here if it is not loaded, then have every replica holding it check its alias."""
        entry = await self._cold.run(self.pool.enter, name, release=self.pool.leave)
        try:
            generation = await self._loads.request(name)
            done: bool = await self._loads.wait_done(name, generation, timeout)
            return done
        finally:
            self.pool.leave(entry)

    async def unload(self, name: str) -> bool:
        return await asyncio.to_thread(self.pool.unload, name)

    async def snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per member some replica holds, per replica: its status."""
        snap: dict[str, dict[str, dict[str, Any]]] = await self._loads.snapshot()
        return {name: replicas for name, replicas in snap.items() if self._admits(name)}


def open_pool(
    app: AppConfig, settings: Settings, make_member: Callable[[ModelService], LocalMember], loads: Any
) -> PooledModels:
    """The model-set members of a process: their pool, and the alias feed that nudges them.

    The members share one store client and one cache; each reads its own alias only every
    ``pool.full_check_interval_s``, and the feed's one listing per poll interval tells
    which of them moved before that."""
    repo = Repository(open_store(app.store or settings.store, settings))
    cache = build_cache(app, settings)

    def open_member(name: str) -> LocalMember:
        model_set = app.set_for(name)
        if model_set is None:
            raise ModelNotFound(f"model {name!r} is not served here")
        try:
            # NOTE: one small read, before the pool evicts anything for a name that is not there.
            repo.get_alias(name, model_set.alias or "production")
        except NotFound as exc:
            raise ModelNotFound(f"model {name!r} has no alias {model_set.alias!r} in the store") from exc
        except StoreError:
            pass  # NOTE: the store is down: the member may still load from this node's cache
        service = ModelService(
            model_set.member(name),
            app,
            settings,
            repo=repo,
            cache=cache,
            poll_interval_s=app.pool.full_check_interval_s,
        )
        return make_member(service)

    pool: ModelPool[LocalMember] = ModelPool(
        open_member,
        memory_bytes=app.pool.memory_bytes,
        max_concurrent_loads=app.pool.max_concurrent_loads,
        retry_after_s=app.pool.retry_after_s,
        load_wait_s=app.pool.load_wait_s,
        # NOTE: only when every member predicts in a model worker: a member that loads in this
        # process is measured by its growth of it, which this would count a second time.
        process_bytes=(
            (lambda: pss_bytes(os.getpid(), max_age_s=SERVER_PSS_AGE_S))
            if all(m.isolation == "worker" for m in app.model_sets)
            else None
        ),
        idle_bytes=idle_shared_bytes,
        stop_idle=stop_idle_shared,
    )
    if any(m.isolation == "worker" and m.workers == "shared" for m in app.model_sets):
        shared_pool(app, settings)  # NOTE: created now, it starts its workers ahead (shared_workers.prestart)

    def following() -> dict[str, str]:
        return {name: m.service.config.alias or "" for name, m in pool.members().items()}

    def nudge(name: str) -> None:
        member = pool.members().get(name)
        if member is not None:
            member.nudge()

    return PooledModels(pool, app, loads, AliasFeed(repo, following, nudge, after=pool.trim))
