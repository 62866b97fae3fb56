"""Ed25519 signatures over a version's manifest.

A manifest lists every artifact file with its size and sha256, so a signature
over the manifest's exact bytes covers every byte of the version. The cache
refuses any file whose digest differs from the manifest, so once the
manifest's signature checks out, nothing unsigned can reach a deserializer.

Files (all plain, documented in SECURITY.md)::

    PREFIX.key   PKCS#8 PEM Ed25519 private key, mode 0600 (keep it in CI secrets)
    PREFIX.pub   SubjectPublicKeyInfo PEM public key (safe to publish)
    <root>/<model>/versions/<version>/manifest.sig   JSON, next to manifest.json

``manifest.sig``::

    {
      "format": "serving.signature/v1",
      "name": "iris", "version": "3",
      "manifest_sha256": "<sha256 of manifest.json's exact bytes>",
      "signatures": [
        {"alg": "ed25519", "key_id": "<sha256 of the raw 32-byte public key>",
         "signature": "<base64 Ed25519 signature>"}
      ]
    }

Aliases can be signed too (rollback and freeze protection, SECURITY.md): the
alias object carries ``signatures``, each over
``b"serving.alias-signature/v1\\n"`` + the canonical JSON (sorted keys, no
spaces) of every other field, so ``name``, ``alias``, ``version``,
``manifest_sha256``, ``sequence`` and ``expires_at`` are all covered.

What each signature signs is ``b"serving.signature/v1\\n" + manifest.json bytes``
(the prefix keeps a signing key from being usable for anything else). ``name``,
``version`` and ``manifest_sha256`` are unsigned hints that make errors precise;
the binding comes from the signed manifest, which names its model and version.

Example:
    >>> key = generate_keypair(Path("release"))  # doctest: +SKIP
    >>> sig = sign_manifest(raw, load_signing_key(Path("release.key")))  # doctest: +SKIP
    >>> verify_manifest(raw, sig, load_trusted_keys([Path("release.pub")]), "iris", "3")  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from serving.errors import InvalidRequest, UntrustedArtifact
from serving.fileio import mounted_files
from serving.manifest import SIGNATURE_NAME, Alias, sha256_bytes

__all__ = [
    "ALIAS_SIGNATURE_FORMAT",
    "SIGNATURE_FORMAT",
    "SIGNATURE_NAME",
    "KeyPair",
    "SigningKey",
    "TrustedKeys",
    "alias_signer",
    "generate_keypair",
    "key_id",
    "load_signing_key",
    "load_trusted_keys",
    "sign_alias",
    "sign_manifest",
    "verify_alias",
    "verify_manifest",
]

SIGNATURE_FORMAT = "serving.signature/v1"
_DOMAIN = SIGNATURE_FORMAT.encode() + b"\n"
_MAX_SIG_FILE = 64 * 1024
ALIAS_SIGNATURE_FORMAT = "serving.alias-signature/v1"
_ALIAS_DOMAIN = ALIAS_SIGNATURE_FORMAT.encode() + b"\n"
_MAX_ALIAS_FILE = 1024 * 1024

TrustedKeys = dict[str, Ed25519PublicKey]
"""key id -> public key."""


def key_id(public: Ed25519PublicKey) -> str:
    """sha256 (hex) of the raw 32-byte public key: stable, short to compare, not secret."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey
    key_id: str

    def __repr__(self) -> str:  # NOTE: never print key material, even by accident
        return f"SigningKey(key_id={self.key_id[:16]}...)"


@dataclass(frozen=True)
class KeyPair:
    key_path: Path
    pub_path: Path
    key_id: str


def generate_keypair(prefix: Path | str) -> KeyPair:
    """Write ``PREFIX.key`` (0600) and ``PREFIX.pub``; refuses to overwrite either.

    Raises:
        InvalidRequest: one of the files already exists.
    """
    prefix = Path(prefix)
    key_path, pub_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    for p in (key_path, pub_path):
        if p.exists():
            raise InvalidRequest(f"{p} already exists; refusing to overwrite a key")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: O_EXCL with 0600 from the start: the key is never briefly world-readable.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(pub)
    return KeyPair(key_path, pub_path, key_id(private.public_key()))


