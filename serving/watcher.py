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
from serving.errors import AliasNotFound, ServingError, StoreError
from serving.repository import Resolved
from serving.slot import ModelSlot

log = logging.getLogger("serving.watch")

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
    ) -> None:
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
            self.slot.cache.remember_alias(name, self.alias, resolved.version, resolved.manifest_sha256)

    # -- one tick --------------------------------------------------------------
    def tick(self, force: bool = False) -> None:
        """Check the alias once (one small request when unchanged); swap if it moved.

        ``force`` means an operator asked to check now; it does not skip the failure
        backoff, so flooding load requests cannot re-download a failing version.
        """
        with self._lock:
            self._check_alias()
            target = self._target
            if target is None:
                return
            if target.version == self.slot.version:
                # NOTE: the alias came back to what is live (e.g. a rollback off a
                # version that failed): nothing is failing any more.
                if self._failed is not None:
                    self._failed, self._failures, self._last_error = None, 0, None
                return
            now = self._clock()
            if self._failed == target and now < self._retry_at:
                return
            self._try_swap(target, now)

    def _check_alias(self) -> None:
        name = self.slot.name
        try:
            check = self.slot.repo.check_alias(name, self.alias, self._etag)
        except (StoreError, AliasNotFound) as exc:
            metrics.ALIAS_CHECKS.inc(model=name, outcome="error")
            self._last_error = str(exc)
            log.warning("alias check failed for %s@%s: %s", name, self.alias, exc)
            self._update_age()
            return
        except ServingError as exc:
            metrics.ALIAS_CHECKS.inc(model=name, outcome="error")
            self._last_error = str(exc)
            self._update_age()
            return
        self._etag = check.etag
        self._mark_ok()
        if check.alias is None:
            metrics.ALIAS_CHECKS.inc(model=name, outcome="unchanged")
            return
        metrics.ALIAS_CHECKS.inc(model=name, outcome="changed")
        self._target = _Target(check.alias.version, check.alias.manifest_sha256)
        # NOTE: `serving rollback` pops the alias history; a plain move appends to it.
        history = len(check.alias.history)
        shrank = self._history_len is not None and history < self._history_len
        self._reason = "rollback" if shrank else "alias moved"
        self._history_len = history

    def _try_swap(self, target: _Target, now: float) -> None:
        name = self.slot.name
        try:
            resolved = self.slot.repo.resolve(f"{name}@{self.alias}")
            if resolved.version != target.version:
                # NOTE: the alias moved again between the check and now; follow the newest.
                target = _Target(resolved.version, resolved.manifest_sha256)
                self._target = target
            self._verify_target(resolved, target)
            self.slot.swap_to(resolved, reason=self._reason)
            self.slot.cache.remember_alias(name, self.alias, resolved.version, resolved.manifest_sha256)
        except ServingError as exc:
            if self._failed == target:
                self._failures += 1
            else:
                self._failed, self._failures = target, 1
            delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (self._failures - 1))
            self._retry_at = now + delay
            self._last_error = f"{target.version}: {exc}"
            return
        self._failed, self._failures, self._last_error = None, 0, None

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
        )


def run_forever(watcher: AliasWatcher, wait: Callable[[float], bool], stop: threading.Event) -> None:
    """Tick until ``stop`` is set. ``wait(timeout)`` returns True when a load was requested."""
    forced = False
    while not stop.is_set():
        try:
            watcher.tick(force=forced)
        except Exception:
            log.exception("alias watcher tick failed for %s", watcher.slot.name)
        forced = wait(watcher.next_delay())
