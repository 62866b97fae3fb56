"""A local folder: the embedded default store."""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from serving.errors import NotFound, StoreConflict, StoreError, StoreNotFound
from serving.fileio import READ_CHUNK, TMP_PREFIX, atomic_write
from serving.store import pull as pulls
from serving.store.base import MAX_GET_BYTES, ObjectInfo, ObjectStore, Progress, Sink, check_get_size


class LocalStore(ObjectStore):
    def __init__(self, uri: str, *, max_get_bytes: int = MAX_GET_BYTES) -> None:
        parsed = urlparse(uri)
        path = unquote(parsed.path) if parsed.scheme == "file" else uri
        self.root = Path(path).expanduser().resolve()
        self.uri = self.root.as_uri()
        self.max_get_bytes = max_get_bytes

    def _path(self, key: str) -> Path:
        return self.root / key

    @staticmethod
    def _etag(path: Path) -> str:
        return LocalStore._etag_of(path.stat())

    @staticmethod
    def _etag_of(st: os.stat_result) -> str:
        return f"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}"

    def _missing(self, key: str) -> Exception:
        # NOTE: a missing root is an unreachable store (an unmounted volume), not a
        # missing key, so callers can fall back to the cache.
        if not self.root.is_dir():
            return StoreNotFound(f"store folder {self.root} does not exist")
        return NotFound(f"{key} not found in {self.uri}")

    def get(self, key: str) -> tuple[bytes, str]:
        path = self._path(key)
        try:
            # NOTE: one open file for the size check, the bytes and the ETag: a stat after
            # reading could see the next write's ETag beside this write's bytes, and a
            # compare-and-swap on that pair would silently drop the next write.
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                check_get_size(key, st.st_size, self.max_get_bytes)
                return f.read(), self._etag_of(st)
        except FileNotFoundError as exc:
            raise self._missing(key) from exc
        except OSError as exc:
            raise StoreError(f"cannot read {key} from {self.uri}: {exc.strerror}") from exc

    def get_if_changed(self, key: str, etag: str | None) -> tuple[bytes | None, str]:
        path = self._path(key)
        try:
            current = self._etag(path)
        except FileNotFoundError as exc:
            raise self._missing(key) from exc
        if current == etag:
            return None, current
        return self.get(key)

    def put(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> None:
        path = self._path(key)

        def replace(tmp: Path, path: Path) -> None:
            self._replace_locked(key, path, tmp, if_match)

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # NOTE: link() fails if the target exists: an atomic create-if-absent.
            atomic_write(path, data, fsync=True, publish=os.link if if_absent else replace)
        except (FileExistsError, StoreConflict):
            raise
        except OSError as exc:
            raise StoreError(f"cannot write {key} to {self.uri}: {exc.strerror}") from exc

    def _replace_locked(self, key: str, path: Path, tmp: Path, if_match: str | None) -> None:
        """Replace ``path`` by ``tmp`` under an exclusive lock: a compare-and-swap with ``if_match``."""
        lock = path.with_name(f"{TMP_PREFIX}{path.name}.lock")  # NOTE: .tmp- names are never listed
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                st: os.stat_result | None = path.stat()
            except FileNotFoundError:
                st = None
            if if_match is not None and (st is None or self._etag_of(st) != if_match):
                raise StoreConflict(f"{key} changed since it was read ({self.uri})")
            # NOTE: the ETag is (mtime, size, inode) and inodes are reused, so each write's
            # mtime is made strictly greater than the last: an ETag never comes back (no ABA).
            now = time.time_ns()
            mtime = max(now, st.st_mtime_ns + 1) if st is not None else now
            os.utime(tmp, ns=(mtime, mtime))
            os.replace(tmp, path)
        finally:
            os.close(fd)

    def upload(self, key: str, path: Path, progress: Progress | None = None) -> None:
        target = self._path(key)

        def copy(out: BinaryIO) -> None:
            with open(path, "rb") as src:
                while chunk := src.read(READ_CHUNK):
                    out.write(chunk)
                    if progress:
                        progress(len(chunk))

        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, copy)
        except OSError as exc:
            raise StoreError(f"cannot upload {key} to {self.uri}: {exc.strerror}") from exc

    def download(self, key: str, sink: Sink, progress: Progress | None = None) -> None:
        """Copy ``key`` into ``sink``. Only reading the store is a StoreError: the sink's own
        errors (the cache's disk full) pass through as they are, so they are named as such."""
        try:
            src = open(self._path(key), "rb")  # noqa: SIM115 -- NOTE: closed below; errors split by side
        except FileNotFoundError as exc:
            raise NotFound(f"{key} not found in {self.uri}") from exc
        except OSError as exc:
            raise StoreError(f"cannot read {key} from {self.uri}: {exc.strerror}") from exc
        pull = pulls.current()
        with src, pull.reading() if pull else contextlib.nullcontext():
            while True:
                try:
                    chunk = src.read(READ_CHUNK)
                except OSError as exc:
                    raise StoreError(f"cannot read {key} from {self.uri}: {exc.strerror}") from exc
                if not chunk:
                    return
                if pull is not None:
                    pull.received(len(chunk))
                sink.write(chunk)
                if progress:
                    progress(len(chunk))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[ObjectInfo]:
        base = self._path(prefix.rstrip("/")) if prefix.endswith("/") else self.root
        if not base.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix) and not name.startswith(TMP_PREFIX):
                    st = full.lstat()
                    out.append(ObjectInfo(key, st.st_size, self._etag_of(st)))
        return sorted(out, key=lambda o: o.key)

    def list_dirs(self, prefix: str) -> builtins.list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir())