def load_signing_key(path: Path | str) -> SigningKey:
    """Read a PEM Ed25519 private key written by :func:`generate_keypair`.

    Raises:
        InvalidRequest: missing, unreadable or not an unencrypted Ed25519 private key.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidRequest(f"cannot read signing key {path}: {exc.strerror}") from exc
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # NOTE: the library's message can quote key bytes; never pass it on.
        raise InvalidRequest(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(private, Ed25519PrivateKey):
        raise InvalidRequest(f"{path} is not an Ed25519 private key")
    return SigningKey(private, key_id(private.public_key()))


def _load_public_key(path: Path) -> Ed25519PublicKey:
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        raise InvalidRequest(f"trusted key {path} is a private key: give serving only the .pub file")
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"trusted key {path} is not a PEM public key") from exc
    if not isinstance(public, Ed25519PublicKey):
        raise InvalidRequest(f"trusted key {path} is not an Ed25519 public key")
    return public


def load_trusted_keys(paths: Iterable[Path | str]) -> TrustedKeys:
    """Public keys from files and directories (a mounted Kubernetes Secret works).

    In a directory, every non-hidden entry is read as a PEM public key; a
    Secret's ``..data`` links are hidden and skipped, the per-key links followed.

    Raises:
        InvalidRequest: a path is missing or holds something other than a public key.
    """
    keys: TrustedKeys = {}
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_dir() and not path.is_file():
            raise InvalidRequest(f"trusted key path {path} does not exist")
        for entry in mounted_files(path):
            public = _load_public_key(entry)
            keys[key_id(public)] = public
    return keys


def _parse(sig_raw: bytes, where: str) -> dict[str, Any]:
    if len(sig_raw) > _MAX_SIG_FILE:
        raise UntrustedArtifact(f"{where}: {SIGNATURE_NAME} is larger than {_MAX_SIG_FILE} bytes")
    try:
        doc = json.loads(sig_raw)
    except ValueError as exc:
        raise UntrustedArtifact(f"{where}: {SIGNATURE_NAME} is not valid JSON") from exc
    if not isinstance(doc, dict) or doc.get("format") != SIGNATURE_FORMAT:
        raise UntrustedArtifact(f"{where}: {SIGNATURE_NAME} is not a {SIGNATURE_FORMAT} document")
    if not isinstance(doc.get("signatures"), list):
        raise UntrustedArtifact(f"{where}: {SIGNATURE_NAME} has no signatures list")
    return doc


def sign_manifest(manifest_raw: bytes, key: SigningKey, existing: bytes | None = None) -> bytes:
    """The ``manifest.sig`` bytes for ``manifest_raw``, adding to ``existing`` signatures.

    Adding lets a version carry signatures from an old and a new key during rotation.
    """
    from serving.manifest import Manifest

    manifest = Manifest.from_json(manifest_raw)
    msha = sha256_bytes(manifest_raw)
    signatures: list[dict[str, str]] = []
    if existing is not None:
        doc = _parse(existing, f"{manifest.name}:{manifest.version}")
        if doc.get("manifest_sha256") != msha:
            raise UntrustedArtifact(
                f"{manifest.name}:{manifest.version}: the existing {SIGNATURE_NAME} is for another manifest"
            )
        signatures = [s for s in doc["signatures"] if isinstance(s, dict) and s.get("key_id") != key.key_id]
    sig = key.private.sign(_DOMAIN + manifest_raw)
    signatures.append(
        {"alg": "ed25519", "key_id": key.key_id, "signature": base64.b64encode(sig).decode("ascii")}
    )
    doc_out = {
        "format": SIGNATURE_FORMAT,
        "name": manifest.name,
        "version": manifest.version,
        "manifest_sha256": msha,
        "signatures": signatures,
    }
    return json.dumps(doc_out, indent=2).encode() + b"\n"


def verify_manifest(
    manifest_raw: bytes, sig_raw: bytes | None, trusted: TrustedKeys, name: str, version: str
) -> str:
    """Check that a trusted key signed exactly these manifest bytes, for ``name:version``.

    Returns:
        The id of the trusted key whose signature verified.

    Raises:
        UntrustedArtifact: no signature, a signature for another manifest or
            version, no signature by a trusted key, or one that does not verify.
    """
    from serving.manifest import Manifest

    where = f"{name}:{version}"
    if sig_raw is None:
        raise UntrustedArtifact(f"{where} is not signed (no {SIGNATURE_NAME}) and signatures are required")
    if not trusted:
        raise UntrustedArtifact(f"{where}: signatures are required but no trusted public keys are configured")
    doc = _parse(sig_raw, where)
    manifest = Manifest.from_json(manifest_raw)
    # NOTE: the signed bytes name the model and version; a manifest copied (with its
    # valid signature) from another version or model is refused here.
    if manifest.name != name or manifest.version != version:
        raise UntrustedArtifact(
            f"{where}: the manifest describes {manifest.name}:{manifest.version}; refusing a swapped manifest"
        )
    msha = sha256_bytes(manifest_raw)
    if doc.get("manifest_sha256") != msha or doc.get("name") != name or doc.get("version") != version:
        other = f"{doc.get('name')}:{doc.get('version')}"
        raise UntrustedArtifact(
            f"{where}: {SIGNATURE_NAME} was made for another manifest ({other}, "
            f"sha256 {str(doc.get('manifest_sha256'))[:12]}...), not this one ({msha[:12]}...)"
        )
    kid, verified, seen = _trusted_signature(doc["signatures"], trusted, _DOMAIN + manifest_raw)
    if kid is None:
        raise UntrustedArtifact(
            f"{where} is signed only by untrusted keys ({', '.join(seen) or 'none'}); "
            f"trusted: {', '.join(k[:16] for k in sorted(trusted))}"
        )
    if not verified:
        raise UntrustedArtifact(
            f"{where}: the signature by trusted key {kid[:16]}... does not verify "
            "(manifest or signature altered)"
        )
    return kid


def _trusted_signature(
    entries: list[Any], trusted: TrustedKeys, payload: bytes
) -> tuple[str | None, bool, list[str]]:
    """The first Ed25519 entry by a trusted key, shared by manifest and alias checks.

    Returns ``(key_id, verified, seen)``: ``key_id`` is None when no entry is by
    a trusted key; ``verified`` says whether that key's signature holds over
    ``payload``; ``seen`` lists the (shortened) key ids of the entries looked at.
    """
    seen: list[str] = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("alg") != "ed25519":
            continue
        kid = str(entry.get("key_id", ""))
        seen.append(kid[:16])
        public = trusted.get(kid)
        if public is None:
            continue
        try:
            public.verify(base64.b64decode(str(entry.get("signature", "")), validate=True), payload)
        except (InvalidSignature, binascii.Error, ValueError):
            return kid, False, seen
        return kid, True, seen
    return None, False, seen


def _alias_payload(doc: dict[str, Any]) -> bytes:
    body = {k: v for k, v in doc.items() if k != "signatures"}
    return _ALIAS_DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_alias(alias: Alias, key: SigningKey) -> bytes:
    """The alias object's bytes, signed by ``key`` (replacing any signatures it had)."""
    doc: dict[str, Any] = json.loads(alias.model_copy(update={"signatures": None}).to_json())
    sig = key.private.sign(_alias_payload(doc))
    doc["signatures"] = [
        {"alg": "ed25519", "key_id": key.key_id, "signature": base64.b64encode(sig).decode("ascii")}
    ]
    return json.dumps(doc, indent=2).encode()


