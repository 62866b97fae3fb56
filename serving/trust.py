"""Whether a resolved version may be loaded, decided before any byte is deserialized.

:func:`check_trust` is the one gate. The serving layer and ``serving.load``
call it after resolving a reference and before fetching or loading::

    resolved, _ = cache.resolve(repo, "iris@production")
    trust = check_trust(repo, resolved, settings, cache_root=cache.root)
    cached = cache.fetch(repo, resolved)           # every file checked against the manifest
    predictor = fmt.load(cached.path, cached.manifest, trust.policy)

It checks, on the manifest alone (which lists every file's sha256):

1. the signature, when ``require_signature`` is on (unsigned, untrusted,
   altered or swapped-in manifests are refused);
2. the OpenSSF model signature (``oms.sig``, :mod:`serving.oms`), when
   ``require_oms_signature`` is on or OMS signers are configured: a trusted
   signer, over exactly the manifest's files and SHA-256s;
3. the format's load class (SECURITY.md, "Load policy"):

   ``safe``          cannot carry code when loaded as we load it: ONNX with
                     confined external data, safetensors, skops with trusted
                     types, torch ``weights_only``, Keras ``.keras`` safe mode;
   ``restricted``    pickle family (joblib, pickle, sklearn) through the
                     restricted unpickler's allowlist;
   ``unrestricted``  runs code by design (arbitrary pickle, Keras ``.h5``,
                     TensorFlow SavedModel): only for a signed version of a
                     model the operator listed in ``unrestricted_models``.

Every refusal raises :class:`serving.errors.UntrustedArtifact` and counts in
``serving_trust_checks_total{outcome="refused"}``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath

from serving import metrics
from serving.errors import InvalidManifest, NotFound, StoreError, UntrustedArtifact
from serving.fileio import atomic_write
from serving.formats.base import LoadPolicy
from serving.formats.table import FORMAT_FACTS, LoadClass
from serving.hardening import check_framework_versions, harden_process
from serving.manifest import OMS_SIGNATURE_NAME, SIGNATURE_NAME, Alias, Manifest
from serving.oms import OmsPolicy, verify_oms
from serving.repository import Repository, Resolved
from serving.settings import Settings
from serving.signing import load_trusted_keys, verify_alias, verify_manifest

__all__ = [
    "LoadClass",
    "Trust",
    "check_alias",
    "check_trust",
    "load_class",
    "oms_policy",
    "read_oms_signature",
    "read_signature",
    "write_oms_signature",
    "write_signature",
]

log = logging.getLogger(__name__)

_UNRESTRICTED_SUFFIXES = FORMAT_FACTS["keras-h5"].suffixes
_UNRESTRICTED_NAMES = ("saved_model.pb", "saved_model.pbtxt")


def load_class(manifest: Manifest) -> LoadClass:
    """The load class of a version, from its format and file names.

    A version whose files include a legacy Keras ``.h5`` or a SavedModel graph is
    unrestricted whatever its format name says.
    """
    for entry in manifest.files:
        p = PurePosixPath(entry.path)
        if p.suffix.lower() in _UNRESTRICTED_SUFFIXES or p.name in _UNRESTRICTED_NAMES:
            return "unrestricted"
    if manifest.options.get("unrestricted") is True:
        return "unrestricted"
    facts = FORMAT_FACTS.get(manifest.format)
    # NOTE: a format serving does not know is unrestricted: opt-in until someone classifies it.
    return facts.load_class if facts is not None else "unrestricted"


@dataclass(frozen=True)
class Trust:
    """What :func:`check_trust` decided: pass ``policy`` to the format loader."""

    name: str
    version: str
    signed: bool
    """A trusted key's signature over this exact manifest verified."""
    key_id: str | None
    load_class: LoadClass
    policy: LoadPolicy
    oms_signer: str | None = None
    """Who signed the version's OpenSSF model signature, when a trusted one verified."""


