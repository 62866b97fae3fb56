"""Low-level file helpers: one atomic write, one hashing writer, one file hash.

Every module that writes a file readers must see whole (cache stamps, alias
memory, remembered signatures, isolation passes, local store objects) goes
through :func:`atomic_write`; every stream whose bytes a manifest vouches for
goes through :class:`HashingWriter`.

Example:
    >>> atomic_write(Path("aliases/iris/production.json"), json.dumps(body))  # doctest: +SKIP
    >>> size, sha256 = hash_file(Path("model.joblib"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from serving.errors import IntegrityError

if TYPE_CHECKING:
    from serving.store.base import Sink

__all__ = ["TMP_PREFIX", "HashingWriter", "atomic_write", "hash_file", "mounted_files"]

TMP_PREFIX = ".tmp-"
"""Names of temporary files beside their target start with this (stores never list them)."""

READ_CHUNK = 8 * 1024 * 1024
"""Bytes read (and hashed) at a time from a local file. Large on purpose: each read and each
hash gives the GIL back, and a thread that wants it back while the event loop is busy waits
up to the switch interval (5 ms), so 1 MiB chunks made a 43 MB pull beside requests take
4 to 7 times as long as alone (bench/results notes, issue 23)."""

Content = bytes | str | Callable[[BinaryIO], object]
"""What :func:`atomic_write` writes: bytes, text (UTF-8), or a function that writes into the file."""


def atomic_write(
    path: Path,
    content: Content,
    *,
    fsync: bool = False,
    mode: int = 0o600,
    tmp: Path | None = None,
    publish: Callable[[Path, Path], object] = os.replace,
) -> None:
    """Write ``path`` whole or not at all: into a new temporary file, then ``publish(tmp, path)``.

    Args:
        content: bytes, text, or a function that writes into the open binary file.
        fsync: flush the bytes to disk before publishing them.
        mode: permissions of the new file (before the umask).
        tmp: the temporary file; defaults to a fresh ``.tmp-*`` name beside ``path``.
        publish: ``os.replace`` (the default); ``os.link`` to create ``path`` only if
            it is absent (raises FileExistsError); or a caller's own, e.g. a
            compare-and-swap under a lock.

    Raises:
        OSError: from creating, writing or publishing. The temporary file is
            removed whatever happens; ``path`` is never left half written.
    """
    tmp = tmp if tmp is not None else path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, bytes):
                f.write(content)
            elif isinstance(content, str):
                f.write(content.encode())
            else:
                content(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        publish(tmp, path)
    finally:
        # NOTE: gone after a replace; still there after a link or a failure.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class HashingWriter:
    """Passes bytes on to ``sink`` while counting and hashing them (sha256).

    Args:
        sink: where the bytes go (a file, or the next writer of a chain).
        limit: refuse (IntegrityError) as soon as more bytes than this arrive;
            None for no limit.
        label: names the file in errors, e.g. ``iris:3/model.joblib``.
        what: which bytes these are in errors (``stored``, ``plaintext``), if any.
    """

    def __init__(self, sink: Sink, limit: int | None = None, label: str = "", what: str = "") -> None:
        self._sink, self._limit, self._label = sink, limit, label
        self._bytes = f"{what} bytes" if what else "bytes"
        self._sha256 = f"{what} sha256" if what else "sha256"
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self._limit is not None and self.size > self._limit:
            raise IntegrityError(f"{self._label}: more {self._bytes} than the manifest declares")
        self.hash.update(data)
        self._sink.write(data)
        return len(data)

    def hexdigest(self) -> str:
        return self.hash.hexdigest()

    def check(self, size: int, sha256: str) -> None:
        """Refuse unless exactly ``size`` bytes with digest ``sha256`` went through.

        Raises:
            IntegrityError: the size or the digest differs from the manifest's.
        """
        if self.size != size:
            raise IntegrityError(f"{self._label}: {self.size} {self._bytes}, the manifest says {size}")
        digest = self.hexdigest()
        if digest != sha256:
            raise IntegrityError(
                f"{self._label}: {self._sha256} {digest[:16]}... does not match the "
                f"manifest's {sha256[:16]}..."
            )


def hash_file(path: Path, expected_size: int | None = None) -> tuple[int, str]:
    """The size and sha256 (hex) of the regular file at ``path``, read in chunks.

    Only a regular file is read, never through a symlink (a cached link to ``/dev/zero``
    read for ever). With ``expected_size``, at most one byte more is read: a longer file
    is reported with that size, which already says it is not the expected one.

    Raises:
        OSError: the file cannot be opened, is a symlink (``ELOOP``) or is not a regular
            file (``EINVAL``).
    """
    digest = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb", buffering=0) as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        left = None if expected_size is None else expected_size + 1
        # NOTE: sized by the file (a small one costs no 8 MiB), at least 64 KiB (a file that
        # grows meanwhile, or says it is empty, is not read a byte at a time).
        size_hint = max(info.st_size + 1, 64 * 1024)
        buffer = memoryview(bytearray(min(READ_CHUNK, size_hint, left or READ_CHUNK)))
        while left is None or left > 0:
            read = f.readinto(buffer if left is None or left >= len(buffer) else buffer[:left])
            if not read:
                break
            digest.update(buffer[:read])
            size += read
            if left is not None:
                left -= read
    return size, digest.hexdigest()


def mounted_files(path: Path) -> list[Path]:
    """``path`` itself, or for a directory (a mounted Kubernetes Secret) its regular files, sorted.

    Hidden entries are skipped: a Secret's ``..data`` links are hidden, its per-key links followed.
    """
    if path.is_dir():
        return sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())
    return [path]
