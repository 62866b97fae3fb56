"""check_trust: signatures and load classes, decided on the manifest before any load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from serving.errors import UntrustedArtifact
from serving.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest
from serving.repository import Repository, Resolved, collect_files, file_entries
from serving.settings import Settings
from serving.signing import generate_keypair, load_signing_key, sign_manifest
from serving.store.local import LocalStore
from serving.trust import check_trust, load_class


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository(LocalStore(str(tmp_path / "store")))


@pytest.fixture
def key(tmp_path: Path) -> Path:
    return generate_keypair(tmp_path / "keys" / "release").key_path


def publish(
    repo: Repository,
    tmp_path: Path,
    version: str,
    key: Path | None,
    *,
    filename: str = "model.joblib",
    fmt: str = "sklearn",
    name: str = "iris",
) -> Resolved:
    src = tmp_path / f"src-{name}-{version}"
    src.mkdir()
    (src / filename).write_bytes(f"weights of {version}".encode())
    files = collect_files(src)
    manifest = Manifest(name=name, version=version, format=fmt, files=file_entries(files))
    signer = None
    if key is not None:
        signing_key = load_signing_key(key)

        def signer(raw: bytes) -> bytes:
            return sign_manifest(raw, signing_key)

    repo.publish(manifest, files, signer=signer)
    return repo.resolve(f"{name}:{version}")


def settings(key: Path | None, **kw: object) -> Settings:
    trusted = [key.with_suffix(".pub")] if key else []
    return Settings(trusted_keys=trusted, **kw)  # type: ignore[arg-type]


def test_signed_version_passes_in_require_signature_mode(repo: Repository, tmp_path: Path, key: Path) -> None:
    """A version signed by a trusted key is allowed and reported as signed."""
    resolved = publish(repo, tmp_path, "1", key)
    trust = check_trust(repo, resolved, settings(key, require_signature=True))
    assert trust.signed
    assert trust.policy.signed
    assert not trust.policy.allow_unrestricted


def test_unsigned_version_is_refused_when_signatures_are_required(
    repo: Repository, tmp_path: Path, key: Path
) -> None:
    """require_signature refuses a version without manifest.sig."""
    resolved = publish(repo, tmp_path, "1", None)
    with pytest.raises(UntrustedArtifact, match="not signed"):
        check_trust(repo, resolved, settings(key, require_signature=True))


def test_unsigned_version_passes_when_signatures_are_optional(
    repo: Repository, tmp_path: Path, key: Path
) -> None:
    """Without require_signature, a safe-format unsigned version is allowed, unsigned."""
    resolved = publish(repo, tmp_path, "1", None)
    trust = check_trust(repo, resolved, settings(key))
    assert not trust.signed


def test_version_signed_by_untrusted_key_is_refused(repo: Repository, tmp_path: Path, key: Path) -> None:
    """A valid signature by someone else's key does not satisfy require_signature."""
    other = generate_keypair(tmp_path / "other").key_path
    resolved = publish(repo, tmp_path, "1", other)
    with pytest.raises(UntrustedArtifact, match="untrusted keys"):
        check_trust(repo, resolved, settings(key, require_signature=True))


def test_signature_copied_from_another_version_is_refused(
    repo: Repository, tmp_path: Path, key: Path
) -> None:
    """Version 1's valid signature placed next to version 2's manifest is refused."""
    publish(repo, tmp_path, "1", key)
    resolved = publish(repo, tmp_path, "2", None)
    root = tmp_path / "store" / "iris" / "versions"
    shutil.copy(root / "1" / SIGNATURE_NAME, root / "2" / SIGNATURE_NAME)
    with pytest.raises(UntrustedArtifact, match="another manifest"):
        check_trust(repo, resolved, settings(key, require_signature=True))


