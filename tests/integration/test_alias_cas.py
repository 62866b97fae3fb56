"""Alias moves are compare-and-swap: concurrent writers lose no move, on a folder and on S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from serving import errors
from serving.repository import Repository, Rollback, SetTarget
from serving.settings import Settings
from serving.store.base import ObjectStore
from serving.testing import publish_files

WORKERS = 2
ROUNDS = 50

_WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from serving.repository import Repository, SetTarget
    from serving.settings import Settings
    from serving.store.factory import open_store

    uri, wid, rounds, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    repo = Repository(open_store(uri, Settings(s3_addressing_style="path", s3_max_attempts=2)))
    deadline = time.monotonic() + 60
    while not go.exists():  # NOTE: start together, so the moves really race
        if time.monotonic() > deadline:
            sys.exit("no go file")
        time.sleep(0.001)
    for i in range(rounds):
        repo.move_alias("m", "prod", SetTarget(str(1 + i % 2)), by=f"w{wid}-{i}")
    """
)


def test_concurrent_alias_moves_from_two_processes_lose_nothing(
    repo: Repository, settings: Settings, tmp_path: Path
) -> None:
    """2 processes x 50 moves of one alias: every move is in the object or its history, in order."""
    publish_files(repo, tmp_path, "m", "1", {"a.bin": b"one"})
    publish_files(repo, tmp_path, "m", "2", {"a.bin": b"two"})
    repo.move_alias("m", "prod", SetTarget("1"), by="init")
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, settings.store, str(w), str(ROUNDS), str(go)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(WORKERS)
    ]
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err

    final = repo.get_alias("m", "prod")
    chain = [*final.history, final]
    # 1 initial move + 100 concurrent ones; history keeps the last 100 previous targets.
    assert final.sequence == 1 + WORKERS * ROUNDS
    assert [e.sequence for e in chain] == list(range(final.seq - len(chain) + 1, final.seq + 1))
    moved_by = {e.updated_by for e in chain}
    expected = {f"w{w}-{i}" for w in range(WORKERS) for i in range(ROUNDS)}
    assert expected <= moved_by, f"lost moves: {sorted(expected - moved_by)[:5]}"
    # each worker's own moves appear in the order it made them
    for w in range(WORKERS):
        mine = [int(e.updated_by.split("-")[1]) for e in chain if e.updated_by.startswith(f"w{w}-")]
        assert mine == sorted(mine)


def test_a_write_with_a_stale_etag_is_refused_and_changes_nothing(store: ObjectStore) -> None:
    store.put("m/aliases/prod.json", b"one")
    _, etag = store.get("m/aliases/prod.json")
    store.put("m/aliases/prod.json", b"two", if_match=etag)
    with pytest.raises(errors.StoreConflict):
        store.put("m/aliases/prod.json", b"three", if_match=etag)
    assert store.get("m/aliases/prod.json")[0] == b"two"


def test_a_conditional_write_to_a_deleted_object_is_a_conflict(store: ObjectStore) -> None:
    with pytest.raises(errors.StoreConflict):
        store.put("m/aliases/gone.json", b"x", if_match='"0123"')


def test_a_local_etag_never_repeats_even_when_size_and_inode_could(tmp_path: Path) -> None:
    """Same-size rewrites in a tight loop: each write gets a new ETag (no ABA for compare-and-swap)."""
    from serving.store.local import LocalStore

    store = LocalStore(str(tmp_path))
    seen = set()
    for i in range(200):
        store.put("m/aliases/prod.json", b"%03d" % (i % 2))
        seen.add(store.get("m/aliases/prod.json")[1])
    assert len(seen) == 200


def test_rollback_is_a_new_move_with_a_higher_sequence(repo: Repository, tmp_path: Path) -> None:
    for v in ("1", "2"):
        publish_files(repo, tmp_path, "m", v, {"a.bin": v.encode()})
        repo.move_alias("m", "prod", SetTarget(v))
    back = repo.move_alias("m", "prod", Rollback())
    assert (back.version, back.sequence, back.history) == ("1", 3, [])
    assert repo.get_alias("m", "prod") == back


def test_an_alias_naming_an_unsafe_version_is_refused_on_read(repo: Repository) -> None:
    """Alias.version becomes a cache path: a third-party writer's ``../x`` is an error, not a path."""
    sha = "0" * 64
    body = {"name": "m", "alias": "prod", "version": "../../etc", "manifest_sha256": sha}
    repo.store.put("m/aliases/prod.json", json.dumps(body).encode())
    with pytest.raises(errors.InvalidManifest, match="version"):
        repo.get_alias("m", "prod")
