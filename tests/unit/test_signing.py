"""Ed25519 signatures over manifests: keys, signing, verification."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from serving.errors import InvalidRequest, UntrustedArtifact
from serving.manifest import FileEntry, Manifest
from serving.signing import (
    SIGNATURE_FORMAT,
    generate_keypair,
    load_signing_key,
    load_trusted_keys,
    sign_manifest,
    verify_manifest,
)


def manifest_raw(name: str = "iris", version: str = "1", sha: str = "a" * 64) -> bytes:
    entry = FileEntry(path="model.joblib", size=3, sha256=sha)
    return Manifest(name=name, version=version, format="sklearn", files=[entry]).to_json()


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    generate_keypair(tmp_path / "release")
    return tmp_path / "release"


def test_keygen_writes_private_key_0600_and_public_key(keys: Path) -> None:
    """keygen writes PREFIX.key readable by its owner only, and PREFIX.pub."""
    key, pub = Path(f"{keys}.key"), Path(f"{keys}.pub")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes()
    assert b"PUBLIC KEY" in pub.read_bytes()


def test_keygen_refuses_to_overwrite(keys: Path) -> None:
    """An existing key is never overwritten."""
    before = Path(f"{keys}.key").read_bytes()
    with pytest.raises(InvalidRequest, match="already exists"):
        generate_keypair(keys)
    assert Path(f"{keys}.key").read_bytes() == before


def test_signed_manifest_verifies_with_trusted_key(keys: Path) -> None:
    """A manifest signed by a trusted key verifies and names the key."""
    raw = manifest_raw()
    key = load_signing_key(f"{keys}.key")
    sig = sign_manifest(raw, key)
    assert json.loads(sig)["format"] == SIGNATURE_FORMAT
    assert verify_manifest(raw, sig, load_trusted_keys([f"{keys}.pub"]), "iris", "1") == key.key_id


def test_unsigned_manifest_is_refused(keys: Path) -> None:
    """No signature file means untrusted."""
    with pytest.raises(UntrustedArtifact, match="not signed"):
        verify_manifest(manifest_raw(), None, load_trusted_keys([f"{keys}.pub"]), "iris", "1")


def test_no_trusted_keys_configured_is_refused(keys: Path) -> None:
    """Requiring signatures without any trusted key refuses everything, clearly."""
    raw = manifest_raw()
    sig = sign_manifest(raw, load_signing_key(f"{keys}.key"))
    with pytest.raises(UntrustedArtifact, match="no trusted public keys"):
        verify_manifest(raw, sig, {}, "iris", "1")


def test_signature_by_untrusted_key_is_refused(keys: Path, tmp_path: Path) -> None:
    """A valid signature by a key that is not trusted does not count."""
    other = generate_keypair(tmp_path / "other")
    raw = manifest_raw()
    sig = sign_manifest(raw, load_signing_key(other.key_path))
    with pytest.raises(UntrustedArtifact, match="untrusted keys"):
        verify_manifest(raw, sig, load_trusted_keys([f"{keys}.pub"]), "iris", "1")


def test_altered_manifest_is_refused(keys: Path) -> None:
    """Changing one digest in the manifest breaks the signature."""
    raw = manifest_raw()
    sig = sign_manifest(raw, load_signing_key(f"{keys}.key"))
    tampered = manifest_raw(sha="b" * 64)
    with pytest.raises(UntrustedArtifact, match="another manifest"):
        verify_manifest(tampered, sig, load_trusted_keys([f"{keys}.pub"]), "iris", "1")


def test_altered_manifest_with_forged_hint_is_refused(keys: Path) -> None:
    """Even with the sig file's sha hint rewritten, the signature itself fails."""
    raw = manifest_raw()
    sig = json.loads(sign_manifest(raw, load_signing_key(f"{keys}.key")))
    tampered = manifest_raw(sha="b" * 64)
    from serving.manifest import sha256_bytes

    sig["manifest_sha256"] = sha256_bytes(tampered)
    with pytest.raises(UntrustedArtifact, match="does not verify"):
        verify_manifest(tampered, json.dumps(sig).encode(), load_trusted_keys([f"{keys}.pub"]), "iris", "1")


def test_manifest_signed_for_another_version_is_refused(keys: Path) -> None:
    """A valid manifest+signature pair copied from version 1 into version 2 is refused."""
    raw = manifest_raw(version="1")
    sig = sign_manifest(raw, load_signing_key(f"{keys}.key"))
    with pytest.raises(UntrustedArtifact, match="swapped manifest"):
        verify_manifest(raw, sig, load_trusted_keys([f"{keys}.pub"]), "iris", "2")


def test_trusted_keys_from_a_mounted_secret_directory(keys: Path, tmp_path: Path) -> None:
    """A directory laid out like a mounted Kubernetes Secret is read whole."""
    secret = tmp_path / "secret"
    data = secret / "..2026_01_01"
    data.mkdir(parents=True)
    (data / "release.pub").write_bytes(Path(f"{keys}.pub").read_bytes())
    (secret / "..data").symlink_to(data.name)
    (secret / "release.pub").symlink_to("..data/release.pub")
    trusted = load_trusted_keys([secret])
    assert list(trusted) == [load_signing_key(f"{keys}.key").key_id]


def test_private_key_given_as_trusted_key_is_refused(keys: Path) -> None:
    """Mounting the private key where public keys belong is an error, not a key."""
    with pytest.raises(InvalidRequest, match="private key"):
        load_trusted_keys([f"{keys}.key"])


def test_second_signature_is_added_for_key_rotation(keys: Path, tmp_path: Path) -> None:
    """Signing again with a new key keeps the old signature; either key verifies."""
    new = generate_keypair(tmp_path / "new")
    raw = manifest_raw()
    sig = sign_manifest(raw, load_signing_key(f"{keys}.key"))
    sig = sign_manifest(raw, load_signing_key(new.key_path), existing=sig)
    assert len(json.loads(sig)["signatures"]) == 2
    assert verify_manifest(raw, sig, load_trusted_keys([new.pub_path]), "iris", "1") == new.key_id


def test_errors_never_contain_key_material(keys: Path, tmp_path: Path) -> None:
    """A broken key file's error names the file, never its contents."""
    bad = tmp_path / "bad.key"
    secret = Path(f"{keys}.key").read_text().replace("A", "B")
    bad.write_text(secret)
    with pytest.raises(InvalidRequest) as info:
        load_signing_key(bad)
    body = secret.splitlines()[1]
    assert body not in str(info.value)
    assert "SigningKey(key_id=" in repr(load_signing_key(f"{keys}.key"))
