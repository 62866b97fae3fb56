"""S3 and S3-compatible stores (MinIO) through boto3.

Endpoint and credentials come from boto3's standard chain: ``AWS_ENDPOINT_URL``
or ``AWS_ENDPOINT_URL_S3`` for MinIO, env keys, profiles, web identity (IRSA).
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import logging
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

from serving.errors import (
    InvalidReference,
    InvalidRequest,
    NotFound,
    StoreAccessDenied,
    StoreConflict,
    StoreError,
    StoreNotFound,
    StoreUnavailable,
)
from serving.settings import Settings
from serving.store import pull as pulls
from serving.store.base import ObjectInfo, ObjectStore, Progress, Sink, check_get_size

_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden"}
_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "503", "500"}


class _OrderedSink:
    """Non-seekable file object: s3transfer then writes parts strictly in order."""

    def __init__(self, sink: Sink, pull: pulls.Pull | None = None) -> None:
        self._sink = sink
        self._pull = pull

    def write(self, data: bytes) -> int:
        if self._pull is not None:
            self._pull.raise_if_failed()
        self._sink.write(data)
        return len(data)

    def seekable(self) -> bool:
        return False


class S3Store(ObjectStore):
    def __init__(self, uri: str, settings: Settings) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        parsed = urlparse(uri)
        if not parsed.netloc:
            raise InvalidReference(f"S3 URI {uri!r} has no bucket: use s3://bucket/prefix")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        # NOTE: the setting is validated to one of botocore's literals; the stubs want the Literal type.
        s3_options: Any = {"addressing_style": settings.s3_addressing_style}
        config = Config(
            retries={"mode": "standard", "max_attempts": settings.s3_max_attempts},
            connect_timeout=settings.s3_connect_timeout,
            read_timeout=settings.s3_read_timeout,
            s3=s3_options,
            max_pool_connections=32,
        )
        # NOTE: a Session per store; boto3's default session is not thread-safe to create.
        self._client: Any = boto3.session.Session().client("s3", config=config)
        self._transfer = TransferConfig(
            multipart_threshold=settings.s3_multipart_threshold,
            multipart_chunksize=max(8 * 1024**2, settings.s3_multipart_threshold // 8),
            max_concurrency=8,
        )

        self._write_args, self._read_args = _sse_args(settings)
        self.max_get_bytes = settings.max_metadata_bytes
        # NOTE: s3transfer reads in its own threads, so a download's pull is found by key:
        # each GetObject response of a key being pulled can be cut when its pull fails.
        self._pulls: dict[str, list[pulls.Pull]] = {}
        self._pulls_lock = threading.Lock()
        events = self._client.meta.events
        events.register("provide-client-params.s3.GetObject", _remember_key)
        events.register("after-call.s3.GetObject", self._bind_body)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _translate(self, exc: Exception, what: str) -> Exception:
        """Map botocore errors to this project's error tree (the caller chains them)."""
        from botocore.exceptions import (
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        where = f"{what} ({self.uri})"
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                return StoreNotFound(f"no such bucket {self.bucket!r}: {where}")
            if code in {"NoSuchKey", "404", "NotFound"}:
                return NotFound(f"not found: {where}")
            if code in _DENIED:
                return StoreAccessDenied(f"access denied ({code}): {where}")
            if code in _THROTTLED:
                return StoreUnavailable(f"store throttled or failing ({code}): {where}")
            return StoreError(f"S3 error {code}: {where}")
        if isinstance(exc, NoCredentialsError):
            return StoreAccessDenied(f"no AWS credentials found: {where}")
        if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError):
            return StoreUnavailable(f"store unreachable: {where}")
        return StoreError(f"{type(exc).__name__}: {where}")

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, what) from exc

    def get(self, key: str) -> tuple[bytes, str]:
        data, etag = self.get_if_changed(key, None)
        assert data is not None
        return data, etag

    def get_if_changed(self, key: str, etag: str | None) -> tuple[bytes | None, str]:
        from botocore.exceptions import BotoCoreError, ClientError

        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), **self._read_args}
        if etag:
            kwargs["IfNoneMatch"] = etag
        try:
            resp = self._client.get_object(**kwargs)
        except ClientError as exc:
            # NOTE: boto3 reports "304 Not Modified" as a ClientError with code "304".
            if etag and exc.response.get("Error", {}).get("Code") == "304":
                return None, etag
            raise self._translate(exc, f"get {key}") from exc
        except BotoCoreError as exc:
            raise self._translate(exc, f"get {key}") from exc
        body = resp["Body"]
        try:
            check_get_size(key, int(resp.get("ContentLength") or 0), self.max_get_bytes)
            data = body.read(self.max_get_bytes + 1)
        finally:
            body.close()
        check_get_size(key, len(data), self.max_get_bytes)
        return data, resp["ETag"]

    def put(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> None:
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._key(key),
            "Body": data,
            **self._write_args,
        }
        # NOTE: S3 conditional writes: If-None-Match: * creates only, If-Match replaces only
        # the object we read. S3 answers 412 when the condition fails, 409 when a
        # concurrent conditional write to the same key is in progress.
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.put_object(**kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code"))
            lost = code in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
            if if_absent and lost:
                raise FileExistsError(key) from exc
            if if_match is not None and (lost or code in {"NoSuchKey", "404"}):
                raise StoreConflict(f"{key} changed since it was read ({self.uri})") from exc
            raise self._translate(exc, f"put {key}") from exc
        except BotoCoreError as exc:
            raise self._translate(exc, f"put {key}") from exc

    def upload(self, key: str, path: Path, progress: Progress | None = None) -> None:
        self._call(
            f"upload {key}",
            self._client.upload_file,
            Filename=str(path),
            Bucket=self.bucket,
            Key=self._key(key),
            Config=self._transfer,
            Callback=progress,
            ExtraArgs=self._write_args or None,
        )

    def download(self, key: str, sink: Sink, progress: Progress | None = None) -> None:
        pull = pulls.current()
        callback = progress
        if pull is not None:

            def callback(n: int) -> None:
                pull.received(n)
                if progress is not None:
                    progress(n)

        with self._pulling(self._key(key), pull), pull.reading() if pull else contextlib.nullcontext():
            self._call(
                f"download {key}",
                self._download,
                full_key=self._key(key),
                sink=_OrderedSink(sink, pull),
                callback=callback,
            )

    def _download(self, full_key: str, sink: _OrderedSink, callback: Progress | None) -> None:
        """``download_fileobj``, but on daemon threads: a read that the store holds up (a
        hang before the answer's first byte) then cannot hold up the process's exit."""
        from boto3.s3.transfer import ProgressCallbackInvoker
        from s3transfer.manager import TransferManager

        subscribers = [ProgressCallbackInvoker(callback)] if callback is not None else None
        # NOTE: the stubs name the stdlib's pool; s3transfer needs only submit and shutdown.
        daemon_pool: Any = _DaemonThreads
        with TransferManager(self._client, self._transfer, executor_cls=daemon_pool) as manager:
            manager.download(
                bucket=self.bucket,
                key=full_key,
                fileobj=cast(Any, sink),
                extra_args=self._read_args or None,
                subscribers=subscribers,
            ).result()

    @contextlib.contextmanager
    def _pulling(self, full_key: str, pull: pulls.Pull | None) -> Iterator[None]:
        if pull is None:
            yield
            return
        with self._pulls_lock:
            self._pulls.setdefault(full_key, []).append(pull)
        try:
            yield
        finally:
            with self._pulls_lock:
                bound = self._pulls.get(full_key, [])
                bound.remove(pull)
                if not bound:
                    self._pulls.pop(full_key, None)

    def _bind_body(self, parsed: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        """After a GetObject of a key being pulled: let its pull cut this response's socket."""
        with self._pulls_lock:
            bound = list(self._pulls.get(context.get(_KEY_CONTEXT) or "", ()))
        if not bound:
            return
        body = parsed.get("Body")
        live = [p for p in bound if p.failure is None]
        if not live:
            # NOTE: a retry after the pull failed: refuse it before reading a byte.
            if body is not None:
                body.close()
            raise StoreUnavailable(bound[0].failure or "pull abandoned")
        if body is not None:
            for pull in live:
                # NOTE: one per reading thread: its next response replaces this one. A finished
                # response has released its socket, so a late interrupt finds none to shut.
                pull.on_abort(functools.partial(_shut_down, body), slot=threading.get_ident())

    def exists(self, key: str) -> bool:
        try:
            self._call(
                f"head {key}",
                self._client.head_object,
                Bucket=self.bucket,
                Key=self._key(key),
                **self._read_args,
            )
        except NotFound:
            # NOTE: a HEAD's 404 carries no error code, so a missing bucket looks like a
            # missing key; one bucket HEAD tells them apart (StoreNotFound if it is gone).
            try:
                self._call("head bucket", self._client.head_bucket, Bucket=self.bucket)
            except NotFound as exc:
                raise StoreNotFound(f"no such bucket {self.bucket!r}: {self.uri}") from exc
            return False
        return True

    def _paginate(self, what: str, **kwargs: Any) -> list[dict[str, Any]]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, **kwargs)
            return list(pages)
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, what) from exc

    def list(self, prefix: str) -> list[ObjectInfo]:
        strip = len(self._key(""))
        out = []
        for page in self._paginate(f"list {prefix}", Prefix=self._key(prefix)):
            for obj in page.get("Contents", []):
                out.append(ObjectInfo(obj["Key"][strip:], int(obj["Size"]), str(obj.get("ETag", ""))))
        return sorted(out, key=lambda o: o.key)

    def list_dirs(self, prefix: str) -> builtins.list[str]:
        full = self._key(prefix)
        out = []
        for page in self._paginate(f"list {prefix}", Prefix=full, Delimiter="/"):
            for cp in page.get("CommonPrefixes", []):
                out.append(cp["Prefix"][len(full) :].rstrip("/"))
        return sorted(out)


