"""Following an alias: cheap polling with jitter, swap on change, backoff on failure.

The watcher is plain Python: the clock, the random source and the wait between
ticks are injected, so tests drive it tick by tick with no sleeps, and the Ray
layer makes the wait a long-poll that a ``/load`` request can cut short.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from serving import metrics
from serving.errors import AliasNotFound, IntegrityError, ServingError, StoreError
from serving.manifest import Alias, CanaryTarget, ShadowTarget, sha256_bytes
from serving.repository import AliasCheck, Resolved
from serving.runtime.slot import ModelSlot

log = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass
class _Target:
    version: str
    manifest_sha256: str


@dataclass
class WatchStatus:
    """What a replica reports: where the alias points and what it serves."""

    model: str
    alias: str | None
    target_version: str | None
    live_version: str | None
    last_check_age_s: float | None
    """Seconds since the last successful alias check (None before the first)."""
    last_error: str | None
    failed_version: str | None
    source: str | None
    canary: dict[str, object] | None = None
    """The alias's canary on this replica: version, weight, ``loaded``, and ``error`` if it failed."""
    shadow: dict[str, object] | None = None
    """The alias's shadow on this replica: version, fraction, ``loaded``, ``error``."""


@dataclass
class _CompanionFailure:
    target: _Target
    failures: int
    retry_at: float
    error: str


@dataclass
class _Job:
    """One load a tick started: a swap to the alias's target, or a canary or shadow load."""

    role: str
    target: _Target
    done: threading.Event
    error: ServingError | None = None
    loaded: bool = False
    """The version became live (or took its role); False if it was no longer wanted."""


MAX_PENDING_CHECKS = 4
"""Abandoned alias checks still waiting for the store; past this, no new one starts."""


@dataclass(frozen=True)
class Split:
    """What a replica does with requests now: only versions that loaded take a share."""

    canary_weight: float = 0.0
    shadow_fraction: float = 0.0


