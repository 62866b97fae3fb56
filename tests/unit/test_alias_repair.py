"""``serving alias repair`` recovers any alias object, even unreadable bytes (issue 22)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_slot_watcher import publish

from serving.cli import main
from serving.errors import InvalidManifest
from serving.manifest import Alias
from serving.repository import Repository, SetTarget
from serving.store.local import LocalStore


def _valid(**change: object) -> bytes:
    doc: dict[str, object] = {
        "name": "m",
        "alias": "prod",
        "version": "2",
        "manifest_sha256": "a" * 64,
        "updated_at": "2026-01-01T00:00:00+00:00",
        "updated_by": "x",
        "sequence": 3,
    }
    doc.update(change)
    return json.dumps(doc).encode()


CORRUPTED: dict[str, bytes] = {
    "empty": b"",
    "truncated": _valid()[:40],
    "null": b"null",
    "a list": b"[]",
    "a string": b'"production"',
    "not UTF-8": b"\xff\xfe\x00garbage",
    "no version": json.dumps({"name": "m", "alias": "prod", "manifest_sha256": "a" * 64}).encode(),
    "a version with a newline": _valid(version="2\n"),
    "a version that is a path": _valid(version="../../etc"),
    "a digest that is not one": _valid(manifest_sha256="zz"),
    "a negative sequence": _valid(sequence=-1),
    "a sequence of 2**200": _valid(sequence=2**200),
    "a sequence that is a list": _valid(sequence=[1]),
    "a canary equal to the target": _valid(
        canary={"version": "2", "manifest_sha256": "a" * 64, "weight": 50}
    ),
    "a canary weight of 150": _valid(canary={"version": "1", "manifest_sha256": "a" * 64, "weight": 150}),
    "another model's object": _valid(name="other"),
    "another alias's object": _valid(alias="staging"),
    "nested 5,000 deep": b"[" * 5000,
    "a history entry without a version": _valid(history=[{"manifest_sha256": "a" * 64}]),
}


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalStore:
    monkeypatch.setenv("SERVING_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("SERVING_CACHE_DIR", str(tmp_path / "cache"))
    store = LocalStore(str(tmp_path / "store"))
    repo = Repository(store)
    for v in ("1", "2"):
        publish(repo, tmp_path, v, factor=int(v))
    return store


@pytest.mark.parametrize("case", list(CORRUPTED))
def test_repair_recovers_the_alias_and_keeps_the_old_bytes(
    case: str, store: LocalStore, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = CORRUPTED[case]
    store.put(Repository.alias_key("m", "prod"), raw)
    assert main(["alias", "set", "m", "prod", "1"]) != 0  # what an operator had before
    capsys.readouterr()
    before = int(time.time())
    assert main(["alias", "repair", "m", "prod", "--to", "1"]) == 0
    out = capsys.readouterr().out
    assert "m@prod -> 1 (repaired" in out
    repaired = Repository(store).get_alias("m", "prod")
    assert repaired.version == "1"
    assert repaired.canary is None
    assert repaired.seq >= before  # above any sequence a replica accepted before
    kept = out.split("kept at ")[1].strip().rstrip(")")
    assert store.get(kept)[0] == raw
    assert main(["alias", "set", "m", "prod", "2"]) == 0  # ordinary moves work again


def test_a_readable_alias_is_repaired_as_a_move_with_its_history(store: LocalStore) -> None:
    repo = Repository(store)
    first = repo.move_alias("m", "prod", SetTarget("2"))
    repaired, kept = repo.repair_alias("m", "prod", "1")
    assert (repaired.version, repaired.seq) == ("1", first.seq + 1)
    assert [h.version for h in repaired.history] == ["2"]
    assert kept is not None


@pytest.mark.parametrize("case", ["a canary equal to the target", "a sequence of 2**200"])
def test_readers_refuse_what_writers_must_not_write(case: str) -> None:
    with pytest.raises(InvalidManifest):
        Alias.from_json(CORRUPTED[case])


@pytest.mark.parametrize("old", [2**40, 2**53 - 2])
def test_repair_never_lowers_a_sequence_the_old_bytes_show(store: LocalStore, old: int) -> None:
    """Found in review: an unreadable object carrying a sequence above the clock was repaired
    to the Unix time, which replicas that accepted the old one refuse as a replay."""
    store.put(Repository.alias_key("m", "prod"), _valid(sequence=old, manifest_sha256="zz"))
    repaired, _ = Repository(store).repair_alias("m", "prod", "1")
    assert repaired.seq == old + 1


def test_repair_refuses_to_pass_the_largest_sequence(store: LocalStore) -> None:
    from serving.errors import InvalidRequest

    store.put(Repository.alias_key("m", "prod"), _valid(sequence=2**53 - 1, manifest_sha256="zz"))
    with pytest.raises(InvalidRequest, match="would pass"):
        Repository(store).repair_alias("m", "prod", "1")
