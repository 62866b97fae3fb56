"""A real S3 HTTP server on loopback (moto), with a request counter.

``MotoS3`` runs moto's S3 on ``127.0.0.1`` in a thread. It can be stopped and
restarted on the same port (a store outage), and it records every request it
answers (method, bucket, key, status, bytes in and out) so tests can assert
what a client really cost.

Moto keeps its buckets in process-wide memory, not in the server: a restarted
server, or a second ``MotoS3`` in the same process, sees the same buckets.

Example:
    >>> with MotoS3() as s3:  # doctest: +SKIP
    ...     os.environ.update(s3.env())
    ...     s3.client().create_bucket(Bucket="models")
    ...     ...
    ...     s3.count("GET", key="iris/aliases/production.json")
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import unquote

from werkzeug.serving import ThreadedWSGIServer

from serving.server.process import free_port as _free_port

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on right now (also: a closed port for outage tests); see
    :func:`serving.server.process.free_port`."""
    return _free_port(host)


@dataclass(frozen=True)
class S3Request:
    """One request the server received, and what it answered so far."""

    method: str
    bucket: str | None
    key: str | None
    query: str
    status: int
    bytes_in: int
    bytes_out: int
    header_bytes_in: int = 0
    """Request line and headers, as received (approximately: ``Name: value\r\n`` each)."""
    header_bytes_out: int = 0
    """Status line and the headers the app set (the HTTP server adds ``Server``/``Date``)."""


@dataclass
class _Entry:
    """A request being answered; it is recorded when it arrives and completed as it is answered."""

    method: str
    bucket: str | None
    key: str | None
    query: str
    bytes_in: int
    header_bytes_in: int
    status: int = 0
    bytes_out: int = 0
    header_bytes_out: int = 0

    def frozen(self) -> S3Request:
        return S3Request(
            self.method,
            self.bucket,
            self.key,
            self.query,
            self.status,
            self.bytes_in,
            self.bytes_out,
            self.header_bytes_in,
            self.header_bytes_out,
        )


class _Recorder:
    """WSGI middleware recording every request.

    NOTE: a request is recorded when it arrives and its status and byte counts are
    updated before anything reaches the client, so whatever a client has seen
    answered is already counted (``reset_counts()`` right after a call is exact).
    """

    def __init__(self, app: Any) -> None:
        self._app = app
        self._lock = threading.Lock()
        self._entries: list[_Entry] = []
        self.stalls: dict[str, tuple[int, threading.Event]] = {}
        self.hangs: dict[str, threading.Event] = {}
        self.trickles: dict[str, tuple[int, threading.Event]] = {}
        self.spoils: dict[str, str] = {}

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        bucket, key = _split_path(environ.get("PATH_INFO", "/"))
        entry = _Entry(
            method=str(environ.get("REQUEST_METHOD", "")),
            bucket=bucket,
            key=key,
            query=str(environ.get("QUERY_STRING", "")),
            bytes_in=int(environ.get("CONTENT_LENGTH") or 0),
            header_bytes_in=_request_header_bytes(environ),
        )
        with self._lock:
            self._entries.append(entry)
        hang = self.hangs.get(entry.key or "") if entry.method == "GET" else None
        if hang is not None:
            # NOTE: no status line, no byte: the client waits for the answer until it gives up.
            hang.wait()

        def recording_start_response(status_line: str, headers: Any, exc_info: Any = None) -> Any:
            entry.status = int(status_line.split(" ", 1)[0])
            entry.header_bytes_out = len(f"HTTP/1.1 {status_line}\r\n\r\n") + sum(
                len(f"{k}: {v}\r\n") for k, v in headers
            )
            return start_response(status_line, headers, exc_info)

        body = self._app(environ, recording_start_response)
        return self._count(entry, body)

    def _count(self, entry: _Entry, body: Iterable[bytes]) -> Iterator[bytes]:
        stall = self.stalls.get(entry.key or "") if entry.method == "GET" else None
        trickle = self.trickles.get(entry.key or "") if entry.method == "GET" else None
        spoil = self.spoils.get(entry.key or "") if entry.method == "GET" else None
        try:
            if spoil is not None:
                body = _spoiled(b"".join(body), spoil)
            for chunk in body:
                while trickle is not None and chunk and not trickle[1].is_set():
                    # NOTE: bytes keep coming, so a read timeout (which covers silence) never fires.
                    head, chunk = chunk[: trickle[0]], chunk[trickle[0] :]
                    entry.bytes_out += len(head)
                    yield head
                    trickle[1].wait(1.0)
                if stall is not None and entry.bytes_out + len(chunk) > stall[0]:
                    cut = stall[0] - entry.bytes_out
                    head, chunk = chunk[:cut], chunk[cut:]
                    entry.bytes_out += len(head)
                    yield head
                    stall[1].wait()
                    stall = None
                entry.bytes_out += len(chunk)
                yield chunk
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()

    def snapshot(self) -> list[S3Request]:
        with self._lock:
            return [e.frozen() for e in self._entries]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class _CutShort(Exception):
    """Raised mid-body: the server drops the connection with the answer half sent."""


