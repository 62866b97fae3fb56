"""A local folder: the embedded default store."""

from __future__ import annotations

import builtins
import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from serving.errors import NotFound, StoreError, StoreNotFound
from serving.store.base import MAX_GET_BYTES, ObjectInfo, ObjectStore, Progress, Sink, check_get_size

_CHUNK = 1024 * 1024


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
        st = path.stat()
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
            check_get_size(key, path.stat().st_size, self.max_get_bytes)
            return path.read_bytes(), self._etag(path)
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

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if if_absent:
                # NOTE: link() fails if the target exists: an atomic create-if-absent.
                try:
                    os.link(tmp, path)
                finally:
                    os.unlink(tmp)
            else:
                os.replace(tmp, path)
        except FileExistsError:
            raise
        except OSError as exc:
            raise StoreError(f"cannot write {key} to {self.uri}: {exc.strerror}") from exc

    def upload(self, key: str, path: Path, progress: Progress | None = None) -> None:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    if progress:
                        progress(len(chunk))
            os.replace(tmp, target)
        except OSError as exc:
            raise StoreError(f"cannot upload {key} to {self.uri}: {exc.strerror}") from exc

    def download(self, key: str, sink: Sink, progress: Progress | None = None) -> None:
        try:
            with open(self._path(key), "rb") as src:
                while chunk := src.read(_CHUNK):
                    sink.write(chunk)
                    if progress:
                        progress(len(chunk))
        except FileNotFoundError as exc:
            raise NotFound(f"{key} not found in {self.uri}") from exc
        except OSError as exc:
            raise StoreError(f"cannot read {key} from {self.uri}: {exc.strerror}") from exc

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
                if key.startswith(prefix) and not name.startswith(".tmp-"):
                    out.append(ObjectInfo(key, full.lstat().st_size))
        return sorted(out, key=lambda o: o.key)

    def list_dirs(self, prefix: str) -> builtins.list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir())