def test_manifest_and_signature_swapped_in_from_another_version_are_refused(
    repo: Repository, tmp_path: Path, key: Path
) -> None:
    """Version 1's signed manifest served as version 2 is refused, even past the repository."""
    v1 = publish(repo, tmp_path, "1", key)
    publish(repo, tmp_path, "2", key)
    root = tmp_path / "store" / "iris" / "versions"
    for name in (MANIFEST_NAME, SIGNATURE_NAME):
        shutil.copy(root / "1" / name, root / "2" / name)
    swapped = Resolved("iris", "2", v1.manifest, v1.manifest_raw)
    with pytest.raises(UntrustedArtifact, match="describes iris:1"):
        check_trust(repo, swapped, settings(key, require_signature=True))


def test_unrestricted_format_needs_operator_opt_in(repo: Repository, tmp_path: Path, key: Path) -> None:
    """A signed .h5 version is refused unless the model is in unrestricted_models."""
    resolved = publish(repo, tmp_path, "1", key, filename="model.h5", fmt="keras")
    with pytest.raises(UntrustedArtifact, match="SERVING_UNRESTRICTED_MODELS"):
        check_trust(repo, resolved, settings(key))


def test_unrestricted_format_needs_a_signature_even_with_opt_in(
    repo: Repository, tmp_path: Path, key: Path
) -> None:
    """Opting a model in does not admit an unsigned .h5 version."""
    resolved = publish(repo, tmp_path, "1", None, filename="model.h5", fmt="keras")
    with pytest.raises(UntrustedArtifact, match="not signed"):
        check_trust(repo, resolved, settings(key, unrestricted_models=["iris"]))


def test_signed_and_opted_in_unrestricted_format_is_allowed(
    repo: Repository, tmp_path: Path, key: Path
) -> None:
    """Signature plus opt-in yields a policy that allows the unrestricted loader."""
    resolved = publish(repo, tmp_path, "1", key, filename="model.h5", fmt="keras")
    trust = check_trust(repo, resolved, settings(key, unrestricted_models=["iris"]))
    assert trust.load_class == "unrestricted"
    assert trust.policy.allow_unrestricted
    assert not trust.policy.allow_legacy_h5, "without SERVING_ALLOW_LEGACY_H5, .h5 stays refused"


def test_allow_legacy_h5_setting_takes_effect_for_a_signed_opted_in_model(
    repo: Repository, tmp_path: Path, key: Path
) -> None:
    """SERVING_ALLOW_LEGACY_H5 is honoured on top of signature and opt-in, and alone admits nothing."""
    resolved = publish(repo, tmp_path, "1", key, filename="model.h5", fmt="keras")
    trust = check_trust(repo, resolved, settings(key, unrestricted_models=["iris"], allow_legacy_h5=True))
    assert trust.policy.allow_legacy_h5
    unsigned = publish(repo, tmp_path, "2", None, filename="model.h5", fmt="keras")
    with pytest.raises(UntrustedArtifact, match="not signed"):
        check_trust(repo, unsigned, settings(key, unrestricted_models=["iris"], allow_legacy_h5=True))


def test_unknown_format_is_unrestricted(repo: Repository, tmp_path: Path) -> None:
    """A format nobody classified is treated as able to run code."""
    resolved = publish(repo, tmp_path, "1", None, fmt="mystery")
    assert load_class(resolved.manifest) == "unrestricted"


def test_remembered_signature_is_kept_per_node(repo: Repository, tmp_path: Path, key: Path) -> None:
    """A verified signature is remembered under the cache root (0600) for offline restarts."""
    resolved = publish(repo, tmp_path, "1", key)
    cache = tmp_path / "cache"
    check_trust(repo, resolved, settings(key, require_signature=True), cache_root=cache)
    remembered = list((cache / "signatures" / "iris").iterdir())
    assert len(remembered) == 1
    assert remembered[0].stat().st_mode & 0o777 == 0o600


def test_the_loaders_own_guard_and_the_trust_classes_agree() -> None:
    """Every registered format has one row of facts; those that run code on load are
    'unrestricted' to check_trust, and no other."""
    from serving.formats import FORMATS
    from serving.formats.table import FORMAT_FACTS

    assert set(FORMATS) == set(FORMAT_FACTS)
    runs_code = {name for name, fmt in FORMATS.items() if fmt.runs_code}
    unrestricted = {name for name, facts in FORMAT_FACTS.items() if facts.load_class == "unrestricted"}
    assert runs_code == unrestricted
