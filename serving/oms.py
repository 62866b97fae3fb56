"""OpenSSF model signing (OMS): signatures over every file of a model, verified before any byte loads.

An OMS signature (the ``model-signing`` library and CLI) is a Sigstore bundle: a DSSE envelope over
an in-toto statement that lists each file of the model directory with its SHA-256. A version can
carry one beside its manifest (``NAME/versions/V/oms.sig``). :func:`verify_oms` checks it on the
manifest alone, as :func:`serving.trust.check_trust` checks this project's own signature:

1. the envelope is signed by something the trust policy names (:class:`OmsPolicy`): an EC public
   key, a certificate that chains to a configured CA, or a Sigstore identity checked against a
   mounted trust root (no network);
2. the statement lists exactly the manifest's files with exactly their SHA-256.

The loader cache then checks every downloaded byte against the manifest, so what a deserializer
reads is what the OMS signer signed. The library does the DSSE and in-toto work; this module only
reads the verified statement. It uses the library's signature and verifier classes directly
(``model_signing._signing``): the public ``verifying.Config.verify`` re-hashes a directory, and
here nothing has been downloaded yet. The ``oms`` extra pins the minor version for that reason.

:func:`sign_directory` produces a signature the ``model-signing`` CLI verifies
(``model_signing verify key DIR --signature oms.sig --public_key key.pub``).
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from serving.errors import InvalidRequest, UntrustedArtifact
from serving.fileio import mounted_files
from serving.manifest import Manifest

__all__ = ["OMS_MAX_BYTES", "OmsPolicy", "generate_ec_keypair", "sign_directory", "verify_oms"]

log = logging.getLogger(__name__)

OMS_MAX_BYTES = 4 * 1024**2
"""The largest OMS bundle read: one statement line per file, so a few MiB is many thousand files."""


def _library() -> Any:
    try:
        import model_signing.hashing
        import model_signing.signing
        from model_signing._signing import sign_ec_key
    except ImportError as exc:
        raise UntrustedArtifact(
            "OpenSSF model signatures need the model-signing library: pip install 'serving[oms]'"
        ) from exc
    # NOTE: the library print()s a warning (an older bundle format) onto stdout, which would break
    # --json output; its module's print becomes a log line instead (process-wide, thread-safe).
    sign_ec_key.print = _library_says  # type: ignore[attr-defined]
    return model_signing


def _library_says(*args: object, **_: object) -> None:
    log.warning("model-signing: %s", " ".join(" ".join(str(a) for a in args).split()))


def _pem_files(paths: Iterable[Path]) -> list[Path]:
    """Files as given; a directory (a mounted Secret) gives its regular files, sorted."""
    return [file for path in paths for file in mounted_files(path)]


@dataclass(frozen=True)
class OmsPolicy:
    """Who may sign: any one of these is enough."""

    public_keys: tuple[Path, ...] = ()
    """EC public keys (PEM; files, or directories of them)."""
    certificate_chains: tuple[Path, ...] = ()
    """CA certificates (PEM; files, or directories of them): the signing certificate must chain to one."""
    sigstore_identity: str | None = None
    """The Sigstore certificate identity (an email or a workload URI) ..."""
    sigstore_issuer: str | None = None
    """... and the OIDC issuer that vouched for it."""
    sigstore_trust_config: Path | None = None
    """The Sigstore trust root (a ``ClientTrustConfig`` JSON), mounted: nothing is fetched at load."""

    @property
    def configured(self) -> bool:
        return bool(self.public_keys or self.certificate_chains or self.sigstore_identity)

    def _verifiers(self) -> Iterator[tuple[str, bool, Callable[[], Any]]]:
        """(label, whether it reads a Sigstore bundle, a function that builds its verifier) per signer.

        NOTE: built lazily, inside the caller's handling: a key file that is not an EC public key
        (an Ed25519 key in the same Secret, a private key, a missing file) is that signer's failure.
        """
        from model_signing._signing import sign_certificate, sign_ec_key

        for key in _pem_files(self.public_keys):
            yield f"key {key.name}", False, functools.partial(sign_ec_key.Verifier, key)
        chains = _pem_files(self.certificate_chains)
        if chains:
            yield "certificate chain", False, functools.partial(sign_certificate.Verifier, chains)
        if self.sigstore_identity:
            if not self.sigstore_issuer or self.sigstore_trust_config is None:
                raise UntrustedArtifact(
                    "a Sigstore identity needs its OIDC issuer and a mounted trust root "
                    "(SERVING_OMS_SIGSTORE_ISSUER, SERVING_OMS_SIGSTORE_TRUST_CONFIG): "
                    "nothing is fetched from the network at load"
                )
            from model_signing._signing import sign_sigstore

            yield (
                f"Sigstore identity {self.sigstore_identity}",
                True,
                functools.partial(
                    sign_sigstore.Verifier,
                    identity=self.sigstore_identity,
                    oidc_issuer=self.sigstore_issuer,
                    trust_config=self.sigstore_trust_config,
                ),
            )


def _statement(bundle: bytes, policy: OmsPolicy, where: str) -> tuple[str, Any, dict[str, Any]]:
    """The signer's label, the verified statement (a model_signing Manifest) and its raw payload.

    NOTE: the raw payload is read again (after the library verified it) because the library's
    Manifest keeps one entry per name: duplicates and odd spellings are only visible there.
    """
    _library()
    from model_signing._signing import sign_sigstore_pb

    if len(bundle) > OMS_MAX_BYTES:
        raise UntrustedArtifact(f"{where}: the OMS signature is {len(bundle)} bytes, over {OMS_MAX_BYTES}")
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="serving-oms-") as scratch:
        path = Path(scratch) / "oms.sig"
        path.write_bytes(bundle)  # NOTE: the library reads signatures from files only
        for label, sigstore, build in policy._verifiers():
            try:
                verifier = build()
                if sigstore:
                    from model_signing._signing import sign_sigstore

                    signature: Any = sign_sigstore.Signature.read(path)
                else:
                    signature = sign_sigstore_pb.Signature.read(path)
                statement = verifier.verify(signature)
                _, payload = verifier._verify_signed_content(signature)
                raw = json.loads(payload)
                if not isinstance(raw, dict):
                    raise ValueError("the statement is not an object")
                return label, statement, raw
            except Exception as exc:  # noqa: BLE001 -- NOTE: every verifier's refusal is a reason, not a crash
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                failures.append(f"{label}: {reason[:200]}")
    if not failures:
        raise UntrustedArtifact(f"{where}: an OMS signature is present but no OMS signer is trusted here")
    raise UntrustedArtifact(
        f"{where}: the OMS signature verifies with no trusted signer ({'; '.join(failures)})"
    )


def verify_oms(bundle: bytes, policy: OmsPolicy, manifest: Manifest) -> str:
    """Check an OMS signature against the trust policy and the manifest; who signed it.

    Raises:
        UntrustedArtifact: no trusted signer verifies the envelope, or the signed statement does
            not list exactly the manifest's files with their SHA-256 (the reason names the file).
    """
    where = f"{manifest.name}:{manifest.version}"
    label, statement, raw = _statement(bundle, policy, where)
    method = statement.serialization_type.get("method")
    hash_type = statement.serialization_type.get("hash_type")
    if method != "files" or hash_type != "sha256":
        raise UntrustedArtifact(
            f"{where}: the OMS signature hashes with {method}/{hash_type}; serving checks bytes by "
            "per-file SHA-256: sign with the default file serialization and sha256"
        )
    signed = _resources(raw, where, label)
    files = {entry.path: entry.sha256 for entry in manifest.files}
    for path, sha in sorted(files.items()):
        if path not in signed:
            raise UntrustedArtifact(f"{where}: {path} is not covered by the OMS signature ({label})")
        if signed[path] != sha:
            raise UntrustedArtifact(
                f"{where}: {path} has sha256 {sha[:16]}... but the OMS signature ({label}) signs "
                f"{signed[path][:16]}..."
            )
    extra = sorted(set(signed) - set(files))
    if extra:
        raise UntrustedArtifact(
            f"{where}: the OMS signature ({label}) signs files this version does not have: "
            + ", ".join(extra[:5])
        )
    return label


def _resources(raw: dict[str, Any], where: str, label: str) -> dict[str, str]:
    """Each signed file's name and SHA-256, from the verified statement; every name once, spelled plainly."""
    predicate = raw.get("predicate")
    resources = predicate.get("resources") if isinstance(predicate, dict) else None
    if not isinstance(resources, list):
        raise UntrustedArtifact(f"{where}: the OMS statement ({label}) lists no resources")
    signed: dict[str, str] = {}
    for resource in resources:
        name = resource.get("name") if isinstance(resource, dict) else None
        if (
            not isinstance(name, str)
            or str(PurePosixPath(name)) != name
            or name.startswith("/")
            or (".." in PurePosixPath(name).parts)
        ):
            raise UntrustedArtifact(f"{where}: the OMS statement ({label}) names a file {name!r} not plainly")
        if name in signed:
            raise UntrustedArtifact(f"{where}: the OMS statement ({label}) lists {name} twice")
        if resource.get("algorithm") != "sha256" or not isinstance(resource.get("digest"), str):
            raise UntrustedArtifact(
                f"{where}: the OMS statement ({label}) hashes {name} with other than sha256"
            )
        signed[name] = resource["digest"].lower()
    return signed


