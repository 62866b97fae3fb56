"""The trust verbs and flags of the CLI, run as real processes: keygen, publish --sign-key
--compress --encrypt-key, verify --trusted-key, predict under require_signature."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

Run = Callable[..., subprocess.CompletedProcess[str]]
KEYS = {"SERVING_REQUIRE_SIGNATURE": "true", "SERVING_TRUSTED_KEYS": "release.pub"}
DATA_KEY = {"SERVING_ENCRYPTION_KEY_FILE": "data.kek"}


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    for name in list(os.environ):
        if name.startswith("SERVING_"):
            monkeypatch.delenv(name)
    base = {
        **os.environ,
        "SERVING_STORE": str(tmp_path / "store"),
        "SERVING_CACHE_DIR": str(tmp_path / "cache"),
    }

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "serving.cli", *args],
            cwd=tmp_path,
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    return run


@pytest.fixture
def model(tmp_path: Path) -> Path:
    import joblib
    from sklearn.linear_model import LogisticRegression

    path = tmp_path / "model.joblib"
    joblib.dump(LogisticRegression().fit([[0.0], [1.0]], [0, 1]), path)
    return path


def test_signed_compressed_encrypted_publish_verifies_and_predicts(
    run: Run, model: Path, tmp_path: Path
) -> None:
    """keygen -> publish --sign-key --compress --encrypt-key -> verify -> predict with signatures required."""
    assert run("keygen", "release").returncode == 0
    assert stat.S_IMODE((tmp_path / "release.key").stat().st_mode) == 0o600
    assert run("keygen", "data", "--kek").returncode == 0
    published = run(
        "publish", str(model), "--name", "iris", "--alias", "production",
        "--sign-key", "release.key", "--compress", "--encrypt-key", "data.kek",
    )  # fmt: skip
    assert published.returncode == 0, published.stderr
    verified = run(
        "verify", "iris@production", "--trusted-key", "release.pub", SERVING_ENCRYPTION_KEY_FILE="data.kek"
    )
    assert verified.returncode == 0, verified.stderr
    assert "signed by trusted key" in verified.stdout
    predicted = run(
        "predict", "iris@production", "--input", "[[1.0]]",
        **KEYS, **DATA_KEY,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    assert '"predict": [1]' in predicted.stdout


def test_verify_with_another_key_exits_untrusted(run: Run, model: Path) -> None:
    """A version signed by a key that is not trusted exits 6 with one clear line."""
    run("keygen", "release")
    run("keygen", "other")
    assert run("publish", str(model), "--name", "iris", "--sign-key", "release.key").returncode == 0
    result = run("verify", "iris:1", "--trusted-key", "other.pub")
    assert result.returncode == 6
    assert "signed only by untrusted keys" in result.stderr


def test_unsigned_version_is_refused_when_signatures_are_required(run: Run, model: Path) -> None:
    """predict refuses an unsigned version under SERVING_REQUIRE_SIGNATURE (exit 6)."""
    run("keygen", "release")
    assert run("publish", str(model), "--name", "iris").returncode == 0
    result = run(
        "predict",
        "iris:1",
        "--input",
        "[[1.0]]",
        SERVING_REQUIRE_SIGNATURE="1",
        SERVING_TRUSTED_KEYS="release.pub",
    )
    assert result.returncode == 6
    assert "not signed" in result.stderr


def test_keygen_never_overwrites(run: Run) -> None:
    """A second keygen on the same prefix fails and leaves the key alone."""
    assert run("keygen", "release").returncode == 0
    assert run("keygen", "release").returncode == 2
