"""``serving publish``, ``serving versions``, ``serving sign`` and ``serving keygen``: versions and the
keys that sign them."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from serving.cli.context import Context, alias_text, human_bytes, version_text
from serving.cli.options import Commands, add_publish_options, add_ref, publish_options
from serving.errors import InvalidRequest, ModelNotFound, ServingError
from serving.manifest import sha256_bytes

log = logging.getLogger(__name__)


def add_publish(commands: Commands) -> None:
    p = commands.add("publish", publish, "publish a saved artifact (file or directory) as a new version")
    p.add_argument("path", metavar="PATH", help="the artifact: a file or a directory")
    p.add_argument("--name", required=True, help="model name")
    add_publish_options(p)


def publish(ctx: Context, args: argparse.Namespace) -> None:
    from serving.publish import publish_path

    manifest = publish_path(ctx.repo, Path(args.path), args.name, **publish_options(ctx, args))
    ctx.emit(
        f"published {version_text(manifest)} to {ctx.repo.store.uri}{alias_text(manifest, args.alias)}",
        {
            "name": manifest.name,
            "version": manifest.version,
            "format": manifest.format,
            "files": len(manifest.files),
            "total_bytes": manifest.total_bytes,
            "manifest_sha256": sha256_bytes(manifest.to_json()),
            "alias": args.alias,
            "store": ctx.repo.store.uri,
        },
    )


def add_versions(commands: Commands) -> None:
    p = commands.add("versions", versions, "list a model's published versions and the aliases on them")
    p.add_argument("name", metavar="NAME")


def versions(ctx: Context, args: argparse.Namespace) -> None:
    repo = ctx.repo
    published = repo.list_versions(args.name)
    if not published:
        raise ModelNotFound(f"model {args.name!r} not found in {repo.store.uri}")
    by_version: dict[str, list[str]] = {}
    for alias in repo.list_aliases(args.name):
        try:
            target = repo.get_alias(args.name, alias)
        except ServingError:
            continue  # NOTE: one unreadable alias does not hide the versions
        by_version.setdefault(target.version, []).append(alias)
    header = ("VERSION", "FORMAT", "CREATED", "SIZE", "ALIASES")
    table: list[tuple[str, ...]] = [header]
    rows: list[dict[str, Any]] = []
    for v in published:
        aliases = by_version.get(v, [])
        try:
            manifest, _ = repo.manifest(args.name, v)
        except ServingError as exc:
            # NOTE: one bad manifest is that version's problem, not the listing's.
            rows.append({"version": v, "error": str(exc), "aliases": aliases})
            table.append((v, "-", "-", "-", ",".join(aliases) + f"  (unreadable: {exc})"))
            continue
        rows.append(
            {
                "version": v,
                "format": manifest.format,
                "created_at": manifest.created_at,
                "total_bytes": manifest.total_bytes,
                "aliases": aliases,
                "source": manifest.metadata.get("source"),
                "derived_from": manifest.metadata.get("derived_from"),
            }
        )
        size = human_bytes(manifest.total_bytes)
        table.append((v, manifest.format, manifest.created_at, size, ",".join(aliases)))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    text = "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    )
    ctx.emit(text, {"name": args.name, "versions": rows})


def add_sign(commands: Commands) -> None:
    p = commands.add(
        "sign",
        sign,
        "sign an existing version: its manifest (Ed25519) or its files (an OpenSSF model signature)",
    )
    add_ref(p)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--signing-key", metavar="KEY.pem", help="Ed25519 private key: add a signature to manifest.sig"
    )
    how.add_argument(
        "--oms-key",
        metavar="KEY.pem",
        help="EC private key (P-256/384/521): write an OpenSSF model signature (oms.sig) over the files",
    )
    p.add_argument("--oms-certificate", metavar="CERT.pem", help="with --oms-key: the signing certificate")
    p.add_argument(
        "--oms-certificate-chain",
        metavar="CA.pem",
        action="append",
        default=[],
        help="with --oms-certificate: the certificates up to the root (repeatable)",
    )


def sign(ctx: Context, args: argparse.Namespace) -> None:
    from serving.manifest import ModelRef

    if (args.oms_certificate or args.oms_certificate_chain) and not args.oms_key:
        raise InvalidRequest("--oms-certificate and --oms-certificate-chain go with --oms-key")
    resolved, _ = ctx.cache.resolve(ctx.repo, ModelRef.parse(args.ref))
    name, version = resolved.name, resolved.version
    summary: dict[str, Any] = {"name": name, "version": version}
    if args.signing_key:
        from serving.signing import load_signing_key, sign_manifest
        from serving.trust import read_signature, write_signature

        key = load_signing_key(args.signing_key)
        existing = read_signature(ctx.repo, name, version)
        write_signature(ctx.repo, name, version, sign_manifest(resolved.manifest_raw, key, existing))
        ctx.emit(
            f"signed {name}:{version}'s manifest (key id {key.key_id[:16]})",
            {**summary, "key_id": key.key_id},
        )
        return
    from serving.manifest import MANIFEST_NAME
    from serving.oms import sign_directory
    from serving.trust import write_oms_signature

    # NOTE: the files as the cache verified them against the manifest, so the OMS statement signs
    # exactly the bytes the manifest lists (the cached copy's manifest.json is no model file).
    cached = ctx.cache.fetch(ctx.repo, resolved, ctx.progress, prefetch=True)
    bundle = sign_directory(
        cached.path,
        Path(args.oms_key),
        certificate=Path(args.oms_certificate) if args.oms_certificate else None,
        certificate_chain=[Path(p) for p in args.oms_certificate_chain],
        ignore=[MANIFEST_NAME],
    )
    write_oms_signature(ctx.repo, name, version, bundle)
    ctx.emit(
        f"wrote {name}:{version}'s OpenSSF model signature over {len(resolved.manifest.files)} file(s)",
        {**summary, "oms": True, "files": len(resolved.manifest.files)},
    )


def add_keygen(commands: Commands) -> None:
    p = commands.add("keygen", keygen, "write an Ed25519 signing key pair PREFIX.key (0600) and PREFIX.pub")
    p.add_argument("prefix", metavar="PREFIX", help="path prefix of the key files")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument(
        "--kek", action="store_true", help="write an AES-256 encryption key PREFIX.kek (0600) instead"
    )
    kind.add_argument(
        "--oms", action="store_true", help="write an EC P-256 pair for OpenSSF model signatures instead"
    )


def keygen(ctx: Context, args: argparse.Namespace) -> None:
    if args.oms:
        from serving.oms import generate_ec_keypair

        key, pub = generate_ec_keypair(args.prefix)
        ctx.emit(
            f"wrote {key} (0600, keep it secret) and {pub} (EC P-256)", {"key": str(key), "pub": str(pub)}
        )
        return
    if args.kek:
        from serving.crypto import LocalKek, generate_kek

        path = Path(f"{args.prefix}.kek")
        generate_kek(path)
        kek_id = LocalKek.from_file(path).kek_id
        ctx.emit(f"wrote {path} (0600, encryption key {kek_id})", {"kek": str(path), "kek_id": kek_id})
        return
    from serving.signing import generate_keypair

    pair = generate_keypair(args.prefix)
    ctx.emit(
        f"wrote {pair.key_path} (0600, keep it secret) and {pair.pub_path} (key id {pair.key_id[:16]})",
        {"key": str(pair.key_path), "pub": str(pair.pub_path), "key_id": pair.key_id},
    )
