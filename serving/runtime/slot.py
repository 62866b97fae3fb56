"""The model slot: the live version of one model, and how it is replaced.

A swap is fetch -> load -> warm up -> swap -> release old. The new version is
loaded beside the old one, so at least one is always serving; if anything
fails before the swap, the old version keeps serving and nothing changes.
Requests hold a lease on the version they started with, so in-flight requests
finish on the old model, which is released when its last lease ends.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from serving import metrics
from serving.cache import CachedVersion, LoaderCache, Pin
from serving.errors import IsolationFailed, LoadError, NotFound, NotReady, Overloaded, ServingError
from serving.formats.base import LoadPolicy, Predictor
from serving.formats.warmup import warm_up
from serving.isolation.prober import Prober
from serving.isolation.worker import WorkerPredictor
from serving.manifest import Manifest
from serving.repository import Repository, Resolved
from serving.runtime.memory import rss_bytes

log = logging.getLogger(__name__)

Loader = Callable[[CachedVersion, LoadPolicy], Predictor]
TrustCheck = Callable[[Repository, Resolved], LoadPolicy]
"""Decides, before any artifact byte is read, whether a version may load; returns its policy."""


def default_loader(cached: CachedVersion, policy: LoadPolicy) -> Predictor:
    from serving.formats import load_predictor

    return load_predictor(cached.path, cached.manifest, policy)


def _in_process_bytes(files: int, grown: int, modules_before: int) -> int:
    """What a load in this process cost: its growth of the resident set, never less than
    its files. NOTE: a load that imported modules (the first model of a framework, or of a
    class, in this process) counts its files only: the modules stay when it is unloaded,
    and tens of MB of sklearn or hundreds of torch would make the first model look too big
    for any budget."""
    if len(sys.modules) > modules_before:
        return files
    return max(files, grown)


@dataclass
class Live:
    """One loaded version with its lease count."""

    name: str
    version: str
    manifest: Manifest
    manifest_sha256: str
    predictor: Predictor
    pin: Pin
    loaded_at: float = field(default_factory=time.time)
    resolved: Resolved | None = None
    """What was loaded, so a failed successor can put this version back."""
    memory_bytes: int = 0
    """In-process models: what the load added to this process (:mod:`serving.runtime.memory`)."""
    source: str = "store"
    """``store`` normally; ``cache`` when resolved from the cache's memory (store down);
    ``last_good`` when the alias's target failed to load at start and this node's
    last successfully served version stands in for it."""
    _leases: int = 0
    _retired: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def acquire(self) -> None:
        if not self.try_acquire():
            raise NotReady(f"{self.name}:{self.version} was retired before the lease was taken")

    def try_acquire(self) -> bool:
        """Take a lease unless this version is already retired (it may be closed by now)."""
        with self._lock:
            if self._retired:
                return False
            self._leases += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._leases -= 1
            done = self._retired and self._leases == 0
        if done:
            self._close()

    def retire(self) -> None:
        """Called once it is swapped out; closes now or when the last lease ends."""
        with self._lock:
            self._retired = True
            done = self._leases == 0
        if done:
            self._close()

    def _close(self) -> None:
        try:
            self.predictor.close()
        except Exception:
            # NOTE: raised to whoever retired it or ended its last lease (a swap, an eviction, a
            # request that has its answer), it would leave their own state half done.
            log.exception("%s:%s: closing its predictor failed", self.name, self.version)
        finally:
            self.pin.release()


class ModelSlot:
    """The live version of one model, replaced only by a version that loaded and warmed up."""

    def __init__(
        self,
        name: str,
        repo: Repository,
        cache: LoaderCache,
        policy: LoadPolicy | None = None,
        *,
        loader: Loader = default_loader,
        trust_check: TrustCheck | None = None,
        warmup: bool = True,
        prober: Prober | None = None,
    ) -> None:
        """``prober``: load and warm up each version in a limited child first
        (:mod:`serving.isolation.prober`); None loads in this process directly. The slot
        closes it with itself."""
        self.name = name
        self.repo = repo
        self.cache = cache
        self.policy = policy or LoadPolicy()
        self._loader = loader
        self._trust_check = trust_check
        self._warmup = warmup
        self._prober = prober
        self._live: Live | None = None
        self._swap_lock = threading.Lock()
        self._companions: dict[str, Live] = {}
        """Canary and shadow versions loaded beside the live one (``role -> Live``)."""
        self._previous: Resolved | None = None
        """The version live before this one, put back if this one fails its probation."""
        self._failed: dict[tuple[str, str], str] = {}
        """Versions (version, manifest sha256) that failed their probation on this replica."""
        self._closed = False

    @property
    def live(self) -> Live | None:
        return self._live

    @property
    def version(self) -> str | None:
        live = self._live
        return live.version if live else None

    def load(self, resolved: Resolved, source: str = "store") -> Live:
        """Fetch, verify trust, load and warm up a version without making it live."""
        started = time.perf_counter()
        try:
            failed = self._failed.get((resolved.version, resolved.manifest_sha256))
            if failed is not None:
                raise LoadError(f"{resolved.name}:{resolved.version} failed on this replica: {failed}")
            policy = self.policy
            if self._trust_check is not None:
                policy = self._trust_check(self.repo, resolved)
            cached = self.cache.fetch(self.repo, resolved)
            if cached.hit:
                log.debug("cache hit for %s:%s", resolved.name, resolved.version)
            pin = self.cache.pin(cached)
            predictor = None
            try:
                if self._prober is not None:
                    # NOTE: the same verified bytes, in a child first: a crash, memory
                    # bomb or endless loop there fails this load, not this process.
                    self._prober.probe(cached, policy, warmup=self._warmup)
                # NOTE: measured across the framework's load and warm-up alone: fetching
                # and verifying the files is not the model's, nor are this process's lazy imports.
                rss_before, modules_before = rss_bytes(), len(sys.modules)
                predictor = self._loader(cached, policy)
                if isinstance(predictor, WorkerPredictor):
                    predictor.on_probation_failure = functools.partial(self._probation_failed, resolved)
                if self._warmup:
                    warm_up(predictor, cached.manifest)
                memory_bytes = (
                    0
                    if isinstance(predictor, WorkerPredictor)
                    else _in_process_bytes(
                        cached.manifest.total_bytes, rss_bytes() - rss_before, modules_before
                    )
                )
            except BaseException:
                if predictor is not None:
                    predictor.close()  # NOTE: a warm-up that failed must not leave its worker behind
                pin.release()
                raise
        except ServingError:
            metrics.LOADS.inc(model=self.name, outcome="failure")
            raise
        except Exception as exc:
            metrics.LOADS.inc(model=self.name, outcome="failure")
            raise LoadError(f"{resolved.name}:{resolved.version}: {type(exc).__name__}: {exc}") from exc
        metrics.LOADS.inc(model=self.name, outcome="success")
        metrics.LOAD_SECONDS.observe(time.perf_counter() - started, model=self.name)
        return Live(
            resolved.name,
            resolved.version,
            cached.manifest,
            cached.manifest_sha256,
            predictor,
            pin,
            memory_bytes=memory_bytes,
            resolved=resolved,
            source=source,
        )

    def swap_to(
        self,
        resolved: Resolved,
        *,
        reason: str = "alias moved",
        source: str = "store",
        expect_live: tuple[str, str] | None = None,
        still_wanted: Callable[[], bool] | None = None,
    ) -> Live:
        """Load ``resolved`` and make it live; on any failure the old version stays live.

        The load runs outside the swap lock, so a load that hangs on the store never
        holds up another swap (a rollback to a cached version); only the swap itself
        is under the lock.

        ``expect_live`` (version, manifest sha256): swap only while that version is live
        (a rollback off it); otherwise the live version is returned unchanged.
        ``still_wanted``: asked under the lock once the load is done; False discards the
        loaded version (a newer swap made it moot) and returns the live one unchanged.

        Raises:
            ServingError: the load failed; the live version is unchanged.
        """
        started = time.perf_counter()
        with self._swap_lock:
            old = self._live
            if expect_live is not None and (old is None or (old.version, old.manifest_sha256) != expect_live):
                # NOTE: swapped meanwhile: putting the previous version back is moot.
                if old is None:
                    raise NotReady(f"model {self.name!r}: nothing is live to roll back from")
                return old
            # NOTE: a promoted canary is already loaded and warm: it becomes live as is.
            adopted = self._adopt(resolved)
        new = adopted[1] if adopted is not None else None
        if new is None:
            try:
                new = self.load(resolved, source=source)
            except ServingError as exc:
                current = self._live
                self._load_failed(exc, current.version if current else None, resolved, started)
                raise
        with self._swap_lock:
            old = self._live
            key = (new.version, new.manifest_sha256)
            self._refuse_if_failed(new)
            moot = (
                (
                    expect_live is not None
                    and (old is None or (old.version, old.manifest_sha256) != expect_live)
                )
                or (still_wanted is not None and not still_wanted())
                or (old is not None and (old.version, old.manifest_sha256) == key)
            )
            if moot or self._closed:
                if adopted is not None and not self._closed and adopted[0] not in self._companions:
                    # NOTE: a promoted canary that is not swapped in goes back to its role, warm.
                    self._companions[adopted[0]] = new
                    metrics.ROLE_VERSION.set(1, model=self.name, version=new.version, role=adopted[0])
                else:
                    new.retire()
                if old is None or self._closed:
                    raise NotReady(f"model {self.name!r}: {resolved.version} is no longer wanted here")
                log.info(
                    "%s:%s loaded but no longer wanted; %s stays live",
                    self.name,
                    resolved.version,
                    old.version,
                )
                return old
            # NOTE: one attribute assignment is the swap; requests that already took a
            # lease on the old version finish on it.
            self._live = new
            from_version = old.version if old else None
            if old is not None:
                metrics.LIVE_VERSION.set(0, model=self.name, version=old.version)
                old.retire()
                metrics.SWAPS.inc(model=self.name)
                self._previous = old.resolved
            metrics.LIVE_VERSION.set(1, model=self.name, version=new.version)
            log.info(
                "swapped" if old else "loaded",
                extra=_event(
                    _event_name(old is not None, reason),
                    self.name,
                    from_version,
                    new.version,
                    started,
                    reason,
                ),
            )
            return new

    def _load_failed(
        self, exc: ServingError, from_version: str | None, resolved: Resolved, started: float, role: str = ""
    ) -> None:
        """Count and log a load that failed, for the live version or (``role``) a canary or shadow."""
        label = exc.reason if isinstance(exc, IsolationFailed) else type(exc).__name__
        metrics.SWAP_FAILURES.inc(model=self.name, reason=label)
        extra = _event("swap_failed", self.name, from_version, resolved.version, started, str(exc))
        if role:
            log.warning("%s load failed", role, extra=extra | {"role": role})
        else:
            log.warning("swap failed", extra=extra)

    def _refuse_if_failed(self, new: Live) -> None:
        """Under the swap lock: a version that failed its probation on this replica while it
        loaded is closed, never swapped in or given a role."""
        note = self._failed.get((new.version, new.manifest_sha256))
        if note is not None:
            new.retire()
            raise LoadError(f"{self.name}:{new.version} failed on this replica: {note}")

    def _probation_failed(self, resolved: Resolved, note: str) -> None:
        """``resolved``'s worker failed within its first requests: never serve it again on
        this replica, drop it from any role, and put the previous live version back."""
        key = (resolved.version, resolved.manifest_sha256)
        with self._swap_lock:
            self._failed[key] = note
            metrics.SWAP_FAILURES.inc(model=self.name, reason="probation")
            for role, companion in list(self._companions.items()):
                if (companion.version, companion.manifest_sha256) == key:
                    del self._companions[role]
                    metrics.ROLE_VERSION.set(0, model=self.name, version=companion.version, role=role)
                    companion.retire()
            live, previous = self._live, self._previous
        is_live = live is not None and (live.version, live.manifest_sha256) == key
        log.error("%s:%s marked failed on this replica: %s", self.name, resolved.version, note)
        if not is_live or previous is None or (previous.version, previous.manifest_sha256) == key:
            return
        try:
            self.swap_to(previous, reason="rollback", expect_live=key)
        except ServingError as exc:
            log.error("%s: putting back %s failed: %s", self.name, previous.version, exc)

    def failed_versions(self) -> dict[str, str]:
        """Versions that failed their probation here, with why."""
        return {version: note for (version, _), note in dict(self._failed).items()}

    def _adopt(self, resolved: Resolved) -> tuple[str, Live] | None:
        """Take a loaded companion of exactly this version out of its role (caller holds the lock);
        returns the role it had, and it."""
        for role, companion in list(self._companions.items()):
            if (
                companion.manifest_sha256 == resolved.manifest_sha256
                and companion.version == resolved.version
            ):
                del self._companions[role]
                metrics.ROLE_VERSION.set(0, model=self.name, version=companion.version, role=role)
                return role, companion
        return None

    def loaded(self) -> list[Live]:
        """The live version and its companions (canary, shadow)."""
        live = self._live
        return ([live] if live is not None else []) + list(self._companions.values())

    def companion(self, role: str) -> Live | None:
        """The version loaded for ``role`` (``canary`` or ``shadow``), if any."""
        return self._companions.get(role)

    def set_companion(
        self, role: str, resolved: Resolved, *, still_wanted: Callable[[], bool] | None = None
    ) -> Live:
        """Load ``resolved`` for ``role`` beside the live version, as carefully as a swap.

        The same trust check, isolation, load and warm-up as :meth:`swap_to`, and like
        it the load runs outside the swap lock; a failure is counted and logged as a
        failed swap, and whatever held the role before keeps it (requests never see a
        half-loaded version). ``still_wanted`` is asked once the load is done, as in
        :meth:`swap_to`.

        Raises:
            ServingError: the load failed, or was no longer wanted once done.
        """
        started = time.perf_counter()
        try:
            new = self.load(resolved)
        except ServingError as exc:
            old = self._companions.get(role)
            self._load_failed(exc, old.version if old else None, resolved, started, role=role)
            raise
        with self._swap_lock:
            self._refuse_if_failed(new)
            if self._closed or (still_wanted is not None and not still_wanted()):
                new.retire()
                raise NotReady(f"model {self.name!r}: {resolved.version} is no longer wanted as {role}")
            old = self._companions.get(role)
            self._companions[role] = new
            if old is not None:
                metrics.ROLE_VERSION.set(0, model=self.name, version=old.version, role=role)
                old.retire()
            metrics.ROLE_VERSION.set(1, model=self.name, version=new.version, role=role)
            log.info(
                "%s loaded",
                role,
                extra=_event(role, self.name, old.version if old else None, new.version, started, role)
                | {"role": role},
            )
            return new

    def drop_companion(self, role: str) -> None:
        """Stop using the version loaded for ``role``; in-flight requests finish on it."""
        with self._swap_lock:
            old = self._companions.pop(role, None)
            if old is not None:
                metrics.ROLE_VERSION.set(0, model=self.name, version=old.version, role=role)
                old.retire()
                log.info(
                    "%s dropped",
                    role,
                    extra={"event": f"{role}_dropped", "model": self.name, "version": old.version},
                )

    @contextmanager
    def lease_companion(self, role: str) -> Iterator[Live | None]:
        """A lease on ``role``'s version, or None when none is loaded (then use the live one)."""
        live = self._companions.get(role)
        if live is None or not live.try_acquire():
            yield None
            return
        try:
            yield live
        finally:
            live.release()

    @contextmanager
    def lease(self) -> Iterator[Live]:
        """Use the live version for one request; it is not released until the lease ends."""
        while True:
            live = self._live
            if live is None:
                raise NotReady(f"model {self.name!r} has no version loaded yet")
            # NOTE: a swap may retire `live` between the read and the lease; a retired
            # version refuses the lease, and the re-read finds its successor.
            if live.try_acquire():
                break
        try:
            yield live
        finally:
            live.release()

    def close(self) -> None:
        with self._swap_lock:
            self._closed = True
            live, self._live = self._live, None
            if live is not None:
                live.retire()
            for companion in self._companions.values():
                companion.retire()
            self._companions.clear()
            if self._prober is not None:
                self._prober.close()


