"""``serving pull`` and ``serving verify``: the node-local cache."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.cli.context import Context, human_bytes, plural
from serving.cli.options import Commands, add_ref
from serving.errors import IntegrityError
from serving.manifest import ModelRef

if TYPE_CHECKING:
    from serving.cache import CachedVersion

log = logging.getLogger(__name__)


def _cached_summary(cached: CachedVersion, offline: bool) -> dict[str, Any]:
    return {
        "name": cached.name,
        "version": cached.version,
        "path": str(cached.path),
        "manifest_sha256": cached.manifest_sha256,
        "files": len(cached.manifest.files),
        "total_bytes": cached.manifest.total_bytes,
        "hit": cached.hit,
        "offline": offline,
    }


def add_pull(commands: Commands) -> None:
    p = commands.add("pull", pull, "prefetch a version into the node-local cache")
    add_ref(p)


def pull(ctx: Context, args: argparse.Namespace) -> None:
    cached, offline = ctx.pull(args.ref)
    how = "already cached" if cached.hit else "downloaded"
    if offline:
        how += ", store unreachable: used the cache's last known target"
    ctx.emit(
        f"{cached.name}:{cached.version} -> {cached.path} "
        f"({how}, {human_bytes(cached.manifest.total_bytes)})",
        _cached_summary(cached, offline),
    )


def add_verify(commands: Commands) -> None:
    p = commands.add("verify", verify, "check a version's signature, then re-hash its cached files")
    add_ref(p)
    p.add_argument(
        "--repair",
        action="store_true",
        help="if cached bytes changed, evict the version and pull it again (verified) instead of failing",
    )
    p.add_argument(
        "--trusted-key",
        metavar="PUB",
        action="append",
        default=[],
        help="trusted Ed25519 public key file or directory (repeatable; default SERVING_TRUSTED_KEYS)",
    )
    p.add_argument(
        "--oms-public-key",
        metavar="PUB",
        action="append",
        default=[],
        help="check the OpenSSF model signature against this EC public key (repeatable; default: "
        "the SERVING_OMS_* signers)",
    )


def verify(ctx: Context, args: argparse.Namespace) -> None:
    key_id = None
    trusted_paths = args.trusted_key or ctx.settings.trusted_keys
    if trusted_paths or ctx.settings.require_signature:
        from serving.signing import load_trusted_keys, verify_manifest
        from serving.trust import read_signature

        # NOTE: the signature first, on the manifest alone, before any file is pulled.
        resolved, _ = ctx.cache.resolve(ctx.repo, ModelRef.parse(args.ref))
        sig = read_signature(ctx.repo, resolved.name, resolved.version)
        trusted = load_trusted_keys(trusted_paths)
        key_id = verify_manifest(resolved.manifest_raw, sig, trusted, resolved.name, resolved.version)
    oms_signer = _verify_oms(ctx, args)
    resolved, offline = ctx.cache.resolve(ctx.repo, ModelRef.parse(args.ref))
    repaired = False
    held = ctx.cache.get(resolved.name, resolved.version, resolved.manifest_sha256)
    if args.repair:
        repaired = ctx.cache.repair(ctx.repo, resolved, ctx.progress)
    elif held is not None:
        try:
            ctx.cache.verify(held)
        except IntegrityError as exc:
            raise IntegrityError(f"{exc}; run 'serving verify --repair {args.ref}' to pull it again") from exc
    cached = ctx.cache.fetch(ctx.repo, resolved, ctx.progress, prefetch=True)
    if repaired or held is None:
        ctx.cache.verify(cached)
    signed = f", signed by trusted key {key_id[:16]}" if key_id else ""
    signed += f", OpenSSF model signature by {oms_signer}" if oms_signer else ""
    fixed = " (repaired: the cached copy had changed and was pulled again)" if repaired else ""
    ctx.emit(
        f"{cached.name}:{cached.version} OK: {plural(len(cached.manifest.files), 'file')} "
        f"({human_bytes(cached.manifest.total_bytes)}) match the manifest{signed}{fixed}",
        {
            **_cached_summary(cached, offline),
            "ok": True,
            "signed_by": key_id,
            "oms_signed_by": oms_signer,
            "repaired": repaired,
        },
    )


def _verify_oms(ctx: Context, args: argparse.Namespace) -> str | None:
    """Who signed the version's OMS signature, when signers are given or configured; else None.

    Raises:
        UntrustedArtifact: signers are given (or a signature is required) and none verifies.
    """
    from serving.errors import UntrustedArtifact
    from serving.oms import OmsPolicy, verify_oms
    from serving.trust import oms_policy, read_oms_signature

    # NOTE: keys given on the command line are the only signers checked (not the configured ones too)
    policy = oms_policy(ctx.settings)
    if args.oms_public_key:
        policy = OmsPolicy(public_keys=tuple(Path(p) for p in args.oms_public_key))
    if not policy.configured and not ctx.settings.require_oms_signature:
        return None
    resolved, _ = ctx.cache.resolve(ctx.repo, ModelRef.parse(args.ref))
    bundle = read_oms_signature(ctx.repo, resolved.name, resolved.version)
    if bundle is None:
        raise UntrustedArtifact(
            f"{resolved.name}:{resolved.version} has no OpenSSF model signature (oms.sig)"
        )
    return verify_oms(bundle, policy, resolved.manifest)
