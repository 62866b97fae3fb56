"""Signed aliases: a replayed, unsigned, tampered or expired alias is refused; rollback still works."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import prometheus_client
import pytest

from serving.cache import CachedVersion, LoaderCache
from serving.errors import UntrustedArtifact
from serving.formats.base import LoadPolicy, Predictor
from serving.manifest import Alias, Manifest, TensorSpec
from serving.repository import Abort, Repository, Rollback, SetCanary, SetTarget, collect_files, file_entries
from serving.runtime.slot import ModelSlot
from serving.runtime.watcher import AliasWatcher
from serving.settings import Settings
from serving.signing import SigningKey, alias_signer, generate_keypair, load_signing_key, sign_manifest
from serving.store.local import LocalStore
from serving.trust import check_alias, check_trust

SPEC = [TensorSpec(name="x", datatype="FP64", shape=[-1, 1])]


class Echo(Predictor):
    inputs = SPEC
    outputs = SPEC

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"x": inputs["x"]}


def echo_loader(cached: CachedVersion, policy: LoadPolicy) -> Predictor:
    return Echo()


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    pair = generate_keypair(tmp_path / "release")
    return load_signing_key(pair.key_path)


@pytest.fixture
def settings(tmp_path: Path, key: SigningKey) -> Settings:
    return Settings(
        store=str(tmp_path / "store"),
        cache_dir=tmp_path / "cache",
        require_signature=True,
        trusted_keys=[tmp_path / "release.pub"],
        unrestricted_models=["m"],
    )


@pytest.fixture
def repo(tmp_path: Path, key: SigningKey) -> Repository:
    repo = Repository(LocalStore(str(tmp_path / "store")))
    for version in ("1", "2", "3"):
        src = tmp_path / f"src-{version}"
        src.mkdir()
        (src / "w.json").write_text(json.dumps({"v": version}))
        files = collect_files(src)
        manifest = Manifest(name="m", version=version, format="test", files=file_entries(files))
        repo.publish(manifest, files, signer=lambda raw: sign_manifest(raw, key))
    return repo


def refused() -> float:
    value = prometheus_client.REGISTRY.get_sample_value(
        "serving_trust_checks_total", {"model": "m", "outcome": "refused"}
    )
    return value or 0.0


def alias_key() -> str:
    return Repository.alias_key("m", "prod")


def test_a_replayed_older_signed_alias_is_refused_even_after_a_restart(
    repo: Repository, settings: Settings, key: SigningKey, tmp_path: Path
) -> None:
    signed = alias_signer(key)
    repo.move_alias("m", "prod", SetTarget("1"), writer=signed)
    old_raw, _ = repo.store.get(alias_key())
    repo.move_alias("m", "prod", SetTarget("2"), writer=signed)
    check_alias(repo.resolve("m@prod"), settings, cache_root=tmp_path / "cache")

    repo.store.put(alias_key(), old_raw)  # a bucket writer replays the validly signed old object
    before = refused()
    with pytest.raises(UntrustedArtifact, match="replayed"):
        check_alias(repo.resolve("m@prod"), settings, cache_root=tmp_path / "cache")
    assert refused() == before + 1
    # the accepted sequence lives in the cache's alias memory: a fresh process refuses too
    with pytest.raises(UntrustedArtifact, match="replayed"):
        check_trust(repo, repo.resolve("m@prod"), settings, cache_root=LoaderCache(tmp_path / "cache").root)


def test_an_unsigned_or_tampered_alias_is_refused_when_signatures_are_required(
    repo: Repository, settings: Settings, key: SigningKey, tmp_path: Path
) -> None:
    repo.move_alias("m", "prod", SetTarget("1"))  # unsigned
    with pytest.raises(UntrustedArtifact, match="not signed"):
        check_alias(repo.resolve("m@prod"), settings, cache_root=tmp_path / "cache")

    repo.move_alias("m", "prod", SetTarget("2"), writer=alias_signer(key))
    doc = json.loads(repo.store.get(alias_key())[0])
    target = repo.manifest("m", "3")[1]
    from serving.manifest import sha256_bytes

    doc.update(version="3", manifest_sha256=sha256_bytes(target))  # retarget, keep the signature
    repo.store.put(alias_key(), json.dumps(doc).encode())
    with pytest.raises(UntrustedArtifact, match="does not verify"):
        check_alias(repo.resolve("m@prod"), settings, cache_root=tmp_path / "cache")


def test_a_signed_rollback_is_accepted_because_its_sequence_is_higher(
    repo: Repository, settings: Settings, key: SigningKey, tmp_path: Path
) -> None:
    signed = alias_signer(key)
    repo.move_alias("m", "prod", SetTarget("1"), writer=signed)
    repo.move_alias("m", "prod", SetTarget("2"), writer=signed)
    check_alias(repo.resolve("m@prod"), settings, cache_root=tmp_path / "cache")
    back = repo.move_alias("m", "prod", Rollback(), writer=signed)
    assert (back.version, back.sequence) == ("1", 3)
    check_alias(repo.resolve("m@prod"), settings, cache_root=tmp_path / "cache")


def test_an_expired_signed_alias_is_refused(
    repo: Repository, settings: Settings, key: SigningKey, tmp_path: Path
) -> None:
    repo.move_alias(
        "m", "prod", SetTarget("1"), writer=alias_signer(key), expires_at="2030-01-01T00:00:00+00:00"
    )
    resolved = repo.resolve("m@prod")
    check_alias(resolved, settings, cache_root=tmp_path / "cache", clock=lambda: 1_800_000_000.0)
    with pytest.raises(UntrustedArtifact, match="expired"):
        check_alias(resolved, settings, cache_root=tmp_path / "cache", clock=lambda: 1_900_000_000.0)


def test_readers_that_ignore_the_new_fields_still_parse_a_signed_alias(
    repo: Repository, key: SigningKey
) -> None:
    repo.move_alias("m", "prod", SetTarget("1"), writer=alias_signer(key))
    raw, _ = repo.store.get(alias_key())
    doc = json.loads(raw)
    old_fields = {"name", "alias", "version", "manifest_sha256", "updated_at", "updated_by", "history"}
    assert Alias.model_validate({k: v for k, v in doc.items() if k in old_fields}).version == "1"
    assert {"sequence", "signatures"} <= set(doc)


def test_a_replica_refusing_a_replayed_alias_keeps_serving_its_live_version(
    repo: Repository, settings: Settings, key: SigningKey, tmp_path: Path
) -> None:
    signed = alias_signer(key)
    repo.move_alias("m", "prod", SetTarget("1"), writer=signed)
    old_raw, _ = repo.store.get(alias_key())
    repo.move_alias("m", "prod", SetTarget("2"), writer=signed)
    cache = LoaderCache(tmp_path / "cache")

    def trust(r: Repository, resolved: object) -> LoadPolicy:
        return check_trust(r, resolved, settings, cache_root=cache.root).policy  # type: ignore[arg-type]

    slot = ModelSlot("m", repo, cache, loader=echo_loader, trust_check=trust, warmup=False)
    watcher = AliasWatcher(slot, "prod", clock=lambda: 0.0)
    watcher.start()
    assert slot.version == "2"
    repo.store.put(alias_key(), old_raw)
    before = refused()
    watcher.tick(force=True)
    assert slot.version == "2"
    assert refused() == before + 1
    assert cache.remembered_alias("m", "prod").version == "2"  # type: ignore[union-attr]
    slot.close()


def test_a_canary_added_without_the_key_is_refused_and_takes_no_traffic(
    repo: Repository, settings: Settings, key: SigningKey, tmp_path: Path
) -> None:
    """An unsigned canary on a signed alias is refused like an unsigned move; a signed one loads."""
    signed = alias_signer(key)
    repo.move_alias("m", "prod", SetTarget("1"), writer=signed)
    cache = LoaderCache(tmp_path / "cache")

    def trust(r: Repository, resolved: object) -> LoadPolicy:
        return check_trust(r, resolved, settings, cache_root=cache.root).policy  # type: ignore[arg-type]

    slot = ModelSlot("m", repo, cache, loader=echo_loader, trust_check=trust, warmup=False)
    watcher = AliasWatcher(slot, "prod", clock=lambda: 0.0)
    watcher.start()
    before = refused()
    repo.move_alias("m", "prod", SetCanary("2", 50))  # NOTE: no writer: an unsigned object
    watcher.tick(force=True)
    assert slot.companion("canary") is None
    assert watcher.split.canary_weight == 0
    assert refused() > before
    assert slot.version == "1"
    repo.move_alias("m", "prod", SetCanary("3", 50, replace=True), writer=signed)
    watcher.tick(force=True)
    canary = slot.companion("canary")
    assert canary is not None
    assert canary.version == "3"
    assert watcher.split.canary_weight == 50
    slot.close()


class Outage(LocalStore):
    """A local store that can go down: every read raises StoreUnavailable."""

    down = False

    def get(self, key: str, *args: object, **kwargs: object):  # type: ignore[no-untyped-def,override]
        from serving.errors import StoreUnavailable

        if self.down:
            raise StoreUnavailable("the store is down (test)")
        return super().get(key, *args, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("expires_at", "served"), [("2020-01-01T00:00:00+00:00", False), ("2999-01-01T00:00:00+00:00", True)]
)
def test_offline_the_remembered_signed_alias_is_checked_as_online(
    repo: Repository, settings: Settings, key: SigningKey, tmp_path: Path, expires_at: str, served: bool
) -> None:
    """A restarted node with the store down serves the remembered target only if its signed
    alias object still verifies and has not expired (it used to skip the check)."""
    store = Outage(str(tmp_path / "store"))
    online = Repository(store)
    online.move_alias("m", "prod", SetTarget("2"), writer=alias_signer(key), expires_at=expires_at)
    cache = LoaderCache(tmp_path / "cache")
    resolved, from_cache = cache.resolve(online, "m@prod")
    assert not from_cache
    cache.fetch(online, resolved)

    store.down = True
    offline, from_cache = cache.resolve(online, "m@prod")
    assert from_cache
    assert offline.offline
    assert offline.version == "2"
    if served:
        check_alias(offline, settings, cache_root=cache.root)
    else:
        with pytest.raises(UntrustedArtifact, match="expired"):
            check_alias(offline, settings, cache_root=cache.root)


def test_offline_a_target_remembered_without_its_alias_object_is_refused(
    repo: Repository, settings: Settings, key: SigningKey, tmp_path: Path
) -> None:
    """Memory written before alias objects were kept (or stripped of it) fails closed."""
    store = Outage(str(tmp_path / "store"))
    online = Repository(store)
    online.move_alias("m", "prod", SetTarget("1"), writer=alias_signer(key))
    cache = LoaderCache(tmp_path / "cache")
    resolved, _ = cache.resolve(online, "m@prod", remember=False)
    cache.fetch(online, resolved)
    cache.remember_alias("m", "prod", resolved.version, resolved.manifest_sha256)  # no alias object
    store.down = True
    offline, _ = cache.resolve(online, "m@prod")
    with pytest.raises(UntrustedArtifact, match="remembers no signed alias object"):
        check_alias(offline, settings, cache_root=cache.root)


def test_offline_restart_after_a_canary_step_serves_the_remembered_target(
    repo: Repository, settings: Settings, key: SigningKey, tmp_path: Path
) -> None:
    """A canary step and its abort move the alias's sequence without moving its target: the node
    remembers the newest object it saw, so an offline restart is not refused as a replay."""
    signed = alias_signer(key)
    store = Outage(str(tmp_path / "store"))
    online = Repository(store)
    online.move_alias("m", "prod", SetTarget("1"), writer=signed)
    cache = LoaderCache(tmp_path / "cache")

    def replica() -> tuple[ModelSlot, AliasWatcher]:
        def trust(r: Repository, resolved: object) -> LoadPolicy:
            return check_trust(r, resolved, settings, cache_root=cache.root).policy  # type: ignore[arg-type]

        slot = ModelSlot("m", online, cache, loader=echo_loader, trust_check=trust, warmup=False)
        return slot, AliasWatcher(slot, "prod", clock=lambda: 0.0)

    slot, watcher = replica()
    watcher.start()
    online.move_alias("m", "prod", SetCanary("2", 10), writer=signed)
    watcher.tick(force=True)
    assert slot.companion("canary") is not None
    online.move_alias("m", "prod", Abort(), writer=signed)
    watcher.tick(force=True)
    slot.close()
    store.down = True
    again, watcher = replica()
    watcher.start()
    assert again.version == "1"
    again.close()