class _DaemonThreads:
    """``ThreadPoolExecutor``'s interface on daemon threads, for s3transfer.

    A ``ThreadPoolExecutor``'s threads are joined when the interpreter exits, so one
    read stuck on a store that never answers kept a stopped server alive.
    """

    def __init__(self, max_workers: int) -> None:
        self._max = max_workers
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], Any, Any] | None] = (
            queue.SimpleQueue()
        )
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.put((future, fn, args, kwargs))
        with self._lock:
            if len(self._threads) < self._max:
                thread = threading.Thread(target=self._work, name="s3-transfer", daemon=True)
                self._threads.append(thread)
                thread.start()
        return future

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 -- NOTE: handed to the future, as the stdlib's pool does
                future.set_exception(exc)

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        if wait:
            for thread in threads:
                thread.join()


_KEY_CONTEXT = "serving_key"


def _remember_key(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
    """Keep the request's key in botocore's request context, for ``after-call``."""
    context[_KEY_CONTEXT] = params.get("Key")


def _shut_down(body: Any) -> None:
    """Shut a streaming response's socket down, so a read blocked on it returns now.

    ``close()`` from another thread does not wake a blocked ``recv``; ``shutdown`` does.
    """
    raw = getattr(body, "_raw_stream", None)
    sock = getattr(getattr(raw, "_connection", None), "sock", None)
    if sock is None:
        buffered = getattr(getattr(raw, "_fp", None), "fp", None)
        sock = getattr(getattr(buffered, "raw", None), "_sock", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


_REDACTED: set[str] = set()
_LIBRARY_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")


def _redact_from_logs(key: bytes) -> None:
    """Keep an SSE-C key out of every log record boto3 and its libraries write.

    A filter on the ``botocore`` logger would not see its children's records, so
    the record factory redacts, and only for those libraries' loggers.
    """
    import base64

    secrets = {base64.b64encode(key).decode(), repr(key)}
    if secrets <= _REDACTED:
        return
    first = not _REDACTED
    _REDACTED.update(secrets)
    if not first:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if record.name.startswith(_LIBRARY_LOGGERS):
            message = record.getMessage()
            if any(s in message for s in _REDACTED):
                for s in _REDACTED:
                    message = message.replace(s, "***")
                record.msg, record.args = message, None
        return record

    logging.setLogRecordFactory(factory)


def _sse_args(settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """Server-side encryption arguments: (for writes, for reads).

    SSE-S3 and SSE-KMS apply to writes only (S3 decrypts transparently); SSE-C's
    key goes with every request that touches object data, writes and reads.
    """
    import base64
    import binascii

    write: dict[str, Any] = {}
    read: dict[str, Any] = {}
    if settings.s3_sse:
        write["ServerSideEncryption"] = settings.s3_sse
        if settings.s3_sse == "aws:kms" and settings.s3_sse_kms_key_id:
            write["SSEKMSKeyId"] = settings.s3_sse_kms_key_id
    if settings.s3_sse_c_key is not None:
        if settings.s3_sse:
            raise InvalidRequest("s3_sse and s3_sse_c_key are exclusive: choose one server-side encryption")
        try:
            key = base64.b64decode(settings.s3_sse_c_key.get_secret_value(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest("SERVING_S3_SSE_C_KEY is not base64") from exc
        if len(key) != 32:
            raise InvalidRequest("SERVING_S3_SSE_C_KEY must be base64 of exactly 32 bytes")
        # NOTE: boto3 adds the key's MD5 and base64-encodes it; botocore's DEBUG logs print
        # request parameters and headers, so both spellings are redacted from its records.
        _redact_from_logs(key)
        read = {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": key}
        write.update(read)
    return write, read