class NotLoaded(LookupError):
    """A version asked for without loading it (``ResidentVersions.lease(load=False)``) is not loaded."""


class ResidentVersions:
    """Explicitly requested versions, kept loaded in a bounded LRU set (single-flight).

    State stays bounded whatever versions clients ask for: at most ``max_versions``
    loaded, at most ``max_loading`` loads at once (more are refused with
    :class:`Overloaded`, a 503 with ``Retry-After``), versions that do not exist
    remembered for ``miss_ttl_s`` (at most ``MAX_MISSES`` of them) so a repeated
    miss costs no store request, and no single-flight entry outlives its load.
    """

    MAX_MISSES = 1024

    def __init__(
        self,
        slot: ModelSlot,
        max_versions: int,
        *,
        max_loading: int = 1,
        miss_ttl_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._slot = slot
        self._max = max_versions
        self._loaded: OrderedDict[str, Live] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._load_slots = threading.BoundedSemaphore(max_loading)
        self._max_loading = max_loading
        self._miss_ttl_s = miss_ttl_s
        self._misses: OrderedDict[str, tuple[float, NotFound]] = OrderedDict()
        self._clock = clock
        self._closed = False

    def close(self) -> None:
        """Retire every loaded version (its model is unloaded): each closes when its last lease
        ends. A load that finishes later is retired at once and refused."""
        with self._lock:
            self._closed = True
            evicted = list(self._loaded.values())
            self._loaded.clear()
        for old in evicted:
            old.retire()

    @contextmanager
    def lease(self, version: str, *, load: bool = True) -> Iterator[Live]:
        """A lease on ``version``, loaded first unless it is. ``load=False``: raise
        :class:`NotLoaded` instead (the caller is on an event loop and checked it was loaded,
        but it may have been evicted since)."""
        live_now = self._slot.live
        if live_now is not None and live_now.version == version:
            with self._slot.lease() as live:
                if live.version == version:
                    yield live
                    return
        if load:
            live = self._get(version)  # NOTE: returned with a lease already taken
        else:
            with self._lock:
                leased = self._leased(version)
            if leased is None:
                raise NotLoaded(version)
            live = leased
        try:
            yield live
        finally:
            live.release()

    def _leased(self, version: str) -> Live | None:
        """The loaded version with a lease taken (caller holds ``_lock``; eviction pops under it)."""
        live = self._loaded.get(version)
        if live is None or not live.try_acquire():
            return None
        self._loaded.move_to_end(version)
        return live

    def _known_missing(self, version: str) -> None:
        """Raise the remembered NotFound of a recent miss (caller holds ``_lock``)."""
        miss = self._misses.get(version)
        if miss is None:
            return
        if self._clock() < miss[0]:
            raise miss[1]
        del self._misses[version]

    def _get(self, version: str) -> Live:
        with self._lock:
            live = self._leased(version)
            if live is not None:
                return live
            self._known_missing(version)
            gate = self._loading.setdefault(version, threading.Lock())
        with gate:
            with self._lock:
                live = self._leased(version)
                if live is not None:
                    return live
                self._known_missing(version)
            if not self._load_slots.acquire(blocking=False):
                raise Overloaded(
                    f"model {self._slot.name!r}: already loading {self._max_loading} other "
                    f"version(s) on this replica; retry {version!r} shortly",
                    retry_after_s=1,
                )
            try:
                resolved = self._slot.repo.resolve(f"{self._slot.name}:{version}")
                live = self._slot.load(resolved)
            except NotFound as exc:
                with self._lock:
                    self._misses[version] = (self._clock() + self._miss_ttl_s, exc)
                    while len(self._misses) > self.MAX_MISSES:
                        self._misses.popitem(last=False)
                raise
            finally:
                self._load_slots.release()
                with self._lock:
                    # NOTE: dropped on failure too, or every bad version leaves a lock behind.
                    if self._loading.get(version) is gate:
                        del self._loading[version]
            evicted: list[Live] = []
            with self._lock:
                closed = self._closed
                if closed:
                    evicted.append(live)
                else:
                    live.acquire()
                    self._loaded[version] = live
                while len(self._loaded) > self._max:
                    evicted.append(self._loaded.popitem(last=False)[1])
            # NOTE: out of the lock, which requests on the event loop take (versions()): closing
            # a version may wait for its model worker to stop. Popped under the lock, so no new
            # lease can reach it; the leases it has keep it until they end.
            for old in evicted:
                old.retire()
            if closed:
                raise Overloaded(f"model {self._slot.name!r} was unloaded; retry shortly", retry_after_s=1)
            return live

    def versions(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def loaded(self) -> list[Live]:
        with self._lock:
            return list(self._loaded.values())

    def pending(self) -> int:
        """Single-flight entries of loads in progress (0 when idle)."""
        with self._lock:
            return len(self._loading)


def _event_name(replaced: bool, reason: str) -> str:
    if not replaced:
        return "load"
    return "rollback" if reason == "rollback" else "swap"


def _event(
    event: str, model: str, from_v: str | None, to_v: str, started: float, reason: str
) -> dict[str, Any]:
    return {
        "event": event,
        "model": model,
        "from_version": from_v,
        "to_version": to_v,
        "duration_s": round(time.perf_counter() - started, 4),
        "reason": reason,
    }
