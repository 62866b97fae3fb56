"""Node-local loader cache: content-addressed, digest-checked, single-flight, LRU by bytes.

Layout under the cache dir (``0700``; files ``0600``)::

    blobs/<sha256[:2]>/<sha256>        verified file contents, stored once
    versions/<model>/<version>-<msha>/ one complete version: hard links + manifest.json
    locks/                             file locks: single flight, pins, eviction
    aliases/<model>/<alias>.json       last resolved target of each alias
    stamps/<model>/<version>-<msha>.json  size, mtime and inode of each file when last hashed
    tmp/<owner>-*.part|.dir            partial downloads (never loadable), named by their process

A version directory is assembled in ``tmp/`` and renamed into place, so it is
either complete or absent. Every byte is hashed while it streams; a mismatch
leaves nothing behind. A version in use holds a shared ``flock`` on its pin
file, which eviction (taking it exclusively) never breaks; the lock dies with
the process, so a crashed replica never pins forever.

A cache hit is not trusted on ``manifest.json`` alone: each file's size,
mtime and inode must still be what they were when its bytes were last hashed
(the stamp), and every ``reverify_s`` the whole version is re-hashed anyway.
A file that changed is re-hashed; a mismatch evicts the version, counts it
(``serving_cache_corrupt_total``) and pulls it again, so changed bytes are
never loaded.

Each process holds an exclusive ``flock`` on ``locks/owner-<owner>.lock`` and
names its partial downloads after it; a partial file whose owner's lock is
free belongs to a dead process and is swept at open and at each eviction pass.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from filelock import FileLock

from serving import metrics
from serving.errors import (
    CacheError,
    IntegrityError,
    NotFound,
    ServingError,
    StoreError,
    StoreUnavailable,
    UntrustedArtifact,
)
from serving.fileio import HashingWriter, atomic_write, hash_file
from serving.manifest import (
    MANIFEST_NAME,
    OMS_SIGNATURE_NAME,
    SIGNATURE_NAME,
    FileEntry,
    Manifest,
    ModelRef,
    check_name,
    sha256_bytes,
)
from serving.repository import Repository, Resolved
from serving.store import pull as pulls
from serving.store.base import Progress

if TYPE_CHECKING:
    from serving.crypto import Keyring
    from serving.settings import Settings

log = logging.getLogger(__name__)

ProgressFactory = Callable[[str, int], Progress | None]
"""``(label, total_bytes) -> callback``: how the CLI shows progress bars."""


@dataclass(frozen=True)
class CachedVersion:
    """A complete, verified version directory in the cache."""

    name: str
    version: str
    path: Path
    manifest: Manifest
    manifest_sha256: str
    hit: bool


@dataclass(frozen=True)
class Remembered:
    """The last target an alias resolved to on this node."""

    version: str
    manifest_sha256: str
    resolved_at: float
    """When this target was first remembered (an unchanged one is not written again)."""
    alias_raw: bytes | None = None
    """The alias object's exact bytes as resolved (its signature and expiry are re-checked offline)."""


_OWNERS: dict[tuple[int, Path], tuple[str, int]] = {}
_OWNERS_LOCK = threading.Lock()


