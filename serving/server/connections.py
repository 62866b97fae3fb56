"""The standalone server's HTTP connections: bounded in time and in number.

uvicorn waits for a new connection's first request for ever and accepts as many
connections as the process has file descriptors: 1,000 connections that never
send a byte stayed open indefinitely. :class:`GuardedHttpToolsProtocol` is
uvicorn's own httptools protocol with two limits (issue 21):

- **a header deadline.** A request's headers must be complete within
  ``SERVING_HTTP_HEADER_TIMEOUT_S`` of its first byte (of the connection, for
  the first request): a client that sends nothing, or one byte a second, is
  closed. Between requests, uvicorn's keep-alive timeout
  (``SERVING_HTTP_KEEP_ALIVE_S``) applies.
- **a connection limit that evicts the idle.** Past
  ``SERVING_HTTP_MAX_CONNECTIONS`` (lowered to what the process's open-file
  limit holds, which is raised to its hard limit), a new connection closes the connection that
  has waited longest without a request in progress; only when every connection
  is busy is the new one closed instead. So idle connections can never lock a
  real client out: it waits for no timeout.

Example:
    uvicorn.Config(app, http="serving.server.connections:GuardedHttpToolsProtocol")
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.settings import get_settings

__all__ = ["PROTOCOL", "ConnectionLimits", "GuardedHttpToolsProtocol", "limits"]

log = logging.getLogger(__name__)

PROTOCOL = f"{__name__}:GuardedHttpToolsProtocol"
"""What to pass as uvicorn's ``http`` (an import string, so spawned workers find it too)."""


class ConnectionLimits:
    """The settings, read once per process."""

    def __init__(self, header_timeout_s: float, keep_alive_s: float, max_connections: int) -> None:
        self.header_timeout_s = header_timeout_s
        self.keep_alive_s = keep_alive_s
        self.max_connections = max_connections


@functools.cache
def limits() -> ConnectionLimits:
    settings = get_settings()
    return ConnectionLimits(
        settings.http_header_timeout_s,
        settings.http_keep_alive_s,
        min(settings.http_max_connections, descriptor_room()),
    )


_RESERVED_FILES = 256
"""Descriptors kept for everything but client connections (models, workers, logs, the store)."""


def descriptor_room() -> int:
    """How many connections this process can hold: its open-file limit (raised to the hard
    limit first) less a reserve. Past it accept() fails before eviction could make room."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(16, soft - _RESERVED_FILES)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a header deadline and idle eviction."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits()
        self._header_timer: asyncio.TimerHandle | None = None
        self.idle_since: float | None = None
        """When this connection last had no request in progress (None while one is)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.idle_since = time.monotonic()
        self._arm_header_deadline()
        if len(self.connections) > self._limits.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.idle_since is not None and self._between_requests():
            # NOTE: the first byte of a request on a kept-alive connection starts its deadline.
            self._arm_header_deadline()
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        self.idle_since = None
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # NOTE: after super(), which may have started the next pipelined request: idle only
        # when no request is in progress (a busy connection is never evicted or timed out).
        if self.cycle is None or self.cycle.response_complete:
            self._disarm_header_deadline()
            self.idle_since = time.monotonic()

    # -- limits ------------------------------------------------------------------------------

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_timer = self.loop.call_later(self._limits.header_timeout_s, self._header_deadline_passed)

    def _disarm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline_passed(self) -> None:
        self._header_timer = None
        if self.idle_since is not None and not self.transport.is_closing():
            # NOTE: no response: the client never finished asking (nginx and HAProxy do the same).
            self.transport.close()

    def _make_room(self) -> None:
        idle = [
            c
            for c in self.connections
            if isinstance(c, GuardedHttpToolsProtocol) and c.idle_since is not None
        ]
        idle = [c for c in idle if c is not self and not c.transport.is_closing()]
        if idle:
            min(idle, key=lambda c: c.idle_since or 0.0).transport.close()
            return
        log.warning("all %d connections have a request in progress; closing a new one", len(self.connections))
        self.transport.close()
