"""The serving layer enforces signatures before loading, and keeps the old version serving."""

from __future__ import annotations

from pathlib import Path

import joblib
import orjson
import pytest
from prometheus_client import REGISTRY
from rest_client import predict_v1
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from serving.config import AppConfig, ModelConfig
from serving.publish import publish_path
from serving.repository import Repository, SetTarget
from serving.runtime.service import ModelService
from serving.settings import Settings
from serving.signing import alias_signer, generate_keypair, load_signing_key
from serving.store.local import LocalStore

ROW = [[5.1, 3.5, 1.4, 0.2]]


def _publish(repo: Repository, tmp: Path, version: str, c: float, key: Path | None = None) -> None:
    x, y = load_iris(return_X_y=True)
    path = tmp / f"iris-{version}.joblib"
    joblib.dump(LogisticRegression(max_iter=300, C=c).fit(x, y), path)
    publish_path(
        repo, path, "iris", version=version, example=ROW, signing_key=load_signing_key(key) if key else None
    )


@pytest.fixture
def signed_setup(tmp_path: Path) -> tuple[Repository, Settings, Path, Path]:
    trusted = generate_keypair(tmp_path / "keys" / "release")
    other = generate_keypair(tmp_path / "keys" / "stranger")
    repo = Repository(LocalStore(str(tmp_path / "store")))
    settings = Settings(
        store=str(tmp_path / "store"),
        cache_dir=tmp_path / "cache",
        require_signature=True,
        trusted_keys=[trusted.pub_path],
    )
    return repo, settings, trusted.key_path, other.key_path


def _service(settings: Settings) -> ModelService:
    app = AppConfig(models=[ModelConfig(name="iris")], poll_interval_s=1)
    return ModelService(app.models[0], app, settings)


def _refused() -> float:
    return (
        REGISTRY.get_sample_value("serving_trust_checks_total", {"model": "iris", "outcome": "refused"})
        or 0.0
    )


def _served(service: ModelService) -> str:
    reply = predict_v1(service, orjson.dumps({"instances": ROW}))
    assert reply.status == 200, reply.body
    return str(orjson.loads(reply.body)["model_version"])


@pytest.mark.parametrize("signer", ["unsigned", "untrusted"])
def test_require_signature_refuses_before_loading_and_keeps_the_old_version(
    signed_setup, tmp_path: Path, signer: str
) -> None:
    repo, settings, trusted_key, other_key = signed_setup
    _publish(repo, tmp_path, "1", 1.0, trusted_key)
    _publish(repo, tmp_path, "2", 0.5, None if signer == "unsigned" else other_key)
    _publish(repo, tmp_path, "3", 0.3, trusted_key)
    # NOTE: with require_signature, alias moves must be signed too (SECURITY.md, Signed aliases).
    move = alias_signer(load_signing_key(trusted_key))
    repo.move_alias("iris", "production", SetTarget("1"), writer=move)
    service = _service(settings)
    service.start()
    assert _served(service) == "1"
    refused_before = _refused()
    repo.move_alias("iris", "production", SetTarget("2"), writer=move)
    assert service.watcher is not None
    service.watcher.tick()
    assert _served(service) == "1"
    status = service.status()
    assert status["failed_version"] == "2"
    assert "sign" in status["last_error"]
    # Refused before any byte was pulled: v2's file never reached the cache.
    assert not list((tmp_path / "cache" / "versions" / "iris").glob("2-*"))
    assert _refused() == refused_before + 1
    repo.move_alias("iris", "production", SetTarget("3"), writer=move)
    service.watcher.tick()
    assert _served(service) == "3"