def _owner(root: Path) -> str:
    """This process's owner token in ``root``, whose lock it holds until it exits."""
    key = (os.getpid(), root)
    with _OWNERS_LOCK:
        if key not in _OWNERS:
            token = uuid.uuid4().hex[:16]
            fd = os.open(root / "locks" / f"owner-{token}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            _OWNERS[key] = (token, fd)  # NOTE: the fd stays open: the lock lives as long as we do
        return _OWNERS[key][0]


@contextlib.contextmanager
def _disk_errors(what: str) -> Iterator[None]:
    """Turn an OSError into a CacheError with a one-line reason (disk full, permissions, names)."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        where = f" ({exc.filename})" if exc.filename else ""
        raise CacheError(f"cache: cannot {what}: {reason}{where}") from exc


@contextlib.contextmanager
def _node_lock(lock: FileLock, label: str) -> Iterator[None]:
    """The node-wide pull lock of one version; held past one pull's deadline elsewhere is an error."""
    from filelock import Timeout

    try:
        lock.acquire()
    except Timeout as exc:
        raise StoreUnavailable(
            f"another process on this node has held the pull of {label} for over {lock.timeout:g} s"
        ) from exc
    try:
        yield
    finally:
        lock.release()


class Pin:
    """Keeps one cached version from eviction until released (or the process dies)."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> Pin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LoaderCache:
    """Pull versions through a shared node-local cache.

    ``keyring`` decrypts encrypted files: a Keyring, or a function that builds one,
    called at the first encrypted file (so a key file or a KMS client is only
    touched when a version needs it). None refuses encrypted files.

    Example:
        >>> cache = LoaderCache.from_settings(settings)  # doctest: +SKIP
        >>> cache = LoaderCache("/var/cache/serving", max_bytes=10 * 2**30)  # doctest: +SKIP
        >>> cached = cache.fetch(repo, repo.resolve("iris@production"))  # doctest: +SKIP
    """

    def __init__(
        self,
        root: Path | str,
        max_bytes: int = 20 * 1024**3,
        *,
        max_artifact_bytes: int = 50 * 1024**3,
        max_artifact_files: int = 10_000,
        keyring: Keyring | Callable[[], Keyring] | None = None,
        reverify_s: float = 24 * 3600.0,
        pull_timeout_s: float = 3600.0,
        pull_min_bytes_per_s: float = 64 * 1024,
        pull_rate_window_s: float = 30.0,
        hash_on_load: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root).expanduser().resolve()
        self._keyring = keyring
        self.max_bytes = max_bytes
        self.max_artifact_bytes = max_artifact_bytes
        self.max_artifact_files = max_artifact_files
        self.reverify_s = reverify_s
        self.pull_timeout_s = pull_timeout_s
        self.pull_min_bytes_per_s = pull_min_bytes_per_s
        self.pull_rate_window_s = pull_rate_window_s
        self.hash_on_load = hash_on_load
        self._clock = clock
        self._thread_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        with _disk_errors(f"create the cache in {self.root}"):
            for sub in ("blobs", "versions", "locks", "aliases", "stamps", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.root, 0o700)
            self._owner = _owner(self.root)
            self._sweep_tmp()

    @classmethod
    def from_settings(
        cls, settings: Settings, *, root: Path | str | None = None, max_bytes: int | None = None
    ) -> LoaderCache:
        """The cache ``settings`` describe: directory, budgets, re-hash interval and decryption keys.

        ``root`` and ``max_bytes`` override the settings' ``cache_dir`` and
        ``cache_max_bytes`` (an app's own cache, ``serving.load(cache_dir=...)``).
        """
        from serving.encoding import keyring_from_settings

        return cls(
            root or settings.cache_dir,
            max_bytes if max_bytes is not None else settings.cache_max_bytes,
            max_artifact_bytes=settings.max_artifact_bytes,
            max_artifact_files=settings.max_artifact_files,
            keyring=functools.partial(keyring_from_settings, settings),
            reverify_s=settings.cache_reverify_s,
            pull_timeout_s=settings.pull_timeout_s,
            pull_min_bytes_per_s=settings.pull_min_bytes_per_s,
            pull_rate_window_s=settings.pull_rate_window_s,
            hash_on_load=settings.cache_hash_on_load,
        )

    STALE_TMP_S = 6 * 3600
    """Partial downloads without an owner token (older releases) untouched this long are swept."""

    def _tmp(self, suffix: str) -> Path:
        return self.root / "tmp" / f"{self._owner}-{uuid.uuid4().hex}{suffix}"

    def _owner_alive(self, token: str) -> bool:
        lock = self.root / "locks" / f"owner-{token}.lock"
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # NOTE: also drops the lock if we just took it
        return False

    def _sweep_tmp(self) -> int:
        """Remove partial files of dead processes (their owner lock is free); returns bytes freed."""
        freed = 0
        cutoff = time.time() - self.STALE_TMP_S
        alive: dict[str, bool] = {}
        for entry in (self.root / "tmp").iterdir():
            token, sep, _ = entry.name.partition("-")
            try:
                if sep and len(token) == 16:
                    if token not in alive:
                        alive[token] = self._owner_alive(token)
                    if alive[token]:
                        continue
                elif entry.lstat().st_mtime >= cutoff:
                    continue
                freed += _tree_bytes(entry)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink()
            except FileNotFoundError:
                pass  # another process swept it first
        for token, is_alive in alive.items():
            if not is_alive:
                with contextlib.suppress(FileNotFoundError):
                    (self.root / "locks" / f"owner-{token}.lock").unlink()
        if freed:
            log.info("swept %d bytes of partial downloads left by dead processes", freed)
        return freed

    # -- paths --------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def version_dir(self, name: str, version: str, manifest_sha256: str) -> Path:
        return self.root / "versions" / name / f"{version}-{manifest_sha256[:16]}"

    def _lock_path(self, kind: str, name: str, version: str, msha: str) -> Path:
        return self.root / "locks" / f"{kind}-{name}-{version}-{msha[:16]}.lock"

    # -- lookups --------------------------------------------------------------
    def get(self, name: str, version: str, manifest_sha256: str) -> CachedVersion | None:
        """The cached version if it is complete here, without touching the store."""
        raw = self._manifest_bytes(name, version, manifest_sha256)
        if raw is None:
            return None
        path = self.version_dir(name, version, manifest_sha256)
        return CachedVersion(name, version, path, Manifest.from_json(raw), manifest_sha256, True)

    def _manifest_bytes(self, name: str, version: str, manifest_sha256: str) -> bytes | None:
        """The exact manifest bytes of a complete cached version, if their digest matches."""
        try:
            raw = (self.version_dir(name, version, manifest_sha256) / MANIFEST_NAME).read_bytes()
        except OSError:
            return None  # NOTE: missing, unreadable or not a file: damaged, pulled again
        return raw if sha256_bytes(raw) == manifest_sha256 else None

    def remember_alias(
        self, name: str, alias: str, version: str, manifest_sha256: str, alias_raw: bytes | None = None
    ) -> None:
        """Remember ``name@alias -> version`` for offline starts and the last-good fallback.

        Nothing is written when the file already says the same (``resolved_at`` then stays the
        time this target was first remembered): a model set reloads its members often, and
        each write creates a file, which costs the filesystem more than the read."""
        path = self.root / "aliases" / name / f"{alias}.json"
        same = self.remembered_alias(name, alias)
        if same is not None and (same.version, same.manifest_sha256, same.alias_raw) == (
            version,
            manifest_sha256,
            alias_raw,
        ):
            return
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        body: dict[str, Any] = {
            "version": version,
            "manifest_sha256": manifest_sha256,
            "resolved_at": time.time(),
        }
        if alias_raw is not None:
            body["alias_raw"] = alias_raw.decode()
        atomic_write(path, json.dumps(body))

    def remembered_alias(self, name: str, alias: str) -> Remembered | None:
        try:
            body = json.loads((self.root / "aliases" / name / f"{alias}.json").read_text())
            version = check_name(str(body["version"]), "version")  # NOTE: it becomes a path
            raw = body.get("alias_raw")
            return Remembered(
                version,
                str(body["manifest_sha256"]),
                float(body["resolved_at"]),
                raw.encode() if isinstance(raw, str) else None,
            )
        except (OSError, ValueError, KeyError, TypeError, ServingError):
            return None

    def last_good(self, name: str, alias: str) -> Resolved | None:
        """The alias's last target that loaded on this node, if it is still cached.

        Replicas remember a target only once it passed the trust checks and
        loaded (:meth:`remember_alias`), so this is the version to fall back to
        when a new target fails.
        """
        return self._resolve_offline(ModelRef(name, alias=alias))

    # -- resolve with offline fallback ------------------------------------------
    def resolve(
        self, repo: Repository, ref: ModelRef | str, *, remember: bool = True
    ) -> tuple[Resolved, bool]:
        """Resolve through the store, or from memory when the store is unreachable.

        Returns ``(resolved, from_cache)``; ``from_cache`` says the store was not
        asked successfully and the alias's last known target was used instead.
        ``remember=False`` leaves the alias memory alone (a replica remembers a
        target only once it passed the trust checks and loaded).
        """
        ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
        try:
            resolved = repo.resolve(ref, known=self._manifest_bytes)
        except StoreError:
            fallback = self._resolve_offline(ref, offline=True)
            if fallback is None:
                raise
            log.warning("store unreachable; serving %s from the cache's memory", ref)
            return fallback, True
        if ref.alias and remember:
            self.remember_alias(
                ref.name, ref.alias, resolved.version, resolved.manifest_sha256, resolved.alias_raw
            )
        return resolved, False

    def _resolve_offline(self, ref: ModelRef, *, offline: bool = False) -> Resolved | None:
        """The remembered target, from the cache. ``offline``: the store could not be asked, so
        the alias object comes along as this node accepted it (its signature and expiry are
        checked again, :func:`serving.trust.check_alias`)."""
        alias_raw = None
        if ref.alias:
            mem = self.remembered_alias(ref.name, ref.alias)
            if mem is None:
                return None
            cached = self.get(ref.name, mem.version, mem.manifest_sha256)
            alias_raw = mem.alias_raw if offline else None
        else:
            cached = self._any_cached(ref.name, str(ref.version))
        if cached is None:
            return None
        raw = (cached.path / MANIFEST_NAME).read_bytes()
        return Resolved(ref.name, cached.version, cached.manifest, raw, ref.alias, alias_raw, offline=offline)

    def _any_cached(self, name: str, version: str) -> CachedVersion | None:
        for path in sorted((self.root / "versions" / name).glob(f"{version}-*")):
            try:
                raw = (path / MANIFEST_NAME).read_bytes()
            except OSError:
                continue  # NOTE: a damaged copy is not one to serve
            found = self.get(name, version, sha256_bytes(raw))
            if found is not None and path == found.path:
                return found
        return None

    # -- fetch -------------------------------------------------------------------
    def fetch(
        self,
        repo: Repository,
        resolved: Resolved,
        progress: ProgressFactory | None = None,
        *,
        prefetch: bool = False,
    ) -> CachedVersion:
        """Return the version's verified directory, downloading it at most once per node.

        A version about to be loaded has every cached file re-hashed first
        (``hash_on_load``), so a byte changed with its stat put back (bit rot, a careful
        write) never reaches a model; ``prefetch`` (``serving pull``) trusts the stat
        stamp for ``reverify_s``, if the stamp says its files were flushed to disk.

        Raises:
            IntegrityError: a file's size or sha256 differs from the manifest, or the
                stored file set differs from it. Nothing enters the cache.
        """
        name, version, msha = resolved.name, resolved.version, resolved.manifest_sha256
        self._check_limits(resolved.manifest)
        with _disk_errors(f"pull {name}:{version}"):
            rehash = self.hash_on_load and not prefetch
            cached = self.get(name, version, msha)
            if cached is not None and self._unchanged(cached, report=False, rehash=rehash):
                metrics.CACHE_HITS.inc(model=name)
                self._touch(cached.path)
                return cached
            key = f"{name}/{version}/{msha}"
            with self._guard:
                tlock = self._thread_locks.setdefault(key, threading.Lock())
            # NOTE: a thread lock for this process, then a file lock for the node; re-check
            # after each, as the winner may have finished the download meanwhile.
            # NOTE: another process's pull of this version is bounded by its own deadline, so
            # waiting for its lock longer than one pull's deadline means it is stuck.
            node_lock = FileLock(
                str(self._lock_path("pull", name, version, msha)), mode=0o600, timeout=self.pull_timeout_s
            )
            with tlock, _node_lock(node_lock, f"{name}:{version}"):
                cached = self.get(name, version, msha)
                if cached is not None:
                    if self._unchanged(cached, rehash=rehash):
                        metrics.CACHE_HITS.inc(model=name)
                        self._touch(cached.path)
                        return cached
                    self._discard(cached)
                metrics.CACHE_MISSES.inc(model=name)
                started = time.perf_counter()
                path = self._download(repo, resolved, progress)
                metrics.DOWNLOAD_SECONDS.observe(time.perf_counter() - started, model=name)
            self.evict(keep=path, pulled=resolved.manifest.total_bytes)
        return CachedVersion(name, version, path, resolved.manifest, msha, hit=False)

    # -- proving a hit unchanged -------------------------------------------------------
    def _stamp_path(self, name: str, version: str, msha: str) -> Path:
        return self.root / "stamps" / name / f"{version}-{msha[:16]}.json"

    @staticmethod
    def _file_stat(path: Path) -> list[int]:
        st = path.lstat()
        return [st.st_size, st.st_mtime_ns, st.st_ino]

    def _write_stamp(self, cached_path: Path, name: str, version: str, msha: str, manifest: Manifest) -> None:
        """Record the verified files' stats. A process that trusts stamps (no ``hash_on_load``)
        first flushes the files to disk and says so (``flushed``): only such a stamp is trusted,
        by any process, so a file torn by a power loss is never loaded on a stamp's word. One
        that re-hashes at every load does not flush (it would buy it nothing)."""
        flushed = not self.hash_on_load
        if flushed:
            for entry in manifest.files:
                fd = os.open(cached_path / entry.path, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        body = {
            "verified_at": self._clock(),
            "flushed": flushed,
            "files": {e.path: self._file_stat(cached_path / e.path) for e in manifest.files},
        }
        path = self._stamp_path(name, version, msha)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, json.dumps(body))

    def _unchanged(self, cached: CachedVersion, report: bool = True, rehash: bool = False) -> bool:
        """Prove a cached version's files are the bytes once verified: cheap stats, re-hash on doubt.

        Returns False when a file's bytes changed, after counting and logging it if ``report``
        (the check under the pull lock reports; the optimistic one before it does not).
        ``rehash`` re-hashes every file whatever the stamp says.
        """
        try:
            stamp = json.loads(
                self._stamp_path(cached.name, cached.version, cached.manifest_sha256).read_text()
            )
            recorded: dict[str, list[int]] = stamp["files"]
            fresh = self._clock() - float(stamp["verified_at"]) < self.reverify_s
            # NOTE: stamps from before the key were written over flushed files.
            flushed = stamp.get("flushed", True) is True
        except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
            recorded, fresh, flushed = {}, False, False
        trusted = fresh and flushed
        doubtful = []
        stats: dict[str, list[int]] = {}
        for entry in cached.manifest.files:
            try:
                now = stats[entry.path] = self._file_stat(cached.path / entry.path)
            except FileNotFoundError:
                return report and self._corrupt(cached, entry, "is missing")
            except OSError as exc:
                return report and self._corrupt(cached, entry, f"cannot be read ({exc.strerror})")
            if rehash or not trusted or recorded.get(entry.path) != now or now[0] != entry.size:
                doubtful.append(entry)
        if not doubtful:
            return True
        # NOTE: a stamp that held is left as it is when the re-hash was only the load's own; one
        # over files never flushed is written again (flushing them) by a process that trusts stamps.
        stamp_held = (
            fresh
            and (flushed or self.hash_on_load)
            and all(recorded.get(path) == stat for path, stat in stats.items())
        )
        for entry in doubtful:
            # NOTE: any damage, not only a digest mismatch, is evicted and pulled again: an
            # unreadable file, a symlink (to /dev/zero, read for ever), a special file.
            try:
                size, digest = hash_file(cached.path / entry.path, entry.size)
            except OSError as exc:
                return report and self._corrupt(cached, entry, f"cannot be read ({exc.strerror})")
            if size != entry.size or digest != entry.sha256:
                return report and self._corrupt(cached, entry, "changed on disk")
        if not stamp_held:
            self._write_stamp(
                cached.path, cached.name, cached.version, cached.manifest_sha256, cached.manifest
            )
        return True

    @staticmethod
    def _corrupt(cached: CachedVersion, entry: FileEntry, how: str) -> bool:
        metrics.CACHE_CORRUPT.inc(model=cached.name)
        log.warning(
            "cached %s:%s/%s %s; evicting it and pulling the version again",
            cached.name,
            cached.version,
            entry.path,
            how,
        )
        return False

    def _discard(self, cached: CachedVersion) -> None:
        """Remove a version whose bytes changed, and the blobs it links whose bytes are wrong.

        Pins do not protect it: a loaded model keeps the bytes it read, and nobody may read these.
        """
        trash = self._tmp(".evict")
        try:
            os.rename(cached.path, trash)
        except FileNotFoundError:
            return
        for entry in cached.manifest.files:
            self._drop_if_wrong(self.blob_path(entry.sha256), entry)
        shutil.rmtree(trash, ignore_errors=True)
        self._stamp_path(cached.name, cached.version, cached.manifest_sha256).unlink(missing_ok=True)
        self._drop_unreferenced_blobs()

    def _clear_damaged(self, final: Path, name: str, version: str) -> None:
        """Move aside what sits where a version is about to go: with the pull lock held, a
        directory there is one whose manifest changed or went missing (``get`` found no valid
        version), and left in place it made the rename fail on every pull, for good."""
        if not os.path.lexists(final):
            return
        log.warning(
            "cached %s:%s is damaged (its manifest changed or is missing); pulling it again", name, version
        )
        metrics.CACHE_CORRUPT.inc(model=name)
        trash = self._tmp(".evict")
        try:
            os.rename(final, trash)
        except FileNotFoundError:
            return  # NOTE: eviction (under its own lock) took it away first
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)

    def _drop_if_wrong(self, path: Path, entry: FileEntry, *, blob: bool = False, model: str = "") -> bool:
        """Unlink ``path`` unless it holds ``entry``'s exact bytes (and, with ``blob``, the
        shared blob it is a link of too); True when it was dropped."""
        try:
            if hash_file(path, entry.size) == (entry.size, entry.sha256):
                return False
        except FileNotFoundError:
            return False
        except OSError:
            pass
        log.warning("cached blob %s... of %s is damaged; pulling it again", entry.sha256[:16], entry.path)
        if model:
            metrics.CACHE_CORRUPT.inc(model=model)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if blob:
            with contextlib.suppress(FileNotFoundError):
                self.blob_path(entry.sha256).unlink()
        return True

    def repair(self, repo: Repository, resolved: Resolved, progress: ProgressFactory | None = None) -> bool:
        """Re-hash a cached version in full; if any byte changed, evict it and pull it again.

        Returns True when it had to be repaired. The result is verified like any pull.
        """
        cached = self.get(resolved.name, resolved.version, resolved.manifest_sha256)
        if cached is not None:
            try:
                self.verify(cached)
                return False
            except IntegrityError as exc:
                metrics.CACHE_CORRUPT.inc(model=cached.name)
                log.warning("%s; evicting it and pulling the version again", exc)
                with _disk_errors(f"evict {cached.name}:{cached.version}"):
                    self._discard(cached)
        self.fetch(repo, resolved, progress)
        return cached is not None

    def _check_limits(self, manifest: Manifest) -> None:
        if len(manifest.files) > self.max_artifact_files:
            raise UntrustedArtifact(
                f"{manifest.name}:{manifest.version} has {len(manifest.files)} files, "
                f"over the limit of {self.max_artifact_files}"
            )
        # NOTE: both sizes count: what is downloaded (stored_size) and what it decodes to.
        total = max(manifest.total_bytes, sum(f.stored_bytes for f in manifest.files))
        if total > self.max_artifact_bytes:
            raise UntrustedArtifact(
                f"{manifest.name}:{manifest.version} is {total} bytes, "
                f"over the limit of {self.max_artifact_bytes}"
            )

    def _download(self, repo: Repository, resolved: Resolved, progress: ProgressFactory | None) -> Path:
        """Pull a version under one deadline and minimum rate (:mod:`serving.store.pull`)."""
        with pulls.pulling(
            f"{resolved.name}:{resolved.version}",
            timeout_s=self.pull_timeout_s,
            min_bytes_per_s=self.pull_min_bytes_per_s,
            window_s=self.pull_rate_window_s,
        ):
            return self._download_version(repo, resolved, progress)

    def _download_version(
        self, repo: Repository, resolved: Resolved, progress: ProgressFactory | None
    ) -> Path:
        manifest = resolved.manifest
        name, version = resolved.name, resolved.version
        stored = repo.version_files(name, version)
        stored.pop(MANIFEST_NAME, None)
        stored.pop(SIGNATURE_NAME, None)  # checked by serving.trust, not an artifact file
        stored.pop(OMS_SIGNATURE_NAME, None)  # the same
        declared = {f.path: f for f in manifest.files}
        extra = sorted(set(stored) - set(declared))
        missing = sorted(set(declared) - set(stored))
        if extra:
            raise IntegrityError(f"{name}:{version}: file {extra[0]!r} is stored but not in the manifest")
        if missing:
            raise IntegrityError(f"{name}:{version}: file {missing[0]!r} is in the manifest but not stored")
        for entry in manifest.files:
            if stored[entry.path] != entry.stored_bytes:
                raise IntegrityError(
                    f"{name}:{version}: file {entry.path!r} is {stored[entry.path]} bytes, "
                    f"the manifest says {entry.stored_bytes}"
                )
        prefix = repo.version_prefix(name, version)
        staging = self._tmp(".dir")
        staging.mkdir(mode=0o700)
        # NOTE: downloaded files become blobs only once the whole version has verified,
        # so a refused version leaves no blob behind either.
        fetched: dict[str, Path] = {}
        try:
            for entry in manifest.files:
                target = staging / entry.path
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                try:
                    # NOTE: linking first keeps the blob's link count above 1, so a
                    # concurrent eviction never drops a blob this version needs.
                    os.link(fetched.get(entry.sha256) or self.blob_path(entry.sha256), target)
                except FileNotFoundError:
                    pass
                else:
                    # NOTE: a blob another version holds is hashed before this one is stamped
                    # verified: an ordinary write to it was served wrong under the new version.
                    if (
                        entry.sha256 in fetched
                        or self._drop_if_wrong(target, entry, blob=True, model=name) is False
                    ):
                        continue
                label = f"{name}:{version}/{entry.path}"
                cb = progress(label, entry.size) if progress else None
                self._download_blob(repo, prefix + entry.path, entry, label, name, version, target, cb)
                fetched[entry.sha256] = target
            for sha, target in fetched.items():
                blob = self.blob_path(sha)
                blob.parent.mkdir(exist_ok=True, mode=0o700)
                with contextlib.suppress(FileExistsError):
                    os.link(target, blob)
            fd = os.open(staging / MANIFEST_NAME, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(resolved.manifest_raw)
            final = self.version_dir(name, version, resolved.manifest_sha256)
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._clear_damaged(final, name, version)
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        # NOTE: every byte was just hashed while it streamed; this records what they look like.
        self._write_stamp(final, name, version, resolved.manifest_sha256, manifest)
        self._touch(final)
        return final

    def _download_blob(
        self,
        repo: Repository,
        key: str,
        entry: FileEntry,
        label: str,
        model: str,
        version: str,
        target: Path,
        progress: Progress | None,
    ) -> None:
        """Download one file into ``target`` (in staging) only once its bytes verified."""

        def receive(f: BinaryIO) -> None:
            if entry.encoding:
                self._receive_encoded(repo, key, entry, label, model, version, f, progress)
            else:
                self._receive_plain(repo, key, entry, label, model, f, progress)

        # NOTE: the partial file is named after this process (swept if it dies) and
        # linked, not renamed: the staging directory is renamed into place as a whole.
        # Not flushed here: the version's stamp flushes its files where loads trust stamps
        # (_write_stamp); with hash_on_load every load hashes the file again, so one torn by a
        # power loss is pulled again, never loaded, and the flush (20 ms for 43 MB on a quiet
        # disk, 300 ms beside other writes) buys nothing.
        atomic_write(target, receive, tmp=self._tmp(".part"), publish=os.link)

    @staticmethod
    def _receive_plain(
        repo: Repository,
        key: str,
        entry: FileEntry,
        label: str,
        model: str,
        f: BinaryIO,
        progress: Progress | None,
    ) -> None:
        writer = HashingWriter(f, entry.size, label)
        try:
            repo.store.download(key, writer, progress)
        except NotFound as exc:
            raise IntegrityError(f"{label}: listed in the manifest but not stored") from exc
        metrics.DOWNLOAD_BYTES.inc(writer.size, model=model)
        writer.check(entry.size, entry.sha256)

    def _receive_encoded(
        self,
        repo: Repository,
        key: str,
        entry: FileEntry,
        label: str,
        model: str,
        version: str,
        f: BinaryIO,
        progress: Progress | None,
    ) -> None:
        """A compressed and/or encrypted file: stored digest first, then decode (serving.encoding)."""
        from serving.crypto import Context
        from serving.encoding import download_decoded

        stored = download_decoded(
            repo.store,
            key,
            entry,
            label,
            f,
            self.root / "tmp",
            self._keys() if "aesgcm" in (entry.encoding or []) else None,
            Context(model, version, entry.path),
            progress,
        )
        metrics.DOWNLOAD_BYTES.inc(stored, model=model)

    def _keys(self) -> Keyring | None:
        """The keyring, built on first use when the cache was given a function for it."""
        if callable(self._keyring):
            self._keyring = self._keyring()
        return self._keyring

    @staticmethod
    def _touch(path: Path) -> None:
        now = time.time()
        with contextlib.suppress(FileNotFoundError):
            os.utime(path, (now, now))

    # -- verification ------------------------------------------------------------
    def verify(self, cached: CachedVersion) -> None:
        """Re-hash every cached file against the manifest (``repair`` evicts and re-pulls on a mismatch).

        Raises:
            IntegrityError: a file is missing or its bytes changed.
        """
        where = f"{cached.name}:{cached.version}"
        for entry in cached.manifest.files:
            try:
                size, digest = hash_file(cached.path / entry.path, entry.size)
            except FileNotFoundError:
                raise IntegrityError(f"{where}/{entry.path}: cached file is missing") from None
            except OSError as exc:
                raise IntegrityError(
                    f"{where}/{entry.path}: cached file cannot be read ({exc.strerror})"
                ) from exc
            if (size, digest) != (entry.size, entry.sha256):
                raise IntegrityError(f"{where}/{entry.path}: cached bytes changed")
        with _disk_errors(f"record the check of {where}"):
            self._write_stamp(
                cached.path, cached.name, cached.version, cached.manifest_sha256, cached.manifest
            )

    # -- pins and eviction ---------------------------------------------------------
    def pin(self, cached: CachedVersion) -> Pin:
        """Hold a version against eviction (a shared flock, released with the process)."""
        lock = self._lock_path("pin", cached.name, cached.version, cached.manifest_sha256)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        if not cached.path.exists():
            os.close(fd)
            raise NotFound(f"{cached.name}:{cached.version} was evicted before it was pinned")
        self._touch(cached.path)
        return Pin(fd)

    def size_bytes(self) -> int:
        """Blobs plus partial downloads (a killed pull's leftovers count until they are swept)."""
        total = 0
        for blob in (self.root / "blobs").glob("*/*"):
            with contextlib.suppress(FileNotFoundError):
                total += blob.stat().st_size
        return total + _tree_bytes(self.root / "tmp")

    RECOUNT_S = 5.0
    """How long pulls may add to the last count of the cache's bytes before one counts again."""

    def evict(self, keep: Path | None = None, pulled: int | None = None) -> list[Path]:
        """Evict least recently used, unpinned versions until under the byte budget.

        ``pulled``: the bytes of the pull that asks. Counting the cache lists every blob (a
        thousand models: a few milliseconds per pull), so a pull within :attr:`RECOUNT_S` of
        the last count adds its bytes to that count instead, while the sum stays under the
        budget. The count is the node's (``locks/count``, under the eviction lock): every
        process's pulls add to it, so none is missed. What it may count too much (a blob two
        versions share, a version discarded since) only brings the next full count sooner.
        """
        evicted: list[Path] = []
        with FileLock(str(self.root / "locks" / "evict.lock"), mode=0o600):
            if pulled is not None:
                counted = self._read_count()
                if counted is not None:
                    total, at = counted[0] + pulled, counted[1]
                    if total <= self.max_bytes and 0 <= time.monotonic() - at < self.RECOUNT_S:
                        self._write_count(total, at)
                        metrics.CACHE_BYTES.set(total)
                        return evicted
            self._sweep_tmp()
            total = self.size_bytes()
            if total > self.max_bytes:
                versions = sorted(
                    (p for p in (self.root / "versions").glob("*/*") if p != keep),
                    key=lambda p: p.stat().st_mtime,
                )
                for path in versions:
                    if total <= self.max_bytes:
                        break
                    if self._evict_one(path):
                        evicted.append(path)
                        total = self.size_bytes()
            metrics.CACHE_BYTES.set(total)
            self._write_count(total, time.monotonic())
        return evicted

    def _read_count(self) -> tuple[int, float] | None:
        """The node's last count of the cache's bytes (plus pulls since) and when it was made
        (``time.monotonic``, the same for every process on the node); None: count again."""
        try:
            total, at = (self.root / "locks" / "count").read_text().split()
            return int(total), float(at)
        except (OSError, ValueError):
            return None

    def _write_count(self, total: int, at: float) -> None:
        with contextlib.suppress(OSError):
            fd = os.open(self.root / "locks" / "count", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{total} {at!r}")

    def _evict_one(self, path: Path) -> bool:
        name = path.parent.name
        version, _, short = path.name.rpartition("-")
        lock = self.root / "locks" / f"pin-{name}-{version}-{short}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # pinned by a live process
            trash = self._tmp(".evict")
            os.rename(path, trash)
            shutil.rmtree(trash)
            self._stamp_path(name, version, short).unlink(missing_ok=True)
            self._drop_unreferenced_blobs()
            metrics.CACHE_EVICTIONS.inc()
            log.info("evicted %s:%s from the cache", name, version)
            return True
        finally:
            os.close(fd)

    def _drop_unreferenced_blobs(self) -> None:
        # NOTE: a blob's link count is 1 when no version directory links it any more.
        for blob in (self.root / "blobs").glob("*/*"):
            try:
                if blob.stat().st_nlink == 1:
                    blob.unlink()
            except FileNotFoundError:
                pass


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` not linked elsewhere (a staged file linked to a blob counts once)."""
    total = 0
    try:
        entries = [path] if not path.is_dir() or path.is_symlink() else [p for p in path.rglob("*")]
    except FileNotFoundError:
        return 0
    for p in entries:
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue
        if not p.is_dir() and st.st_nlink == 1:
            total += st.st_size
    return total
