"""The alias feed: one listing per interval tells which of 1,000 members' aliases moved.

Runs on a folder and on a real S3 server (moto on loopback), where the test counts the
HTTP requests the listing costs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from serving.repository import FEED_PREFIX, Repository, SetTarget
from serving.runtime.feed import AliasFeed
from serving.testing.repo import publish_files

MEMBERS = 1000


def _marker(repo: Repository, name: str, alias: str = "production", sequence: int = 1) -> None:
    # NOTE: what Repository.move_alias writes after each move, written directly: publishing
    # 1,000 versions would cost minutes of the suite and test nothing more here.
    repo.store.put(repo.feed_key(name, alias), f'{{"version": "1", "sequence": {sequence}}}'.encode())


def test_a_move_writes_its_marker_and_the_feed_is_not_a_model(repo: Repository, tmp_path: Path) -> None:
    publish_files(repo, tmp_path, "m", "1", {"a.bin": b"one"})
    publish_files(repo, tmp_path, "m", "2", {"a.bin": b"two"})
    repo.move_alias("m", "production", SetTarget("1"))
    first = repo.alias_feed("production")
    assert set(first) == {"m"}
    repo.move_alias("m", "production", SetTarget("2"))
    assert repo.alias_feed("production")["m"] != first["m"]
    assert repo.alias_feed("staging") == {}
    assert repo.list_models() == ["m"]
    assert FEED_PREFIX.rstrip("/") in repo.store.list_dirs("")


def test_one_listing_nudges_exactly_the_members_whose_alias_moved(
    repo: Repository, request: pytest.FixtureRequest
) -> None:
    names = [f"tenant-{i}" for i in range(MEMBERS)]
    for name in names:
        _marker(repo, name)
    _marker(repo, "not-loaded")
    loaded = {name: "production" for name in names}
    nudged: list[str] = []
    feed = AliasFeed(repo, lambda: loaded, nudged.append)

    # NOTE: the first tick nudges every member once: each may have moved since it loaded.
    assert len(feed.tick()) == MEMBERS
    nudged.clear()
    s3: Any = request.getfixturevalue("s3_env") if "s3" in request.node.callspec.id else None
    if s3 is not None:
        s3.reset_counts()
    assert feed.tick() == []
    if s3 is not None:
        # NOTE: 1,001 markers: two list pages of at most 1,000 keys, and nothing else.
        calls = [(r.method, r.key, "list-type=2" in r.query) for r in s3.requests]
        assert len(calls) == 2, calls
        assert all(method == "GET" and listing for method, _, listing in calls), calls

    _marker(repo, "tenant-7", sequence=2)
    _marker(repo, "tenant-900", sequence=2)
    _marker(repo, "not-loaded", sequence=2)
    assert sorted(feed.tick()) == ["tenant-7", "tenant-900"]
    assert sorted(nudged) == ["tenant-7", "tenant-900"]

    # NOTE: a member loaded since the last tick is nudged once, then only when it moves.
    loaded["not-loaded"] = "production"
    assert feed.tick() == ["not-loaded"]
    assert feed.tick() == []


def test_a_failed_listing_nudges_nobody_and_the_next_one_catches_up(repo: Repository) -> None:
    _marker(repo, "a")
    feed = AliasFeed(repo, lambda: {"a": "production"}, lambda name: None)
    feed.tick()
    store = repo.store
    real_list = store.list

    def broken(prefix: str) -> Any:
        from serving.errors import StoreUnavailable

        raise StoreUnavailable("the store is down")

    store.list = broken  # type: ignore[method-assign]
    _marker(repo, "a", sequence=2)
    assert feed.tick() == []
    store.list = real_list  # type: ignore[method-assign]
    assert feed.tick() == ["a"]