def alias_signer(key: SigningKey) -> Callable[[Alias], bytes]:
    """A ``writer`` for :meth:`serving.repository.Repository.move_alias` that signs each move."""
    return lambda alias: sign_alias(alias, key)


def verify_alias(raw: bytes, trusted: TrustedKeys, name: str, alias: str) -> str:
    """Check that a trusted key signed exactly this alias object, for ``name@alias``.

    Returns:
        The id of the trusted key whose signature verified.

    Raises:
        UntrustedArtifact: unsigned, signed by no trusted key, for another alias, or altered.
    """
    where = f"{name}@{alias}"
    if not trusted:
        raise UntrustedArtifact(f"{where}: signatures are required but no trusted public keys are configured")
    if len(raw) > _MAX_ALIAS_FILE:
        raise UntrustedArtifact(f"{where}: the alias object is larger than {_MAX_ALIAS_FILE} bytes")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise UntrustedArtifact(f"{where}: the alias object is not valid JSON") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("signatures"), list) or not doc["signatures"]:
        raise UntrustedArtifact(f"{where}: the alias is not signed and signatures are required")
    if doc.get("name") != name or doc.get("alias") != alias:
        raise UntrustedArtifact(f"{where}: the alias object is for {doc.get('name')}@{doc.get('alias')}")
    kid, verified, seen = _trusted_signature(doc["signatures"], trusted, _alias_payload(doc))
    if kid is None:
        raise UntrustedArtifact(f"{where} is signed only by untrusted keys ({', '.join(seen) or 'none'})")
    if not verified:
        raise UntrustedArtifact(
            f"{where}: the alias signature by trusted key {kid[:16]}... does not verify (alias altered)"
        )
    return kid
