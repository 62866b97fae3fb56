"""The interface every store implements."""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

MAX_GET_BYTES = 4 * 1024**2
"""Default cap on :meth:`ObjectStore.get` (manifests, aliases, signatures are small)."""

Progress = Callable[[int], None]
"""Called with the number of bytes just transferred."""


class Sink(Protocol):
    """Where a download's bytes go, in order."""

    def write(self, data: bytes) -> int: ...


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str = ""
    """Changes whenever the object is written (as :meth:`ObjectStore.get` reports it)."""


def check_get_size(key: str, size: int, limit: int) -> None:
    """Refuse to read a "small" object (manifest, alias, signature) larger than ``limit``."""
    if size > limit:
        from serving.errors import InvalidManifest

        raise InvalidManifest(
            f"{key} is {size} bytes, over the {limit}-byte limit for manifests and aliases "
            "(SERVING_MAX_METADATA_BYTES); refusing to read it"
        )


class ObjectStore(ABC):
    """Bytes under ``/``-separated keys.

    Missing keys raise :class:`serving.errors.NotFound`; every other failure is
    a :class:`serving.errors.StoreError` with the library's error chained.
    """

    uri: str

    @abstractmethod
    def get(self, key: str) -> tuple[bytes, str]:
        """Return a small object's bytes and its ETag.

        Raises:
            InvalidManifest: the object is larger than the store's ``max_get_bytes``
                (checked from its size, before the body is read).
        """

    @abstractmethod
    def get_if_changed(self, key: str, etag: str | None) -> tuple[bytes | None, str]:
        """One small request: ``(None, etag)`` when the object still has ``etag``; capped like ``get``."""

    @abstractmethod
    def put(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> None:
        """Write a small object in one request, optionally as a compare-and-swap.

        Args:
            if_absent: create only; raises ``FileExistsError`` if the key exists.
            if_match: replace only if the object still has this ETag (the one
                :meth:`get` returned); raises :class:`serving.errors.StoreConflict`
                if it changed or vanished meanwhile.
        """

    @abstractmethod
    def upload(self, key: str, path: Path, progress: Progress | None = None) -> None:
        """Upload a file (multipart above the configured threshold)."""

    @abstractmethod
    def download(self, key: str, sink: Sink, progress: Progress | None = None) -> None:
        """Stream an object into ``sink`` in order, so the caller can hash it."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``."""

    @abstractmethod
    def list_dirs(self, prefix: str) -> builtins.list[str]:
        """The immediate "folders" below ``prefix`` (which ends with ``/``)."""
