"""A pull's total deadline and minimum rate, enforced even inside a blocked read.

A socket's read timeout only covers silence: a store that trickles one byte a
second never trips it, and a 256 KiB read then blocks for days. So every pull
of a version runs under a :class:`Pull` (``with pulling(...)``), which the
stores feed as bytes arrive:

- :meth:`Pull.received` counts bytes and raises :class:`StoreUnavailable` once the
  pull is over its deadline or under its minimum rate;
- a store whose reads block (S3) registers an *interrupter* per open response
  (:meth:`Pull.on_abort`); one watchdog thread checks every pull twice a second
  and, when one fails, calls its interrupters, which shut the sockets down so
  the blocked read returns at once.

The pull in progress is a context variable, so the stores need no new argument
on every download path (plain, encoded, encrypted); threads a store starts for
one download are bound to it by the store itself (:mod:`serving.store.s3`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from serving.errors import StoreUnavailable

log = logging.getLogger(__name__)

Clock = Callable[[], float]

_CURRENT: contextvars.ContextVar[Pull | None] = contextvars.ContextVar("serving_pull", default=None)

WATCH_INTERVAL_S = 0.5
"""How often the watchdog checks every pull in progress."""


class Pull:
    """One version's pull: a total deadline and a minimum rate over a sliding window.

    Args:
        label: what is pulled, for the error (``iris:3``).
        timeout_s: the whole pull must finish within this many seconds.
        min_bytes_per_s: over any ``window_s`` seconds (after the first), at least
            ``min_bytes_per_s * window_s`` bytes must arrive; 0 turns the rate check off.
        window_s: the window the rate is measured over.
    """

    def __init__(
        self,
        label: str,
        *,
        timeout_s: float,
        min_bytes_per_s: float,
        window_s: float,
        clock: Clock = time.monotonic,
    ) -> None:
        self.label = label
        self.timeout_s = timeout_s
        self.min_bytes_per_s = min_bytes_per_s
        self.window_s = window_s
        self._clock = clock
        self.started = clock()
        self.bytes = 0
        self._marks: deque[tuple[float, int]] = deque([(self.started, 0)])
        self._lock = threading.Lock()
        self._interrupters: dict[object, Callable[[], None]] = {}
        self._next_id = 0
        self.failure: str | None = None
        self._reading = 0
        self._window_start = self.started

    # -- fed by the stores -----------------------------------------------------------
    def received(self, n: int) -> None:
        """Count ``n`` bytes that arrived; raise if this pull has failed.

        Raises:
            StoreUnavailable: over the deadline or under the minimum rate.
        """
        with self._lock:
            self.bytes += n
        self.raise_if_failed()

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """A store read in progress: only then does the minimum rate apply.

        Work between reads (listing the version, hashing a blob another version shares)
        sends no bytes and must not count as a slow store; each read starts a fresh window.
        """
        with self._lock:
            if self._reading == 0:
                now = self._clock()
                self._window_start = now
                self._marks = deque([(now, self.bytes)])
            self._reading += 1
        try:
            yield
        finally:
            with self._lock:
                self._reading -= 1

    def raise_if_failed(self) -> None:
        failure = self.check()
        if failure is not None:
            raise StoreUnavailable(failure)

    def on_abort(self, interrupt: Callable[[], None], *, slot: object = None) -> Callable[[], None]:
        """Call ``interrupt`` (from the watchdog's thread) if this pull fails while it is registered.

        ``slot`` (e.g. the reading thread's id) replaces what that slot registered
        before, so a thread reading response after response holds one. Returns the
        function that unregisters it. A pull that has failed already interrupts at once.
        """
        with self._lock:
            if slot is None:
                slot = self._next_id
                self._next_id += 1
            key = slot
            self._interrupters[key] = interrupt
            failed = self.failure is not None
        if failed:
            _call_quietly(interrupt)

        def unregister() -> None:
            with self._lock:
                self._interrupters.pop(key, None)

        return unregister

    # -- judged by the watchdog -------------------------------------------------------
    def check(self) -> str | None:
        """The reason this pull has failed, or None; the first reason sticks."""
        now = self._clock()
        with self._lock:
            if self.failure is not None:
                return self.failure
            elapsed = now - self.started
            if self._reading:
                self._marks.append((now, self.bytes))
            # NOTE: keep the newest mark at least one window old, so the rate is over a full window.
            while len(self._marks) > 1 and self._marks[1][0] <= now - self.window_s:
                self._marks.popleft()
            if elapsed > self.timeout_s:
                self.failure = (
                    f"pull of {self.label} took over {self.timeout_s:g} s "
                    f"({self.bytes} bytes received; SERVING_PULL_TIMEOUT_S); abandoned"
                )
            elif self.min_bytes_per_s > 0 and self._reading and now - self._window_start >= self.window_s:
                since, then = self._marks[0]
                got = self.bytes - then
                if now - since >= self.window_s and got < self.min_bytes_per_s * self.window_s:
                    self.failure = (
                        f"pull of {self.label} fell under the minimum rate: {got} bytes in the last "
                        f"{now - since:.0f} s, under {self.min_bytes_per_s:g} bytes/s "
                        "(SERVING_PULL_MIN_BYTES_PER_S); abandoned"
                    )
            return self.failure

    def _abort(self) -> None:
        with self._lock:
            interrupters = list(self._interrupters.values())
        for interrupt in interrupters:
            _call_quietly(interrupt)


def _call_quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:
        log.exception("interrupting a failed pull raised")


class _Watchdog:
    """One daemon thread for the process: checks every pull in progress, interrupts the failed."""

    def __init__(self) -> None:
        self._pulls: set[Pull] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, pull: Pull) -> None:
        with self._lock:
            self._pulls.add(pull)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="pull-watchdog", daemon=True)
                self._thread.start()

    def discard(self, pull: Pull) -> None:
        with self._lock:
            self._pulls.discard(pull)

    def _run(self) -> None:
        while True:
            time.sleep(WATCH_INTERVAL_S)
            with self._lock:
                pulls = list(self._pulls)
            for pull in pulls:
                # NOTE: a response opened after the failure (a retry) is cut by on_abort itself.
                if pull.failure is None and pull.check() is not None:
                    log.warning("%s", pull.failure, extra={"event": "pull_abandoned"})
                    pull._abort()


_WATCHDOG = _Watchdog()


@contextlib.contextmanager
def pulling(
    label: str, *, timeout_s: float, min_bytes_per_s: float, window_s: float, clock: Clock = time.monotonic
) -> Iterator[Pull]:
    """Run a version's downloads under one :class:`Pull` (the stores find it with :func:`current`)."""
    pull = Pull(label, timeout_s=timeout_s, min_bytes_per_s=min_bytes_per_s, window_s=window_s, clock=clock)
    token = _CURRENT.set(pull)
    _WATCHDOG.add(pull)
    try:
        yield pull
    finally:
        _WATCHDOG.discard(pull)
        _CURRENT.reset(token)


def current() -> Pull | None:
    """The pull this thread is part of, if any."""
    return _CURRENT.get()
