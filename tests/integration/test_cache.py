"""The loader cache against a real S3 server (moto) and real processes.

Versions here are plain bytes files; no framework is involved.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from serving import errors
from serving.cache import LoaderCache
from serving.manifest import MANIFEST_NAME
from serving.repository import Repository, SetTarget
from serving.settings import Settings
from serving.store.factory import open_store
from serving.testing import MotoS3, publish_files

KiB = 1024
MiB = 1024 * KiB
REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.s3


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll ``check`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class S3Repo:
    """A repository in a fresh bucket, and what a child process needs to reach it."""

    repo: Repository
    server: MotoS3
    bucket: str
    uri: str
    settings: Settings
    workdir: Path

    def publish(self, name: str, version: str, files: dict[str, bytes]) -> str:
        return publish_files(self.repo, self.workdir, name, version, files)

    def key(self, name: str, version: str, path: str) -> str:
        """The object key (without the bucket) of a version's file."""
        return f"models/{name}/versions/{version}/{path}"


@pytest.fixture
def s3repo(s3_env: MotoS3, bucket: str, tmp_path: Path, make_settings: Any) -> S3Repo:
    uri = f"s3://{bucket}/models"
    settings = make_settings(tmp_path / "cache", store=uri, s3_max_attempts=1)
    work = tmp_path / "work"
    work.mkdir()
    return S3Repo(Repository(open_store(uri, settings)), s3_env, bucket, uri, settings, work)


@pytest.fixture
def cache(tmp_path: Path) -> LoaderCache:
    return LoaderCache(tmp_path / "cache", max_bytes=1024 * MiB)


def cache_contents(cache: LoaderCache) -> dict[str, list[str]]:
    """What the cache holds: blobs, version dirs and leftovers in tmp."""
    return {
        "blobs": sorted(p.name for p in (cache.root / "blobs").glob("*/*")),
        "versions": sorted(
            p.relative_to(cache.root).as_posix() for p in (cache.root / "versions").glob("*/*")
        ),
        "tmp": sorted(p.name for p in (cache.root / "tmp").iterdir()),
    }


EMPTY: dict[str, list[str]] = {"blobs": [], "versions": [], "tmp": []}


# -- fetch and verify ------------------------------------------------------------------------


def test_fetch_downloads_once_then_hits_without_store_requests(s3repo: S3Repo, cache: LoaderCache) -> None:
    s3repo.publish("iris", "1", {"model.bin": os.urandom(300 * KiB), "cfg/params.json": b'{"a": 1}'})
    resolved = s3repo.repo.resolve("iris:1")

    first = cache.fetch(s3repo.repo, resolved)
    assert not first.hit
    assert (first.path / "model.bin").stat().st_size == 300 * KiB
    assert (first.path / "cfg/params.json").read_bytes() == b'{"a": 1}'
    cache.verify(first)

    s3repo.server.reset_counts()
    second = cache.fetch(s3repo.repo, resolved)
    assert second.hit
    assert second.path == first.path
    assert s3repo.server.requests == []


def test_resolving_an_alias_whose_target_is_cached_costs_one_request(
    s3repo: S3Repo, cache: LoaderCache
) -> None:
    s3repo.publish("iris", "1", {"model.bin": os.urandom(1 * KiB)})
    s3repo.repo.move_alias("iris", "production", SetTarget("1"))
    resolved, _ = cache.resolve(s3repo.repo, "iris@production")
    cache.fetch(s3repo.repo, resolved)

    s3repo.server.reset_counts()
    again, from_cache = cache.resolve(s3repo.repo, "iris@production")
    assert not from_cache
    assert (again.version, again.manifest_raw) == ("1", resolved.manifest_raw)
    assert [(r.method, r.key) for r in s3repo.server.requests] == [
        ("GET", "models/iris/aliases/production.json")
    ]


