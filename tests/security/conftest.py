"""The corpus runs each payload through the real publish -> cache -> trust -> load path.

Every attempt is recorded; the terminal summary prints
``N payloads, 0 executed, K refused before deserialization``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from serving.cache import LoaderCache
from serving.errors import ServingError
from serving.formats import load_predictor
from serving.publish import publish_path
from serving.repository import Repository
from serving.settings import Settings
from serving.signing import SigningKey, generate_keypair, load_signing_key
from serving.store.local import LocalStore
from serving.trust import check_trust

from .corpus import Sentinel, write_runpy_script

BEFORE = ("resolve", "trust", "fetch")
"""Stages that run before any deserializer sees a byte."""


@dataclass
class Record:
    payload: str
    executed: bool
    stage: str


@dataclass
class Ledger:
    records: list[Record] = field(default_factory=list)

    def summary(self) -> str:
        n = len(self.records)
        executed = sum(r.executed for r in self.records)
        before = sum(r.stage in BEFORE for r in self.records)
        return f"{n} payloads, {executed} executed, {before} refused before deserialization"


LEDGER = Ledger()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if LEDGER.records:
        terminalreporter.write_sep("=", "malicious-artifact corpus")
        by_stage: dict[str, int] = {}
        for r in LEDGER.records:
            by_stage[r.stage] = by_stage.get(r.stage, 0) + 1
        terminalreporter.write_line(f"refused at: {dict(sorted(by_stage.items()))}")
        terminalreporter.write_line(LEDGER.summary())


class Refused(Exception):
    """What :meth:`Pipeline.attempt` returns for a refused payload (never raised)."""

    def __init__(self, stage: str, error: ServingError) -> None:
        super().__init__(f"{stage}: {error}")
        self.stage, self.error = stage, error


class Pipeline:
    """A store, a node cache and settings: the same steps serving.load takes."""

    def __init__(self, root: Path, **settings: Any) -> None:
        self.repo = Repository(LocalStore(str(root / "store")))
        self.settings = Settings(cache_dir=root / "cache", **settings)
        self.cache = LoaderCache(
            self.settings.cache_dir,
            self.settings.cache_max_bytes,
            max_artifact_bytes=self.settings.max_artifact_bytes,
            max_artifact_files=self.settings.max_artifact_files,
        )

    def publish(self, path: Path, name: str, signing_key: SigningKey | None = None, **kw: Any) -> str:
        manifest = publish_path(self.repo, path, name, signing_key=signing_key, **kw)
        return f"{name}:{manifest.version}"

    def load(self, ref: str) -> Any:
        """resolve -> check_trust -> fetch (digest-checked) -> load, tagging where it stopped."""
        stage = "resolve"
        try:
            resolved, _ = self.cache.resolve(self.repo, ref)
            stage = "trust"
            trust = check_trust(self.repo, resolved, self.settings, cache_root=self.cache.root)
            stage = "fetch"
            cached = self.cache.fetch(self.repo, resolved)
            stage = "load"
            with self.cache.pin(cached):
                return load_predictor(cached.path, cached.manifest, trust.policy)
        except ServingError as exc:
            exc.add_note(f"stage: {stage}")
            raise Refused(stage, exc) from exc

    def attempt(self, payload: str, ref: str, sentinel: Sentinel, example: Any = None) -> Refused:
        """Load ``ref``, which must be refused; record it and prove nothing ran."""
        refused: Refused | None = None
        try:
            predictor = self.load(ref)
            # NOTE: a loaded model is already a failure; calling it shows whether it also runs code.
            if example is not None:
                predictor.predict_rows(example)
        except Refused as exc:
            refused = exc
        tripped = _tripped_within(sentinel, 0.3)
        LEDGER.records.append(Record(payload, tripped, refused.stage if refused else "loaded"))
        assert not tripped, f"{payload}: the payload ran"
        assert refused is not None, f"{payload}: loaded instead of being refused"
        return refused


def _tripped_within(sentinel: Sentinel, seconds: float) -> bool:
    """Poll for the sentinel, so a payload that spawned a process gets time to show itself."""
    deadline = time.monotonic() + seconds
    while True:
        if sentinel.tripped():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


@pytest.fixture
def sentinel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sentinel]:
    t = Sentinel(tmp_path / "PWNED", tmp_path / "canary", tmp_path / "payload_script.py")
    t.canary.mkdir()
    write_runpy_script(t)
    # NOTE: the webbrowser payload would run `$BROWSER <url>`, i.e. touch the sentinel.
    monkeypatch.setenv("BROWSER", "touch")
    yield t
    assert not t.tripped()


@pytest.fixture
def pipeline(tmp_path: Path) -> Pipeline:
    return Pipeline(tmp_path)


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A trusted release key and an attacker's key."""
    root = tmp_path_factory.mktemp("keys")
    trusted = generate_keypair(root / "release")
    attacker = generate_keypair(root / "attacker")
    return {
        "trusted_pub": trusted.pub_path,
        "trusted": load_signing_key(trusted.key_path),
        "attacker": load_signing_key(attacker.key_path),
    }