def _signature_key(repo: Repository, name: str, version: str, which: str = SIGNATURE_NAME) -> str:
    return repo.version_prefix(name, version) + which


def read_signature(repo: Repository, name: str, version: str, which: str = SIGNATURE_NAME) -> bytes | None:
    """The raw ``manifest.sig`` (or ``which``: ``oms.sig``) of a version, or None when there is none."""
    try:
        raw, _ = repo.store.get(_signature_key(repo, name, version, which))
    except NotFound:
        return None
    return raw


def read_oms_signature(repo: Repository, name: str, version: str) -> bytes | None:
    """The raw ``oms.sig`` of a version (an OpenSSF model signature), or None."""
    return read_signature(repo, name, version, OMS_SIGNATURE_NAME)


def write_signature(repo: Repository, name: str, version: str, sig_raw: bytes) -> None:
    """Store a version's ``manifest.sig`` (signing an existing version adds no files)."""
    repo.store.put(_signature_key(repo, name, version), sig_raw)


def write_oms_signature(repo: Repository, name: str, version: str, bundle: bytes) -> None:
    """Store a version's ``oms.sig`` (replacing any: an OMS signature is checked, never trusted as stored)."""
    repo.store.put(_signature_key(repo, name, version, OMS_SIGNATURE_NAME), bundle)


def oms_policy(settings: Settings) -> OmsPolicy:
    """The OMS signers ``settings`` trust."""
    return OmsPolicy(
        public_keys=tuple(settings.oms_public_keys),
        certificate_chains=tuple(settings.oms_certificate_chains),
        sigstore_identity=settings.oms_sigstore_identity,
        sigstore_issuer=settings.oms_sigstore_issuer,
        sigstore_trust_config=settings.oms_sigstore_trust_config,
    )


def _remembered_path(cache_root: Path, resolved: Resolved, which: str = SIGNATURE_NAME) -> Path:
    msha = resolved.manifest_sha256[:16]
    suffix = ".sig" if which == SIGNATURE_NAME else ".oms.sig"
    return cache_root / "signatures" / resolved.name / f"{resolved.version}-{msha}{suffix}"


def _remember(cache_root: Path, resolved: Resolved, sig_raw: bytes, which: str = SIGNATURE_NAME) -> None:
    path = _remembered_path(cache_root, resolved, which)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, sig_raw)


def _signature_for(
    repo: Repository, resolved: Resolved, cache_root: Path | None, which: str = SIGNATURE_NAME
) -> bytes | None:
    try:
        sig = read_signature(repo, resolved.name, resolved.version, which)
    except StoreError:
        # NOTE: offline fallback. The remembered copy is re-verified like any other,
        # so a local edit cannot make an unsigned version look signed.
        if cache_root is None:
            raise
        try:
            return _remembered_path(cache_root, resolved, which).read_bytes()
        except FileNotFoundError:
            raise UntrustedArtifact(
                f"{resolved.name}:{resolved.version}: the store is unreachable and no "
                f"verified {which} is remembered on this node"
            ) from None
    if sig is not None and cache_root is not None:
        _remember(cache_root, resolved, sig, which)
    return sig


def _refuse(name: str, message: str) -> UntrustedArtifact:
    metrics.TRUST_CHECKS.inc(model=name, outcome="refused")
    log.warning("refused %s", message)
    return UntrustedArtifact(message)


def _accepted_path(cache_root: Path, name: str, alias: str) -> Path:
    return cache_root / "aliases" / name / f"{alias}.accepted.json"