def sign_directory(
    path: Path,
    private_key: Path,
    *,
    certificate: Path | None = None,
    certificate_chain: Iterable[Path] = (),
    ignore: Iterable[str] = (),
) -> bytes:
    """An OMS signature (a Sigstore bundle's JSON) over every file under ``path``, or over the file ``path``.

    Every file but ``ignore`` (paths relative to ``path``, recorded in the statement so that
    verifiers skip them too) is signed, git files included, hashed per file with SHA-256: the form
    :func:`verify_oms` checks against a manifest.

    Raises:
        InvalidRequest: the key or certificate cannot be read or is not supported.
    """
    model_signing = _library()
    _check_ec_private_key(private_key)
    if certificate is None and list(certificate_chain):
        raise InvalidRequest("--oms-certificate-chain goes with --oms-certificate")
    skipped = [Path(path) / p for p in ignore]
    hashing = model_signing.hashing.Config().use_file_serialization(hashing_algorithm="sha256")
    hashing.set_ignored_paths(paths=skipped, ignore_git_paths=False)
    config = model_signing.signing.Config().set_hashing_config(hashing)
    try:
        if certificate is not None:
            config.use_certificate_signer(
                private_key=private_key,
                signing_certificate=certificate,
                certificate_chain=list(certificate_chain),
            )
        else:
            config.use_elliptic_key_signer(private_key=private_key)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise InvalidRequest(f"cannot sign with {private_key}: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="serving-oms-") as scratch:
        out = Path(scratch) / "oms.sig"
        try:
            config.sign(path, out)
        except (ValueError, TypeError, AttributeError) as exc:
            raise InvalidRequest(f"cannot sign {path}: {exc}") from None
        return out.read_bytes()


def generate_ec_keypair(prefix: Path | str) -> tuple[Path, Path]:
    """Write an EC P-256 pair for OMS signatures: ``PREFIX.key`` (PKCS#8 PEM, 0600) and ``PREFIX.pub``.

    Raises:
        InvalidRequest: either file exists already (a key is never overwritten).
    """
    import os

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key_path, pub_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    for path in (key_path, pub_path):
        if path.exists():
            raise InvalidRequest(f"{path} exists; not overwriting a key")
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key_path, pub_path


def _check_ec_private_key(path: Path) -> None:
    """InvalidRequest unless ``path`` holds an unencrypted EC private key (what OMS key signing takes)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidRequest(
            f"--oms-key {path}: not a readable PEM private key ({type(exc).__name__})"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidRequest(
            f"--oms-key {path} is not an EC key (P-256/384/521): serving keygen PREFIX --oms writes one"
        )