class AliasWatcher:
    """Keeps one slot on the version its alias points to."""

    def __init__(
        self,
        slot: ModelSlot,
        alias: str,
        *,
        interval_s: float = 5.0,
        jitter: float = 0.2,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        check_timeout_s: float = 10.0,
        load_wait_s: float = 60.0,
    ) -> None:
        """``check_timeout_s``: an alias check that has not answered by then is abandoned.
        ``load_wait_s``: how long one tick waits for the loads it started, checking the
        alias again every interval meanwhile; a load still running then goes on in the
        background and is judged by a later tick."""
        self.slot = slot
        self.alias = alias
        self.interval_s = interval_s
        self.jitter = jitter
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 -- NOTE: jitter, not cryptography
        self._etag: str | None = None
        self._target: _Target | None = None
        self._failures = 0
        self._failed: _Target | None = None
        self._retry_at = 0.0
        self._last_ok: float | None = None
        self._last_error: str | None = None
        self._history_len: int | None = None
        self._reason = "alias moved"
        self._lock = threading.Lock()
        self._canary: CanaryTarget | None = None
        self._shadow: ShadowTarget | None = None
        self._companion_failed: dict[str, _CompanionFailure] = {}
        self._split = Split()
        self.check_timeout_s = check_timeout_s
        self.load_wait_s = load_wait_s
        self._superseded: list[_Job] = []
        """Loads replaced by a newer target that still run; one is needed again if the alias
        comes back to its target before it ends."""
        self._jobs: dict[str, _Job] = {}
        """The load in flight per role (``live``, ``canary``, ``shadow``): at most one each that
        a tick waits for; one superseded by a newer target runs out in the background."""
        self._pending_checks = 0
        self._pending_lock = threading.Lock()
        self._events_seen: int | None = None
        self.stopping = threading.Event()
        """Set when the server stops: a tick waiting for the store or a load returns at once."""

    # -- start ---------------------------------------------------------------
    def start(self) -> None:
        """Load the alias's version; with the store down, the cache's remembered one.

        If the target fails to load (isolation, trust, digest or warm-up), the last
        version this node served for the alias stands in (``source="last_good"``)
        and the target is retried with the usual backoff, so a bad target cannot
        keep a restarting replica from serving.

        Raises:
            ServingError: nothing could be loaded; the replica must not become ready.
        """
        # NOTE: remembered only once it passed the trust checks and loaded, so a refused
        # (replayed, unsigned) or crashing alias target never becomes the fallback.
        name = self.slot.name
        resolved, from_cache = self.slot.cache.resolve(self.slot.repo, f"{name}@{self.alias}", remember=False)
        target = _Target(resolved.version, resolved.manifest_sha256)
        self._target = target
        if not from_cache:
            self._mark_ok()
        try:
            self.slot.swap_to(resolved, reason="start", source="cache" if from_cache else "store")
        except ServingError as exc:
            fallback = self.slot.cache.last_good(name, self.alias)
            if fallback is None or fallback.manifest_sha256 == resolved.manifest_sha256:
                raise
            log.warning(
                "%s@%s -> %s failed to load; serving the last good version %s: %s",
                name,
                self.alias,
                resolved.version,
                fallback.version,
                exc,
                extra={
                    "event": "last_good",
                    "model": name,
                    "from_version": resolved.version,
                    "to_version": fallback.version,
                    "reason": str(exc),
                },
            )
            self.slot.swap_to(fallback, reason="last good", source="last_good")
            self._failed, self._failures = target, 1
            self._retry_at = self._clock() + self.backoff_base_s
            self._last_error = f"{target.version}: {exc}"
            return
        if not from_cache:
            self.slot.cache.remember_alias(
                name, self.alias, resolved.version, resolved.manifest_sha256, resolved.alias_raw
            )

    # -- one tick --------------------------------------------------------------
    def tick(self, force: bool = False) -> bool:
        """Check the alias once (one small request when unchanged); start loads if it moved.

        Returns whether the store answered a check in this tick.

        Nothing the store does can hold the alias unwatched: the check is abandoned
        after ``check_timeout_s``, and each load runs in its own thread. While the tick
        waits for its loads (at most ``load_wait_s``), it checks the alias again every
        interval, so a newer target (a rollback to a cached version) is loaded beside a
        pull that hangs and swapped in as soon as it is ready; the older load is
        discarded when it ends.

        ``force`` means an operator asked to check now; it does not skip the failure
        backoff, so flooding load requests cannot re-download a failing version.
        """
        with self._lock:
            deadline = time.monotonic() + self.load_wait_s
            read = False
            while True:
                read = self._step() or read
                # NOTE: a load still running past one interval does not hold up the alias:
                # it is checked again, and a newer target's load starts beside the old one.
                slice_end = min(deadline, time.monotonic() + self.interval_s)
                if self._settle(slice_end) or time.monotonic() >= deadline or self.stopping.is_set():
                    break
            self._reap()
            self._split = self._current_split()
            metrics.CANARY_WEIGHT.set(self._split.canary_weight, model=self.slot.name)
        return read

    def _step(self) -> bool:
        """Check the alias, judge the loads that ended, and start the ones the alias now needs.

        Returns whether the store answered the check."""
        read = self._check_alias()
        self._reap()
        target = self._target
        if target is None:
            return read
        now = self._clock()
        if self._is_live(target):
            # NOTE: the alias came back to what is live (e.g. a rollback off a
            # version that failed): nothing is failing any more.
            if self._failed is not None:
                self._failed, self._failures, self._last_error = None, 0, None
        elif not (self._failed == target and now < self._retry_at):
            self._start("live", target, self._swap_job)
        # NOTE: after the live swap is started, so a promoted canary is adopted as live, not dropped.
        self._sync_companions(now)
        return read

    def _is_live(self, target: _Target) -> bool:
        live = self.slot.live
        return live is not None and (live.version, live.manifest_sha256) == (
            target.version,
            target.manifest_sha256,
        )

    def _check_alias(self) -> bool:
        """Read the alias (conditionally); whether the store answered."""
        name = self.slot.name
        outcome: list[object] = []
        done = threading.Event()
        with self._pending_lock:
            if self._pending_checks >= MAX_PENDING_CHECKS:
                metrics.ALIAS_CHECKS.inc(model=name, outcome="error")
                self._last_error = f"{self._pending_checks} alias checks are still waiting for the store"
                self._update_age()
                return False
            self._pending_checks += 1
        etag = self._etag

        def check() -> None:
            try:
                outcome.append(self.slot.repo.check_alias(name, self.alias, etag))
            except Exception as exc:  # noqa: BLE001 -- NOTE: judged by the tick below
                outcome.append(exc)
            finally:
                with self._pending_lock:
                    self._pending_checks -= 1
                done.set()

        threading.Thread(target=check, name=f"alias-check-{name}", daemon=True).start()
        if not self._wait(done, time.monotonic() + self.check_timeout_s):
            # NOTE: abandoned, not cancelled: the thread ends with the store's own timeouts,
            # and its answer is dropped; the next tick starts a fresh check.
            metrics.ALIAS_CHECKS.inc(model=name, outcome="error")
            self._last_error = (
                f"alias check of {name}@{self.alias} did not answer within {self.check_timeout_s:g} s "
                "(SERVING_ALIAS_CHECK_TIMEOUT_S); abandoned"
            )
            log.warning("%s", self._last_error)
            self._update_age()
            return False
        result = outcome[0]
        if isinstance(result, StoreError | AliasNotFound):
            metrics.ALIAS_CHECKS.inc(model=name, outcome="error")
            self._last_error = str(result)
            log.warning("alias check failed for %s@%s: %s", name, self.alias, result)
            self._update_age()
            # NOTE: a missing alias is an answer; a store that failed gave none.
            return isinstance(result, AliasNotFound)
        if isinstance(result, ServingError):
            # NOTE: the store answered with an alias this node refuses (e.g. a bad signature).
            metrics.ALIAS_CHECKS.inc(model=name, outcome="error")
            self._last_error = str(result)
            self._update_age()
            return True
        if isinstance(result, BaseException):
            raise result
        check_result: AliasCheck = result  # type: ignore[assignment]
        self._etag = check_result.etag
        self._mark_ok()
        if check_result.alias is None:
            metrics.ALIAS_CHECKS.inc(model=name, outcome="unchanged")
            return True
        metrics.ALIAS_CHECKS.inc(model=name, outcome="changed")
        self._count_events(check_result.alias)
        self._remember_same_target(check_result.alias, check_result.raw)
        self._target = _Target(check_result.alias.version, check_result.alias.manifest_sha256)
        self._canary, self._shadow = check_result.alias.canary, check_result.alias.shadow
        # NOTE: `serving rollback` pops the alias history; a plain move appends to it.
        history = len(check_result.alias.history)
        shrank = self._history_len is not None and history < self._history_len
        self._reason = "rollback" if shrank else "alias moved"
        self._history_len = history
        return True

    # -- loads in their own threads ---------------------------------------------------
    def _start(self, role: str, target: _Target, body: Callable[[_Job], None]) -> None:
        """Start ``body`` for ``role``'s ``target`` unless that very load is already running."""
        running = self._jobs.get(role)
        if running is not None and running.target == target and not running.done.is_set():
            return
        if running is not None and not running.done.is_set():
            self._superseded.append(running)
        self._superseded = [j for j in self._superseded if not j.done.is_set()]
        again = next((j for j in self._superseded if (j.role, j.target) == (role, target)), None)
        if again is not None:
            # NOTE: the alias came back to a target whose load is still running: that load is
            # needed again, rather than a second one of the same version.
            self._superseded.remove(again)
            self._jobs[role] = again
            return
        job = _Job(role, target, threading.Event())
        self._jobs[role] = job

        def run() -> None:
            try:
                body(job)
            except ServingError as exc:
                job.error = exc
            except Exception as exc:
                log.exception("loading %s:%s as %s failed", self.slot.name, target.version, role)
                job.error = ServingError(f"{type(exc).__name__}: {exc}")
            finally:
                job.done.set()

        threading.Thread(target=run, name=f"load-{self.slot.name}-{role}", daemon=True).start()

    def _settle(self, until: float) -> bool:
        """Wait until ``until`` (monotonic) for the loads the alias needs; True if all ended.

        A load the alias no longer needs (it went back to the live version, or dropped the
        canary) runs out in the background and is not waited for.
        """
        return all(self._wait(job.done, until) for job in list(self._jobs.values()) if self._needed(job))

    def _needed(self, job: _Job) -> bool:
        """Whether ``job`` is still the load the alias needs for its role."""
        if self._jobs.get(job.role) is not job:
            return False
        if job.role == "live":
            return job.target == self._target and not self._is_live(job.target)
        return self._wanted(job.role) == job.target

    def _wait(self, event: threading.Event, until: float) -> bool:
        """``event.wait`` until ``until`` (monotonic), cut short when the server stops."""
        while not event.is_set():
            left = until - time.monotonic()
            if left <= 0 or self.stopping.is_set():
                return False
            event.wait(min(left, 0.1))
        return True

    def _reap(self) -> None:
        """Judge the loads that ended: failures back off, superseded ones are forgotten."""
        now = self._clock()
        for role, job in list(self._jobs.items()):
            if not job.done.is_set():
                continue
            del self._jobs[role]
            if role == "live":
                self._reap_swap(job, now)
            else:
                self._reap_companion(job, now)

    def _swap_job(self, job: _Job) -> None:
        name = self.slot.name
        resolved = self.slot.repo.resolve(f"{name}@{self.alias}")
        if (resolved.version, resolved.manifest_sha256) != (job.target.version, job.target.manifest_sha256):
            if resolved.version == job.target.version:
                self._verify_target(resolved, job.target)
            # NOTE: the alias moved again since the check; the next tick follows the newest.
            return
        live = self.slot.swap_to(resolved, reason=self._reason, still_wanted=lambda: self._needed(job))
        if live.manifest_sha256 == resolved.manifest_sha256 and live.version == resolved.version:
            job.loaded = True
            self.slot.cache.remember_alias(
                name, self.alias, resolved.version, resolved.manifest_sha256, resolved.alias_raw
            )

    def _reap_swap(self, job: _Job, now: float) -> None:
        if job.error is None:
            if job.loaded:
                self._failed, self._failures, self._last_error = None, 0, None
            return
        if job.target != self._target:
            return  # NOTE: superseded; its failure says nothing about the current target
        if self._failed == job.target:
            self._failures += 1
        else:
            self._failed, self._failures = job.target, 1
        delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (self._failures - 1))
        self._retry_at = now + delay
        self._last_error = f"{job.target.version}: {job.error}"

    def _count_events(self, alias: Alias) -> None:
        """Count the rollout events written since the last object this replica saw (not
        those already there when it first looked: every replica start would count them)."""
        # NOTE: an event is never newer than the object that carries it; one that claims to be
        # (a hand-written alias) would otherwise stop every later event from being counted.
        events = [e for e in alias.events or [] if e.sequence <= alias.seq]
        newest = max((e.sequence for e in events), default=0)
        if self._events_seen is not None:
            for event in events:
                if event.sequence > self._events_seen:
                    metrics.ALIAS_EVENTS.inc(model=self.slot.name, event=event.event)
                    log.info(
                        "%s@%s: %s %s (%s)",
                        self.slot.name,
                        self.alias,
                        event.event,
                        event.version,
                        event.detail,
                        extra={"event": f"rollout_{event.event}", "model": self.slot.name},
                    )
        self._events_seen = max(newest, self._events_seen or 0)

    def _remember_same_target(self, alias: Alias, raw: bytes | None) -> None:
        """A new object for the target this node already remembers (a canary step, an abort, a
        re-sign that extends ``expires_at``) replaces the remembered object, so an offline
        restart checks the newest one this node saw (its signature is checked then)."""
        mem = self.slot.cache.remembered_alias(self.slot.name, self.alias)
        if raw is None or mem is None:
            return
        if (mem.version, mem.manifest_sha256) == (alias.version, alias.manifest_sha256):
            self.slot.cache.remember_alias(self.slot.name, self.alias, mem.version, mem.manifest_sha256, raw)

    # -- canary and shadow -----------------------------------------------------------
    def _sync_companions(self, now: float) -> None:
        """Drop, or start loading, the canary and shadow versions to match the alias.

        A version that fails to load is retried with the same backoff as a failed
        swap; meanwhile its role is empty, so every request goes to the live version.
        """
        live = self.slot.live
        for role, want in (("canary", self._canary), ("shadow", self._shadow)):
            loaded = self.slot.companion(role)
            if want is None or (live is not None and live.manifest_sha256 == want.manifest_sha256):
                swapping = self._jobs.get("live")
                adopting = (
                    swapping is not None
                    and not swapping.done.is_set()
                    and loaded is not None
                    and loaded.manifest_sha256 == swapping.target.manifest_sha256
                )
                # NOTE: a promoted canary is left for the swap in flight to adopt, warm as it is.
                if loaded is not None and not adopting:
                    self.slot.drop_companion(role)
                self._companion_failed.pop(role, None)
                continue
            target = _Target(want.version, want.manifest_sha256)
            if loaded is not None and loaded.manifest_sha256 == target.manifest_sha256:
                continue
            failed = self._companion_failed.get(role)
            if failed is not None and failed.target == target and now < failed.retry_at:
                continue
            self._start(role, target, self._companion_job)

    def _wanted(self, role: str) -> _Target | None:
        want = self._canary if role == "canary" else self._shadow
        return None if want is None else _Target(want.version, want.manifest_sha256)

    def _companion_job(self, job: _Job) -> None:
        self.slot.set_companion(
            job.role,
            self._resolve_companion(job.target),
            still_wanted=lambda: self._needed(job),
        )
        job.loaded = True

    def _reap_companion(self, job: _Job, now: float) -> None:
        role, target = job.role, job.target
        if job.error is None:
            self._companion_failed.pop(role, None)
            return
        if self._wanted(role) != target:
            return
        # NOTE: an older canary must not keep the share the alias gave the new one.
        self.slot.drop_companion(role)
        failed = self._companion_failed.get(role)
        failures = failed.failures + 1 if failed is not None and failed.target == target else 1
        delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (failures - 1))
        self._companion_failed[role] = _CompanionFailure(
            target, failures, now + delay, f"{target.version}: {job.error}"
        )

    def _resolve_companion(self, target: _Target) -> Resolved:
        """``name:version`` with the alias object's bytes, so signed-alias checks apply to it too."""
        repo, name = self.slot.repo, self.slot.name
        _, alias_raw, _ = repo.read_alias(name, self.alias)
        manifest, raw = repo.manifest(name, target.version)
        if sha256_bytes(raw) != target.manifest_sha256:
            raise IntegrityError(f"{name}:{target.version}: manifest changed since the alias was set")
        return Resolved(name, target.version, manifest, raw, alias=self.alias, alias_raw=alias_raw)

    def _current_split(self) -> Split:
        canary, shadow = self._canary, self._shadow
        c_live, s_live = self.slot.companion("canary"), self.slot.companion("shadow")
        weight = (
            canary.weight if canary and c_live and c_live.manifest_sha256 == canary.manifest_sha256 else 0.0
        )
        fraction = (
            shadow.fraction if shadow and s_live and s_live.manifest_sha256 == shadow.manifest_sha256 else 0.0
        )
        return Split(weight, fraction)

    @property
    def split(self) -> Split:
        """The canary's weight and the shadow's fraction, each 0 unless its version is loaded here."""
        return self._split

    def _companion_status(
        self, role: str, want: CanaryTarget | ShadowTarget | None
    ) -> dict[str, object] | None:
        if want is None:
            return None
        loaded = self.slot.companion(role)
        failed = self._companion_failed.get(role)
        share = ("weight", want.weight) if isinstance(want, CanaryTarget) else ("fraction", want.fraction)
        return {
            "version": want.version,
            share[0]: share[1],
            "loaded": loaded is not None and loaded.manifest_sha256 == want.manifest_sha256,
            "error": failed.error if failed is not None else None,
        }

    @staticmethod
    def _verify_target(resolved: Resolved, target: _Target) -> None:
        from serving.errors import IntegrityError

        if resolved.manifest_sha256 != target.manifest_sha256:
            raise IntegrityError(
                f"{resolved.name}:{resolved.version}: manifest changed since the alias was set"
            )

    def _mark_ok(self) -> None:
        self._last_ok = self._clock()
        self._last_error = None if self._failed is None else self._last_error
        self._update_age()

    def _update_age(self) -> None:
        if self._last_ok is not None:
            metrics.ALIAS_CHECK_AGE.set(self._clock() - self._last_ok, model=self.slot.name)

    # -- scheduling ---------------------------------------------------------------
    def next_delay(self) -> float:
        """Seconds until the next tick: the interval with jitter, or the retry time if sooner."""
        spread = self.interval_s * self.jitter
        delay = self.interval_s + self._rng.uniform(-spread, spread)
        if self._failed is not None:
            delay = min(delay, max(0.0, self._retry_at - self._clock()))
        return max(0.05, delay)

    def status(self) -> WatchStatus:
        live = self.slot.live
        return WatchStatus(
            model=self.slot.name,
            alias=self.alias,
            target_version=self._target.version if self._target else None,
            live_version=live.version if live else None,
            last_check_age_s=None if self._last_ok is None else round(self._clock() - self._last_ok, 3),
            last_error=self._last_error,
            failed_version=self._failed.version if self._failed else None,
            source=live.source if live else None,
            canary=self._companion_status("canary", self._canary),
            shadow=self._companion_status("shadow", self._shadow),
        )


def run_forever(watcher: AliasWatcher, wait: Callable[[float, bool], bool], stop: threading.Event) -> None:
    """Tick until ``stop`` is set.

    ``wait(timeout, read)`` is told whether the tick read the alias (a load request is
    done only then: a check the store failed has not looked), and returns True when a
    load was requested."""
    watcher.stopping = stop
    forced = False
    while not stop.is_set():
        started = time.monotonic()
        read = False
        try:
            read = watcher.tick(force=forced)
        except Exception:
            log.exception("alias watcher tick failed for %s", watcher.slot.name)
        # NOTE: a tick that waited for a load counts against the interval: the next check
        # is due one interval after the last one started, not after the load.
        spent = time.monotonic() - started
        forced = wait(max(0.05, watcher.next_delay() - spent), read)