def _last_accepted(cache_root: Path, name: str, alias: str) -> tuple[int, str, str] | None:
    try:
        body = json.loads(_accepted_path(cache_root, name, alias).read_text())
        return int(body["sequence"]), str(body["version"]), str(body["manifest_sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remember_accepted(cache_root: Path, target: Alias) -> None:
    path = _accepted_path(cache_root, target.name, target.alias)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    body = {"sequence": target.seq, "version": target.version, "manifest_sha256": target.manifest_sha256}
    atomic_write(path, json.dumps(body))


def check_alias(
    resolved: Resolved,
    settings: Settings,
    *,
    cache_root: Path | None = None,
    clock: Callable[[], float] = time.time,
) -> None:
    """Refuse a signed-alias rollback or freeze, when ``require_signature`` is on.

    The alias object must be signed by a trusted key, not expired, and its
    ``sequence`` must not go below the last one this node accepted (remembered
    under ``cache_root``, so a restart cannot be rolled back either); the same
    sequence is accepted only for the same target. An alias resolved from the
    cache's memory because the store is down is checked for its signature and
    expiry, on the newest object this node saw for that target: an expired one is
    refused offline too, and one remembered without its object is refused. (The last good version a
    replica falls back to when a new target fails carries no alias object: it
    passed these checks when it was the target.)

    Raises:
        UntrustedArtifact: counted as a refused trust check; the live version keeps serving.
    """
    if not settings.require_signature or resolved.alias is None:
        return
    name, alias = resolved.name, resolved.alias
    where = f"{name}@{alias}"
    if resolved.alias_raw is None:
        if resolved.offline:
            raise _refuse(
                name,
                f"{where}: the store is unreachable and this node remembers no signed alias object "
                "to check; not serving an unverified target",
            )
        return
    try:
        verify_alias(resolved.alias_raw, load_trusted_keys(settings.trusted_keys), name, alias)
    except UntrustedArtifact as exc:
        raise _refuse(name, exc.message) from exc
    target = Alias.from_json(resolved.alias_raw)
    if target.expires_at is not None:
        try:
            expires = datetime.fromisoformat(target.expires_at).timestamp()
        except ValueError:
            raise _refuse(
                name, f"{where}: expires_at {target.expires_at!r} is not an ISO 8601 time"
            ) from None
        if clock() >= expires:
            raise _refuse(
                name,
                f"{where}: the signed alias expired at {target.expires_at}; the publisher must re-sign it "
                "(a store that stops updating must not freeze replicas on an old target)",
            )
    if cache_root is None or resolved.offline:
        # NOTE: offline the object comes from this node's own memory, not the store: there is
        # nothing to replay, and the sequence it accepted since (a canary step) may be newer.
        return
    last = _last_accepted(cache_root, name, alias)
    if last is not None:
        seq, version, msha = last
        if target.seq < seq:
            raise _refuse(
                name,
                f"{where}: alias sequence {target.seq} (-> {target.version}) is older than {seq} "
                f"(-> {version}), already accepted here; refusing a replayed alias",
            )
        if target.seq == seq and (target.version, target.manifest_sha256) != (version, msha):
            raise _refuse(name, f"{where}: alias sequence {seq} already accepted here for another target")
    _remember_accepted(cache_root, target)


def check_trust(
    repo: Repository,
    resolved: Resolved,
    settings: Settings,
    *,
    cache_root: Path | None = None,
) -> Trust:
    """Decide whether ``resolved`` may be loaded, before any artifact byte is read.

    Args:
        repo: where the version's ``manifest.sig`` is read from.
        resolved: the version, with its manifest's exact bytes.
        settings: ``require_signature``, ``trusted_keys``, ``unrestricted_models``,
            ``trusted_globals``, ``require_oms_signature`` and the ``oms_*`` signers.
        cache_root: the loader cache's root; verified signatures are remembered
            there so a node can restart while the store is unreachable.

    Returns:
        The decision, with the :class:`LoadPolicy` to hand to the format loader.

    Raises:
        UntrustedArtifact: unsigned or wrongly signed with ``require_signature`` (or
            without a trusted OMS signature with ``require_oms_signature``),
            or an unrestricted format without a signature and the operator's opt-in.
        LoadError: the format's framework is older than the safe minimum.

    It also sets ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` in this process
    (:func:`serving.hardening.harden_process`).
    """
    harden_process()
    check_alias(resolved, settings, cache_root=cache_root)
    name, version, manifest = resolved.name, resolved.version, resolved.manifest
    where = f"{name}:{version}"
    if manifest.name != name or manifest.version != version:
        raise _refuse(name, f"{where}: the manifest describes {manifest.name}:{manifest.version}")
    cls = load_class(manifest)
    wants_signature = settings.require_signature or cls == "unrestricted"
    signed, kid = False, None
    if wants_signature or settings.trusted_keys:
        trusted = load_trusted_keys(settings.trusted_keys)
        sig = _signature_for(repo, resolved, cache_root)
        try:
            kid = verify_manifest(resolved.manifest_raw, sig, trusted, name, version)
            signed = True
        except UntrustedArtifact as exc:
            if settings.require_signature:
                raise _refuse(name, exc.message) from exc
            if sig is not None:
                log.warning("%s: signature present but not trusted, treating as unsigned: %s", where, exc)
    oms_signer = _check_oms(repo, resolved, settings, cache_root)
    if cls == "unrestricted":
        if name not in settings.unrestricted_models:
            raise _refuse(
                name,
                f"{where}: format {manifest.format!r} runs code when loaded; allow it only for "
                f"signed versions by adding {name!r} to SERVING_UNRESTRICTED_MODELS",
            )
        if not signed:
            raise _refuse(
                name,
                f"{where}: format {manifest.format!r} runs code when loaded and the version is not "
                "signed by a trusted key; unrestricted formats need both a signature and an opt-in",
            )
    check_framework_versions(manifest.format)
    unrestricted = cls == "unrestricted"
    policy = LoadPolicy(
        trusted_globals=frozenset(settings.trusted_globals),
        # NOTE: .h5 needs the operator's SERVING_ALLOW_LEGACY_H5 on top of the
        # signature and SERVING_UNRESTRICTED_MODELS that every unrestricted format needs.
        allow_legacy_h5=unrestricted and settings.allow_legacy_h5,
        signed=signed,
        allow_unrestricted=unrestricted,
        max_artifact_bytes=settings.max_artifact_bytes,
        max_expansion_ratio=settings.max_expansion_ratio,
    )
    metrics.TRUST_CHECKS.inc(model=name, outcome="signed" if signed or oms_signer else "unsigned")
    return Trust(name, version, signed, kid, cls, policy, oms_signer)


def _check_oms(
    repo: Repository, resolved: Resolved, settings: Settings, cache_root: Path | None
) -> str | None:
    """Who signed the version's OMS signature, None when it has none the policy asks for; or refuse.

    NOTE: an OMS signature covers the files, not the manifest's format, options or schema, so it
    never stands in for this project's own signature (unrestricted formats still need that).
    """
    policy = oms_policy(settings)
    if not settings.require_oms_signature and not policy.configured:
        return None
    name, where = resolved.name, f"{resolved.name}:{resolved.version}"
    try:
        bundle = _signature_for(repo, resolved, cache_root, OMS_SIGNATURE_NAME)
    except (InvalidManifest, StoreError, UntrustedArtifact) as exc:
        # NOTE: over the metadata limit (refused unread), or the store down with none remembered
        if settings.require_oms_signature:
            raise _refuse(name, f"{where}: {exc.message}") from exc
        log.warning("%s: unreadable OMS signature, treating as unsigned: %s", where, exc)
        return None
    if bundle is None:
        if settings.require_oms_signature:
            raise _refuse(name, f"{where} has no OpenSSF model signature (oms.sig) and one is required")
        return None
    try:
        return verify_oms(bundle, policy, resolved.manifest)
    except UntrustedArtifact as exc:
        if settings.require_oms_signature:
            raise _refuse(name, exc.message) from exc
        log.warning("%s: OMS signature present but not trusted, treating as unsigned: %s", where, exc)
        return None