def _spoiled(data: bytes, how: str) -> Iterator[bytes]:
    """``garbage``: as many random bytes instead; ``truncated``: the first half, then the connection drops."""
    import os

    if how == "garbage":
        yield os.urandom(len(data))
        return
    yield data[: len(data) // 2]
    raise _CutShort(f"cut after {len(data) // 2} of {len(data)} bytes")


def _request_header_bytes(environ: dict[str, Any]) -> int:
    target = environ.get("RAW_URI") or environ.get("PATH_INFO", "")
    size = len(f"{environ.get('REQUEST_METHOD', '')} {target} HTTP/1.1\r\n") + 2
    for name, value in environ.items():
        if name.startswith("HTTP_") or name in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            size += len(name) - (5 if name.startswith("HTTP_") else 0) + len(str(value)) + 4
    return size


def _split_path(path: str) -> tuple[str | None, str | None]:
    """``/bucket/key/parts`` (path-style addressing) -> ``(bucket, key)``."""
    parts = unquote(path).lstrip("/").split("/", 1)
    bucket = parts[0] or None
    key = parts[1] if len(parts) > 1 and parts[1] else None
    return bucket, key


class _Server(ThreadedWSGIServer):
    """Tracks open connections so ``stop()`` really cuts keep-alive clients off."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self._conns_lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()


def _quiet_handler() -> Any:
    from moto.moto_server.werkzeug_app import MotoRequestHandler

    class QuietHandler(MotoRequestHandler):
        # NOTE: one access-log line per request would drown test output.
        def log_request(self, code: Any = "-", size: Any = "-") -> None:
            pass

    return QuietHandler


class MotoS3:
    """Moto's S3 on ``127.0.0.1:<port>`` in a thread, restartable, counting requests.

    Args:
        port: ``0`` picks a free port once; ``restart()`` reuses it.
    """

    def __init__(self, port: int = 0) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        self.port = port or free_port()
        self._recorder = _Recorder(DomainDispatcherApplication(create_backend_app))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> MotoS3:
        """Listen on the port (the same one on every restart)."""
        if self._server is not None:
            return self
        server = _Server(HOST, self.port, self._recorder, handler=_quiet_handler())
        thread = threading.Thread(target=server.serve_forever, name=f"moto-s3-{self.port}", daemon=True)
        thread.start()
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        """Stop listening and cut open connections: clients now get "connection refused"."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.drop_connections()
        if thread is not None:
            thread.join(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """The store is down inside the block and back up after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- clients -----------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """Environment for boto3 (this process or a child) to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> Any:
        """A plain boto3 S3 client for test setup (creating buckets, tampering)."""
        import boto3
        from botocore.config import Config

        env = self.env()
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
            config=Config(s3={"addressing_style": "path"}),
        )

    # -- counting ----------------------------------------------------------------
    @property
    def requests(self) -> list[S3Request]:
        """Every request answered since the last ``reset_counts()``, in order."""
        return self._recorder.snapshot()

    def reset_counts(self) -> None:
        self._recorder.clear()

    def matching(
        self, method: str | None = None, *, bucket: str | None = None, key: str | None = None
    ) -> list[S3Request]:
        return [
            r
            for r in self._recorder.snapshot()
            if (method is None or r.method == method)
            and (bucket is None or r.bucket == bucket)
            and (key is None or r.key == key)
        ]

    def count(self, method: str | None = None, *, bucket: str | None = None, key: str | None = None) -> int:
        """How many requests matched (``method`` like ``"GET"``; ``key`` without the bucket)."""
        return len(self.matching(method, bucket=bucket, key=key))

    # -- failure injection ---------------------------------------------------------
    @contextlib.contextmanager
    def stall(self, key: str, after_bytes: int = 256 * 1024) -> Iterator[None]:
        """GETs of ``key`` (without the bucket) send ``after_bytes`` bytes, then hang until the block exits.

        A download is then deterministically caught mid-way, e.g. to kill its process.
        """
        gate = threading.Event()
        self._recorder.stalls[key] = (after_bytes, gate)
        try:
            yield
        finally:
            del self._recorder.stalls[key]
            gate.set()

    @contextlib.contextmanager
    def hang(self, *keys: str) -> Iterator[None]:
        """GETs of ``keys`` (without the bucket) get no answer at all until the block exits."""
        gate = threading.Event()
        for key in keys:
            self._recorder.hangs[key] = gate
        try:
            yield
        finally:
            for key in keys:
                self._recorder.hangs.pop(key, None)
            gate.set()

    @contextlib.contextmanager
    def trickle(self, *keys: str, bytes_per_s: int = 1) -> Iterator[None]:
        """GETs of ``keys`` answer at once, then send the body ``bytes_per_s`` bytes a second
        until the block exits (then the rest at full speed)."""
        gate = threading.Event()
        for key in keys:
            self._recorder.trickles[key] = (bytes_per_s, gate)
        try:
            yield
        finally:
            for key in keys:
                self._recorder.trickles.pop(key, None)
            gate.set()

    @contextlib.contextmanager
    def spoil(self, how: str, *keys: str) -> Iterator[None]:
        """GETs of ``keys`` answer 200 with a bad body until the block exits: ``garbage`` (random
        bytes of the right length) or ``truncated`` (half of it, then the connection drops)."""
        if how not in ("garbage", "truncated"):
            raise ValueError(f"unknown spoil {how!r}: garbage or truncated")
        for key in keys:
            self._recorder.spoils[key] = how
        try:
            yield
        finally:
            for key in keys:
                self._recorder.spoils.pop(key, None)

    # -- authentication ------------------------------------------------------------
    @contextlib.contextmanager
    def require_auth(self) -> Iterator[None]:
        """Check signatures against moto's IAM inside the block.

        Moto accepts any credentials by default. Here it checks every request
        against its (empty) IAM, so keys it never issued, such as the
        ``testing`` keys of :meth:`env`, are refused with ``InvalidAccessKeyId``.
        This is process-wide in moto: don't run other S3 tests meanwhile.
        """
        from moto import settings as moto_settings
        from moto.core.authorization import ActionAuthenticatorMixin

        previous = moto_settings.INITIAL_NO_AUTH_ACTION_COUNT
        moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        ActionAuthenticatorMixin.request_count = 0
        try:
            yield
        finally:
            moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = previous
            ActionAuthenticatorMixin.request_count = 0