def test_identical_files_in_two_versions_are_stored_once(s3repo: S3Repo, cache: LoaderCache) -> None:
    shared = os.urandom(200 * KiB)
    s3repo.publish("iris", "1", {"weights.bin": shared, "v.txt": b"1"})
    s3repo.publish("iris", "2", {"weights.bin": shared, "v.txt": b"2"})
    cache.fetch(s3repo.repo, s3repo.repo.resolve("iris:1"))
    s3repo.server.reset_counts()
    cache.fetch(s3repo.repo, s3repo.repo.resolve("iris:2"))
    assert s3repo.server.count("GET", key=s3repo.key("iris", "2", "weights.bin")) == 0
    assert len(cache_contents(cache)["blobs"]) == 3


def _flip_byte(s3: S3Repo, key: str) -> None:
    body = bytearray(s3.server.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    s3.server.client().put_object(Bucket=s3.bucket, Key=key, Body=bytes(body))


def _truncate(s3: S3Repo, key: str) -> None:
    body = s3.server.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    s3.server.client().put_object(Bucket=s3.bucket, Key=key, Body=body[:-1])


def _delete(s3: S3Repo, key: str) -> None:
    s3.server.client().delete_object(Bucket=s3.bucket, Key=key)


def _add_sibling(s3: S3Repo, key: str) -> None:
    s3.server.client().put_object(Bucket=s3.bucket, Key=key.replace("b.bin", "extra.bin"), Body=b"extra")


@pytest.mark.parametrize(
    ("tamper", "named"),
    [(_flip_byte, "b.bin"), (_truncate, "b.bin"), (_delete, "b.bin"), (_add_sibling, "extra.bin")],
    ids=["byte-flipped", "truncated", "file-missing", "file-added"],
)
@pytest.mark.faults
def test_tampered_version_is_refused_and_nothing_enters_the_cache(
    s3repo: S3Repo, cache: LoaderCache, tamper: Callable[[S3Repo, str], None], named: str
) -> None:
    """A version whose stored bytes or file set differ from its manifest never becomes loadable."""
    # NOTE: a.bin is sound and fetched first, so a blob leaking from it would show.
    s3repo.publish("iris", "1", {"a.bin": os.urandom(100 * KiB), "b.bin": os.urandom(100 * KiB)})
    tamper(s3repo, s3repo.key("iris", "1", "b.bin"))
    resolved = s3repo.repo.resolve("iris:1")

    with pytest.raises(errors.IntegrityError) as info:
        cache.fetch(s3repo.repo, resolved)

    assert named in str(info.value)
    assert cache_contents(cache) == EMPTY
    assert cache.get("iris", "1", resolved.manifest_sha256) is None


# -- processes -------------------------------------------------------------------------------

_WORKER = """
import json, sys
from pathlib import Path
from serving.cache import LoaderCache
from serving.repository import Repository
from serving.settings import Settings
from serving.store.factory import open_store

uri, cache_dir, ref, marker, mode = sys.argv[1:6]
settings = Settings(store=uri, cache_dir=cache_dir, s3_addressing_style="path")
repo = Repository(open_store(uri, settings))
cache = LoaderCache(cache_dir, max_bytes=int(sys.argv[6]) if len(sys.argv) > 6 else 2**40)
resolved, _ = cache.resolve(repo, ref)
Path(marker).write_text("ready")
cached = cache.fetch(repo, resolved)
cache.verify(cached)
if mode == "pin":
    pin = cache.pin(cached)
    Path(marker).write_text("pinned")
    sys.stdin.read()  # hold the pin until the parent closes our stdin
    pin.release()
print(json.dumps({"path": str(cached.path), "hit": cached.hit}))
"""


def start_worker(
    s3: S3Repo, cache_dir: Path, ref: str, marker: Path, mode: str = "fetch", max_bytes: int | None = None
) -> subprocess.Popen[str]:
    args = [sys.executable, "-c", _WORKER, s3.uri, str(cache_dir), ref, str(marker), mode]
    if max_bytes is not None:
        args.append(str(max_bytes))
    return subprocess.Popen(
        args,
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; any still running at the end are killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
        for pipe in (p.stdin, p.stdout, p.stderr):
            if pipe is not None:
                pipe.close()


def _part_files(cache_dir: Path) -> list[Path]:
    return [p for p in (cache_dir / "tmp").glob("*.part") if p.stat().st_size > 0]


@pytest.mark.slow
def test_two_processes_pulling_one_version_download_it_once(
    s3repo: S3Repo, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    s3repo.publish("iris", "1", {"model.bin": os.urandom(2 * MiB)})
    key = s3repo.key("iris", "1", "model.bin")
    cache_dir = tmp_path / "cache"
    markers = [tmp_path / "ready-a", tmp_path / "ready-b"]
    s3repo.server.reset_counts()

    # NOTE: the first download hangs mid-way until both workers are about to fetch,
    # so the second necessarily finds the version incomplete and waits for the first.
    with s3repo.server.stall(key):
        procs.extend(start_worker(s3repo, cache_dir, "iris:1", m) for m in markers)
        wait_for("both workers to be ready", lambda: all(m.exists() for m in markers))
        wait_for("one download to start", lambda: _part_files(cache_dir))
    results = [finish(p) for p in procs]

    assert s3repo.server.count("GET", key=key) == 1
    assert results[0]["path"] == results[1]["path"]
    assert sorted(r["hit"] for r in results) == [False, True]
    assert (Path(results[0]["path"]) / "model.bin").stat().st_size == 2 * MiB


@pytest.mark.slow
@pytest.mark.faults
def test_a_process_killed_mid_download_leaves_nothing_loadable(
    s3repo: S3Repo, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    sha = s3repo.publish("iris", "1", {"a.bin": os.urandom(100 * KiB), "b.bin": os.urandom(1 * MiB)})
    cache_dir = tmp_path / "cache"
    survivor = LoaderCache(cache_dir)  # a process that outlives the killed one
    with s3repo.server.stall(s3repo.key("iris", "1", "b.bin")):
        proc = start_worker(s3repo, cache_dir, "iris:1", tmp_path / "ready")
        procs.append(proc)
        wait_for("a partial download", lambda: _part_files(cache_dir) or proc.poll() is not None)
        assert proc.poll() is None, proc.communicate()[1]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    assert survivor.get("iris", "1", sha) is None
    assert cache_contents(survivor)["versions"] == []
    # The dead process's partial files count against the budget until they are swept ...
    left = [p for p in (cache_dir / "tmp").rglob("*") if p.is_file() and p.stat().st_nlink == 1]
    assert left
    assert survivor.size_bytes() == sum(p.stat().st_size for p in left)
    legacy = cache_dir / "tmp" / "in-progress.part"  # no owner token (an older release): kept while fresh
    legacy.write_bytes(b"still downloading")
    # ... and the next eviction pass sweeps them at once: their owner's lock died with it.
    survivor.evict()
    assert list((cache_dir / "tmp").iterdir()) == [legacy]
    assert survivor.size_bytes() == len(b"still downloading")

    again = LoaderCache(cache_dir).fetch(s3repo.repo, s3repo.repo.resolve("iris:1"))
    assert not again.hit
    survivor.verify(again)


@pytest.mark.faults
def test_partial_files_of_a_live_process_are_never_swept(s3repo: S3Repo, tmp_path: Path) -> None:
    first = LoaderCache(tmp_path / "cache")
    mine = first._tmp(".part")
    mine.write_bytes(b"x" * 1000)
    LoaderCache(tmp_path / "cache").evict()  # another instance (as another process would) sweeps
    assert mine.exists()
    assert first.size_bytes() == 1000


# -- a cached version is proven unchanged before it is loaded -------------------------------


def _flip_byte(path: Path, keep_mtime: bool = False) -> None:
    st = path.stat()
    with open(path, "r+b") as f:  # NOTE: in place: same inode, same size
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _corrupt_count(model: str) -> float:
    import prometheus_client

    value = prometheus_client.REGISTRY.get_sample_value("serving_cache_corrupt_total", {"model": model})
    return value or 0.0


@pytest.mark.faults
def test_a_flipped_cached_byte_is_never_served_and_is_pulled_again(
    s3repo: S3Repo, cache: LoaderCache
) -> None:
    original = os.urandom(200 * KiB)
    s3repo.publish("flip", "1", {"w.bin": original})
    resolved = s3repo.repo.resolve("flip:1")
    first = cache.fetch(s3repo.repo, resolved)
    _flip_byte(first.path / "w.bin")
    before = _corrupt_count("flip")

    again = cache.fetch(s3repo.repo, resolved)

    assert not again.hit  # not "already cached"
    assert (again.path / "w.bin").read_bytes() == original
    assert _corrupt_count("flip") == before + 1
    assert cache.fetch(s3repo.repo, resolved).hit  # repaired: the next load is a plain hit


@pytest.mark.faults
def test_a_flip_that_restores_the_mtime_never_reaches_a_load_on_reload_or_restart(
    s3repo: S3Repo, tmp_path: Path
) -> None:
    """Bit rot, or a careful write that puts size, mtime and inode back: every load re-hashes."""
    cache = LoaderCache(tmp_path / "cache")
    original = os.urandom(50 * KiB)
    s3repo.publish("flip", "1", {"w.bin": original})
    resolved = s3repo.repo.resolve("flip:1")
    first = cache.fetch(s3repo.repo, resolved)
    _flip_byte(first.path / "w.bin", keep_mtime=True)
    # A prefetch (serving pull) trusts a stat stamp only over files flushed to disk, which
    # a cache that re-hashes at every load never flushes: it re-hashes too ...
    before = _corrupt_count("flip")
    prefetched = cache.fetch(s3repo.repo, resolved, prefetch=True)
    assert not prefetched.hit
    assert (prefetched.path / "w.bin").read_bytes() == original
    assert _corrupt_count("flip") == before + 1
    _flip_byte(prefetched.path / "w.bin", keep_mtime=True)
    # ... and so does a load: the same process (a reload) ...
    before = _corrupt_count("flip")
    again = cache.fetch(s3repo.repo, resolved)
    assert not again.hit
    assert (again.path / "w.bin").read_bytes() == original
    assert _corrupt_count("flip") == before + 1
    # ... and a restarted one, with a new cache object over the same folder.
    _flip_byte(again.path / "w.bin", keep_mtime=True)
    restarted = LoaderCache(tmp_path / "cache").fetch(s3repo.repo, resolved)
    assert not restarted.hit
    assert (restarted.path / "w.bin").read_bytes() == original


def test_a_pull_flushes_its_files_to_disk_only_where_loads_trust_the_stamp(
    s3repo: S3Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every load re-hashes (``hash_on_load``): a file torn by a power loss is pulled again, so
    its flush would buy nothing. Where loads trust the stamp, the bytes are on disk first."""
    s3repo.publish("flush", "1", {"w.bin": os.urandom(50 * KiB)})
    resolved = s3repo.repo.resolve("flush:1")
    flushed: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    rehashing = LoaderCache(tmp_path / "rehashing")
    rehashing.fetch(s3repo.repo, resolved)
    assert [p for p in flushed if p.startswith(str(rehashing.root))] == []
    trusting = LoaderCache(tmp_path / "trusting", hash_on_load=False)
    trusting.fetch(s3repo.repo, resolved)
    assert [p for p in flushed if p.startswith(str(trusting.root))] != []


@pytest.mark.faults
def test_a_process_that_trusts_stamps_never_trusts_one_over_files_never_flushed(
    s3repo: S3Repo, tmp_path: Path
) -> None:
    """A version pulled by a process that re-hashes at every load (the default) was not flushed
    to disk; a power loss may tear it with its stat intact. A process over the same node cache
    that trusts stamps (``serving pull``'s cache, or ``cache_hash_on_load: false``) re-hashes it
    once, and from then on trusts its own, flushed, stamp."""
    original = os.urandom(50 * KiB)
    s3repo.publish("torn", "1", {"w.bin": original})
    resolved = s3repo.repo.resolve("torn:1")
    pulled = LoaderCache(tmp_path / "cache").fetch(s3repo.repo, resolved)
    _flip_byte(pulled.path / "w.bin", keep_mtime=True)  # NOTE: what a torn write looks like to stat
    trusting = LoaderCache(tmp_path / "cache", hash_on_load=False)
    again = trusting.fetch(s3repo.repo, resolved)
    assert not again.hit
    assert (again.path / "w.bin").read_bytes() == original
    assert trusting.fetch(s3repo.repo, resolved).hit


@pytest.mark.faults
def test_a_flip_that_restores_the_mtime_is_caught_by_the_scheduled_rehash(
    s3repo: S3Repo, tmp_path: Path
) -> None:
    now = [1000.0]
    cache = LoaderCache(tmp_path / "cache", reverify_s=3600, hash_on_load=False, clock=lambda: now[0])
    original = os.urandom(50 * KiB)
    s3repo.publish("flip", "1", {"w.bin": original})
    resolved = s3repo.repo.resolve("flip:1")
    first = cache.fetch(s3repo.repo, resolved)
    _flip_byte(first.path / "w.bin", keep_mtime=True)
    assert cache.fetch(s3repo.repo, resolved).hit  # within the schedule, stats alone are trusted
    now[0] += 3601
    again = cache.fetch(s3repo.repo, resolved)
    assert not again.hit
    assert (again.path / "w.bin").read_bytes() == original


@pytest.mark.faults
def test_a_shared_blob_corrupted_in_one_version_is_repaired_for_both(
    s3repo: S3Repo, cache: LoaderCache
) -> None:
    shared = os.urandom(20 * KiB)
    for v in ("1", "2"):
        s3repo.publish("flip", v, {"w.bin": shared, "v.txt": v.encode()})
    one = cache.fetch(s3repo.repo, s3repo.repo.resolve("flip:1"))
    cache.fetch(s3repo.repo, s3repo.repo.resolve("flip:2"))
    _flip_byte(one.path / "w.bin")  # a hard link: version 2's copy changed too
    for v in ("1", "2"):
        got = cache.fetch(s3repo.repo, s3repo.repo.resolve(f"flip:{v}"))
        assert not got.hit
        assert (got.path / "w.bin").read_bytes() == shared


@pytest.mark.faults
def test_repair_evicts_and_pulls_a_changed_version_again(s3repo: S3Repo, cache: LoaderCache) -> None:
    original = os.urandom(30 * KiB)
    s3repo.publish("flip", "1", {"w.bin": original})
    resolved = s3repo.repo.resolve("flip:1")
    assert cache.repair(s3repo.repo, resolved) is False  # not cached yet: a plain pull
    cached = cache.fetch(s3repo.repo, resolved)
    _flip_byte(cached.path / "w.bin", keep_mtime=True)
    with pytest.raises(errors.IntegrityError):
        cache.verify(cached)
    assert cache.repair(s3repo.repo, resolved) is True
    assert (cached.path / "w.bin").read_bytes() == original
    assert cache.repair(s3repo.repo, resolved) is False


@pytest.mark.faults
def test_a_cache_that_cannot_be_written_is_a_cache_error_not_a_traceback(
    s3repo: S3Repo, tmp_path: Path
) -> None:
    """An OSError while assembling a version (here: tmp/ is not a folder) is a CacheError."""
    s3repo.publish("iris", "1", {"w.bin": b"abc"})
    cache = LoaderCache(tmp_path / "cache")
    (cache.root / "tmp").rmdir()
    (cache.root / "tmp").write_bytes(b"not a folder")
    with pytest.raises(errors.CacheError, match="cannot pull iris:1"):
        cache.fetch(s3repo.repo, s3repo.repo.resolve("iris:1"))


# -- eviction and pins ------------------------------------------------------------------------


def _publish_versions(s3: S3Repo, count: int, size: int) -> None:
    for v in range(1, count + 1):
        s3.publish("iris", str(v), {"w.bin": os.urandom(size)})


def _cached_versions(cache: LoaderCache) -> list[str]:
    return sorted(p.name.split("-")[0] for p in (cache.root / "versions" / "iris").iterdir())


def test_eviction_drops_least_recently_used_versions_past_the_budget(s3repo: S3Repo, tmp_path: Path) -> None:
    _publish_versions(s3repo, 3, 1 * MiB)
    cache = LoaderCache(tmp_path / "lru", max_bytes=int(2.5 * MiB))
    repo = s3repo.repo
    cache.fetch(repo, repo.resolve("iris:1"))
    cache.fetch(repo, repo.resolve("iris:2"))
    assert cache.fetch(repo, repo.resolve("iris:1")).hit  # 1 is now more recent than 2
    cache.fetch(repo, repo.resolve("iris:3"))

    assert _cached_versions(cache) == ["1", "3"]
    assert cache.size_bytes() <= cache.max_bytes


def test_processes_pulling_in_turn_keep_the_cache_under_its_budget(s3repo: S3Repo, tmp_path: Path) -> None:
    # NOTE: two instances on one folder, as two processes on a node; each pull adds its bytes
    # to the node's count instead of listing every blob, and none of the other's is missed.
    _publish_versions(s3repo, 8, 1 * MiB)
    caches = [LoaderCache(tmp_path / "node", max_bytes=int(5.5 * MiB)) for _ in range(2)]
    repo = s3repo.repo
    for v in range(1, 9):
        caches[v % 2].fetch(repo, repo.resolve(f"iris:{v}"))
        assert caches[0].size_bytes() <= caches[0].max_bytes, f"after pulling version {v}"
    assert _cached_versions(caches[0]) == ["4", "5", "6", "7", "8"]


def test_a_pinned_version_is_never_evicted(s3repo: S3Repo, tmp_path: Path) -> None:
    _publish_versions(s3repo, 3, 1 * MiB)
    cache = LoaderCache(tmp_path / "pins", max_bytes=int(1.5 * MiB))
    repo = s3repo.repo
    pin = cache.pin(cache.fetch(repo, repo.resolve("iris:1")))
    cache.fetch(repo, repo.resolve("iris:2"))
    cache.fetch(repo, repo.resolve("iris:3"))
    assert _cached_versions(cache) == ["1", "3"]

    pin.release()
    cache.evict()
    assert _cached_versions(cache) == ["3"]


@pytest.mark.slow
def test_a_version_pinned_by_another_process_is_never_evicted(
    s3repo: S3Repo, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    _publish_versions(s3repo, 3, 1 * MiB)
    cache_dir = tmp_path / "shared"
    budget = int(1.5 * MiB)
    marker = tmp_path / "pinned"
    holder = start_worker(s3repo, cache_dir, "iris:1", marker, mode="pin", max_bytes=budget)
    procs.append(holder)
    wait_for("the other process to pin", lambda: marker.exists() and marker.read_text() == "pinned")

    cache = LoaderCache(cache_dir, max_bytes=budget)
    cache.fetch(s3repo.repo, s3repo.repo.resolve("iris:2"))
    cache.fetch(s3repo.repo, s3repo.repo.resolve("iris:3"))
    assert _cached_versions(cache) == ["1", "3"]

    finish(holder)  # closes its stdin: it releases the pin and exits
    cache.evict()
    assert _cached_versions(cache) == ["3"]


# -- offline ---------------------------------------------------------------------------------


def test_resolve_falls_back_to_the_remembered_alias_while_the_store_is_down(
    s3repo: S3Repo, cache: LoaderCache, caplog: pytest.LogCaptureFixture
) -> None:
    repo = s3repo.repo
    s3repo.publish("iris", "1", {"w.bin": b"one"})
    repo.move_alias("iris", "production", SetTarget("1"))
    online, from_cache = cache.resolve(repo, "iris@production")
    assert not from_cache
    cache.fetch(repo, online)

    with s3repo.server.outage(), caplog.at_level(logging.WARNING, logger="serving.cache"):
        offline, from_cache = cache.resolve(repo, "iris@production")
        assert from_cache
        assert (offline.version, offline.manifest_sha256) == ("1", online.manifest_sha256)
        assert cache.fetch(repo, offline).hit
        assert "store unreachable" in caplog.text

    publish_and_move = s3repo.publish("iris", "2", {"w.bin": b"two"})
    repo.move_alias("iris", "production", SetTarget("2"))
    back, from_cache = cache.resolve(repo, "iris@production")
    assert (back.version, back.manifest_sha256, from_cache) == ("2", publish_and_move, False)


def test_an_alias_remembered_again_unchanged_is_not_rewritten(cache: LoaderCache) -> None:
    """A model set reloads its members often: the same target is not written again (each write
    creates a file); a new version, digest or alias object is, and a damaged file is replaced."""
    path = cache.root / "aliases" / "iris" / "production.json"

    def remember(version: str, msha: str, raw: bytes | None) -> tuple[int, Any]:
        cache.remember_alias("iris", "production", version, msha, raw)
        return path.stat().st_ino, cache.remembered_alias("iris", "production")

    first, remembered = remember("1", "a" * 64, b'{"version": "1"}')
    assert remember("1", "a" * 64, b'{"version": "1"}') == (first, remembered)
    for change in (
        ("2", "a" * 64, b'{"version": "1"}'),
        ("2", "b" * 64, b'{"version": "1"}'),
        ("2", "b" * 64, b"{}"),
    ):
        inode, now = remember(*change)
        assert inode != first
        assert (now.version, now.manifest_sha256, now.alias_raw) == change
        first = inode
    path.write_text("{not json")
    _, now = remember("2", "b" * 64, b"{}")
    assert now is not None
    assert now.alias_raw == b"{}"


def test_resolve_with_the_store_down_and_nothing_remembered_raises(
    s3repo: S3Repo, cache: LoaderCache
) -> None:
    s3repo.publish("iris", "1", {"w.bin": b"one"})
    s3repo.repo.move_alias("iris", "production", SetTarget("1"))
    with s3repo.server.outage(), pytest.raises(errors.StoreUnavailable) as info:
        cache.resolve(s3repo.repo, "iris@production")
    assert info.value.__cause__ is not None


# -- permissions -----------------------------------------------------------------------------


def test_cache_files_are_0600_and_directories_0700(s3repo: S3Repo, cache: LoaderCache) -> None:
    _publish_versions(s3repo, 2, 10 * KiB)
    repo = s3repo.repo
    repo.move_alias("iris", "production", SetTarget("1"))
    resolved, _ = cache.resolve(repo, "iris@production")
    with cache.pin(cache.fetch(repo, resolved)):
        cache.fetch(repo, repo.resolve("iris:2"))
        cache.evict()

    seen = 0
    for dirpath, _dirnames, filenames in os.walk(cache.root):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath
        for name in filenames:
            path = Path(dirpath) / name
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            seen += 1
    assert seen >= 6  # two blobs, two manifests, a remembered alias, lock files


# -- cache damage that is not a digest mismatch (issue 22) ------------------------------------------
@pytest.mark.faults
def test_a_blob_linked_into_a_new_version_is_hashed_first(s3repo: S3Repo, cache: LoaderCache) -> None:
    """Version 1's file was corrupted by an ordinary write (mtime changed, no re-check yet):
    version 2, which shares the blob, must not be stamped verified over it."""
    shared = os.urandom(20 * KiB)
    s3repo.publish("link", "1", {"w.bin": shared})
    one = cache.fetch(s3repo.repo, s3repo.repo.resolve("link:1"))
    _flip_byte(one.path / "w.bin")
    s3repo.publish("link", "2", {"w.bin": shared, "v.txt": b"2"})
    two = cache.fetch(s3repo.repo, s3repo.repo.resolve("link:2"))
    assert (two.path / "w.bin").read_bytes() == shared
    again = cache.fetch(s3repo.repo, s3repo.repo.resolve("link:1"))
    assert (again.path / "w.bin").read_bytes() == shared


@pytest.mark.parametrize(
    "damage", ["symlink to /dev/zero", "symlink to another file", "a fifo", "a directory"]
)
@pytest.mark.faults
def test_a_cached_file_replaced_by_something_else_is_pulled_again_not_read(
    damage: str, s3repo: S3Repo, cache: LoaderCache, tmp_path: Path
) -> None:
    """Hashing opens only regular files, never through a link, and reads at most one byte past
    the manifest's size: a link to /dev/zero used to be read for ever."""
    original = os.urandom(30 * KiB)
    s3repo.publish("odd", "1", {"w.bin": original})
    resolved = s3repo.repo.resolve("odd:1")
    cached = cache.fetch(s3repo.repo, resolved)
    path = cached.path / "w.bin"
    path.unlink()
    if damage == "symlink to /dev/zero":
        path.symlink_to("/dev/zero")
    elif damage == "symlink to another file":
        other = tmp_path / "other.bin"
        other.write_bytes(original)  # NOTE: even the right bytes, through a link, are not trusted
        path.symlink_to(other)
    elif damage == "a fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    before = _corrupt_count("odd")
    again = cache.fetch(s3repo.repo, resolved)
    assert not again.hit
    assert (again.path / "w.bin").is_file()
    assert not (again.path / "w.bin").is_symlink()
    assert (again.path / "w.bin").read_bytes() == original
    assert _corrupt_count("odd") == before + 1
    (again.path / "w.bin").unlink()
    (again.path / "w.bin").symlink_to("/dev/zero")
    with pytest.raises(errors.IntegrityError, match="cannot be read"):
        cache.verify(again)


@pytest.mark.parametrize("damage", ["a byte appended", "deleted", "a directory in its place"])
@pytest.mark.faults
def test_a_changed_cached_manifest_is_pulled_again_not_unloadable_for_good(
    damage: str, s3repo: S3Repo, cache: LoaderCache
) -> None:
    """A changed cached manifest.json left the version's folder in the way of every new pull."""
    original = os.urandom(10 * KiB)
    s3repo.publish("man", "1", {"w.bin": original})
    resolved = s3repo.repo.resolve("man:1")
    cached = cache.fetch(s3repo.repo, resolved)
    manifest = cached.path / MANIFEST_NAME
    if damage == "a byte appended":
        manifest.write_bytes(manifest.read_bytes() + b" ")
    elif damage == "deleted":
        manifest.unlink()
    else:
        manifest.unlink()
        manifest.mkdir()
    before = _corrupt_count("man")
    again = cache.fetch(s3repo.repo, resolved)
    assert not again.hit
    assert (again.path / "w.bin").read_bytes() == original
    assert (again.path / MANIFEST_NAME).read_bytes() == resolved.manifest_raw
    assert _corrupt_count("man") == before + 1
    assert cache.fetch(s3repo.repo, resolved).hit
