"""The ``serving`` command: parses arguments, builds settings, delegates.

Verbs::

    serving publish PATH --name NAME [--version V] [--format F] [--alias A]
    serving versions NAME
    serving alias set NAME ALIAS VERSION [--canary PCT | --shadow FRACTION] | serving alias get NAME ALIAS
    serving alias promote NAME ALIAS | serving alias abort NAME ALIAS
    serving rollback NAME ALIAS
    serving rollout NAME ALIAS VERSION --url URL [--steps 5,25,50,100] [--step-seconds 60] ...
    serving pull REF | serving verify REF [--trusted-key PUB]
    serving keygen PREFIX [--kek]
    serving predict REF --input JSON
    serving import mlflow URI [--name N] [--alias A] [--sync [--interval S] [--max-polls N]]
    serving serve [--port 8000] [--grpc-port 8001] ...   (HTTP and gRPC serving, see serving.server)

Every verb takes ``--store URI`` (overrides ``SERVING_STORE``) and ``--json``.
A :class:`~serving.errors.ServingError` ends the process with the error's
``exit_code`` and one line on stderr, ``serving: error: <message>``; usage
errors exit 2 (argparse). A traceback means a bug, never a user mistake.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.errors import (
    IntegrityError,
    InvalidInput,
    InvalidRequest,
    MissingExtra,
    ModelNotFound,
    ServingError,
)
from serving.manifest import ModelRef, TensorSpec, sha256_bytes

if TYPE_CHECKING:
    from serving.cache import CachedVersion, LoaderCache
    from serving.encoding import EncodeOptions
    from serving.manifest import Alias
    from serving.progress import ProgressFactory
    from serving.repository import Repository
    from serving.settings import Settings
    from serving.signing import SigningKey

PROG = "serving"


# -- context -----------------------------------------------------------------------------
@dataclass
class _Context:
    """What every verb needs, built lazily so ``--help`` and usage errors stay cheap."""

    store: str | None
    as_json: bool
    _settings: Settings | None = field(default=None, init=False)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from pydantic import ValidationError

            from serving.settings import get_settings

            try:
                self._settings = get_settings(store=self.store)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err.get("loc", ()))
                raise InvalidRequest(f"invalid setting SERVING_{where.upper()}: {err['msg']}") from exc
        return self._settings

    @cached_property
    def repo(self) -> Repository:
        from serving.repository import Repository
        from serving.store import open_store

        return Repository(open_store(self.settings.store, self.settings))

    @cached_property
    def cache(self) -> LoaderCache:
        from serving.cache import LoaderCache

        s = self.settings
        return LoaderCache(
            s.cache_dir,
            s.cache_max_bytes,
            max_artifact_bytes=s.max_artifact_bytes,
            max_artifact_files=s.max_artifact_files,
            reverify_s=s.cache_reverify_s,
        )

    @property
    def progress(self) -> ProgressFactory | None:
        from serving.progress import progress_factory

        return progress_factory(self.settings.progress)

    def emit(self, text: str, data: Any) -> None:
        """Print ``data`` as JSON with ``--json``, else the human line ``text``."""
        if self.as_json:
            print(json.dumps(data, indent=2, default=_json_default))
        else:
            print(text)

    def pull(self, ref: str) -> tuple[CachedVersion, bool]:
        """Resolve ``ref`` and bring its version into the cache; ``(cached, offline)``."""
        resolved, offline = self.cache.resolve(self.repo, ModelRef.parse(ref))
        return self.cache.fetch(self.repo, resolved, self.progress), offline


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _load_json(text: str, what: str) -> Any:
    """``text`` as JSON; ``@path`` reads a file and ``-`` reads stdin."""
    try:
        if text == "-":
            text = sys.stdin.read()
        elif text.startswith("@"):
            text = Path(text[1:]).read_text()
    except OSError as exc:
        raise InvalidRequest(f"{what}: cannot read {text[1:]}: {exc.strerror}") from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(f"{what} is not valid JSON: {exc}") from exc


def _tensor_specs(text: str | None, what: str) -> list[TensorSpec] | None:
    if text is None:
        return None
    from pydantic import ValidationError

    raw = _load_json(text, what)
    if not isinstance(raw, list):
        raise InvalidRequest(f"{what} must be a JSON list of {{name, datatype, shape}} objects")
    try:
        return [TensorSpec.model_validate(item) for item in raw]
    except ValidationError as exc:
        raise InvalidRequest(f"{what}: {exc.errors()[0]['msg']}") from exc


def _key_values(pairs: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"{what} {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


def _signing_key(path: str | None) -> SigningKey | None:
    if path is None:
        return None
    from serving.signing import load_signing_key

    return load_signing_key(path)


def _encode_options(ctx: _Context, args: argparse.Namespace) -> EncodeOptions | None:
    """``--compress`` and ``--encrypt``/``--encrypt-key``: how files are stored (SECURITY.md)."""
    if not args.compress and not args.encrypt and not args.encrypt_key:
        return None
    from serving.crypto import Kek, LocalKek
    from serving.encoding import EncodeOptions, kek_from_settings

    kek: Kek | None = None
    if args.encrypt_key:
        kek = LocalKek.from_file(Path(args.encrypt_key))
    elif args.encrypt:
        kek = kek_from_settings(ctx.settings)
        if kek is None:
            raise InvalidRequest(
                "--encrypt needs a key: --encrypt-key FILE, SERVING_ENCRYPTION_KEY_FILE, "
                "SERVING_ENCRYPTION_KEY or SERVING_ENCRYPTION_KMS_KEY_ID"
            )
    return EncodeOptions(compress=args.compress, kek=kek)


# -- verbs -------------------------------------------------------------------------------
def _keygen(ctx: _Context, args: argparse.Namespace) -> None:
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


def _publish(ctx: _Context, args: argparse.Namespace) -> None:
    from serving.publish import publish_path

    manifest = publish_path(
        ctx.repo,
        Path(args.path),
        args.name,
        version=args.version,
        format=args.format,
        alias=args.alias,
        inputs=_tensor_specs(args.inputs, "--inputs"),
        outputs=_tensor_specs(args.outputs, "--outputs"),
        example=_load_json(args.example, "--example") if args.example is not None else None,
        metadata=_key_values(args.metadata, "--metadata"),
        progress=ctx.progress,
        signing_key=_signing_key(args.signing_key),
        encode=_encode_options(ctx, args),
    )
    text = (
        f"published {manifest.name}:{manifest.version} ({manifest.format}, "
        f"{_plural(len(manifest.files), 'file')}, {_human_bytes(manifest.total_bytes)}) "
        f"to {ctx.repo.store.uri}"
    )
    if args.alias:
        text += f"\n{manifest.name}@{args.alias} -> {manifest.version}"
    ctx.emit(
        text,
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


def _versions(ctx: _Context, args: argparse.Namespace) -> None:
    repo = ctx.repo
    versions = repo.list_versions(args.name)
    if not versions:
        raise ModelNotFound(f"model {args.name!r} not found in {repo.store.uri}")
    by_version: dict[str, list[str]] = {}
    for alias in repo.list_aliases(args.name):
        target = repo.get_alias(args.name, alias)
        by_version.setdefault(target.version, []).append(alias)
    header = ("VERSION", "FORMAT", "CREATED", "SIZE", "ALIASES")
    table: list[tuple[str, ...]] = [header]
    rows: list[dict[str, Any]] = []
    for v in versions:
        manifest, _ = repo.manifest(args.name, v)
        aliases = by_version.get(v, [])
        rows.append(
            {
                "version": v,
                "format": manifest.format,
                "created_at": manifest.created_at,
                "total_bytes": manifest.total_bytes,
                "aliases": aliases,
            }
        )
        size = _human_bytes(manifest.total_bytes)
        table.append((v, manifest.format, manifest.created_at, size, ",".join(aliases)))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    text = "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    )
    ctx.emit(text, {"name": args.name, "versions": rows})


def _alias_writer(args: argparse.Namespace) -> tuple[Any, str | None]:
    """``--signing-key`` and ``--expires-in``: how an alias move is signed (SECURITY.md)."""
    expires_at = None
    if args.expires_in is not None:
        if args.signing_key is None:
            raise InvalidRequest("--expires-in needs --signing-key: only a signed alias can expire")
        from datetime import UTC, datetime, timedelta

        when = datetime.now(UTC) + timedelta(seconds=args.expires_in)
        expires_at = when.isoformat(timespec="seconds")
    key = _signing_key(args.signing_key)
    if key is None:
        return None, None
    from serving.signing import alias_signer

    return alias_signer(key), expires_at


def _split_text(alias: Alias) -> str:
    """`` (canary 2 at 30%, shadow 3 on 0.5 of requests)`` or ``''``."""
    parts = []
    if alias.canary is not None:
        parts.append(f"canary {alias.canary.version} at {alias.canary.weight:g}%")
    if alias.shadow is not None:
        parts.append(f"shadow {alias.shadow.version} on {alias.shadow.fraction:.0%} of requests")
    return f" ({', '.join(parts)})" if parts else ""


def _alias_set(ctx: _Context, args: argparse.Namespace) -> None:
    from serving.repository import AliasMove, SetCanary, SetShadow, SetTarget

    writer, expires_at = _alias_writer(args)
    if args.canary is not None or args.shadow is not None:
        if args.canary is not None and args.shadow is not None:
            raise InvalidRequest("--canary and --shadow are two roles: give one per command")
        move: AliasMove = (
            SetCanary(args.version, args.canary)
            if args.canary is not None
            else SetShadow(args.version, args.shadow)
        )
        alias = ctx.repo.move_alias(args.name, args.alias, move, writer=writer, expires_at=expires_at)
        ctx.emit(f"{args.name}@{args.alias} -> {alias.version}{_split_text(alias)}", alias.model_dump())
        return
    alias = ctx.repo.move_alias(
        args.name, args.alias, SetTarget(args.version), writer=writer, expires_at=expires_at
    )
    was = f" (was {alias.history[-1].version})" if alias.history else ""
    ctx.emit(f"{args.name}@{args.alias} -> {alias.version}{was}", alias.model_dump())


def _alias_get(ctx: _Context, args: argparse.Namespace) -> None:
    alias = ctx.repo.get_alias(args.name, args.alias)
    ctx.emit(alias.version + _split_text(alias), alias.model_dump())


def _alias_promote(ctx: _Context, args: argparse.Namespace) -> None:
    from serving.repository import Promote

    writer, expires_at = _alias_writer(args)
    alias = ctx.repo.move_alias(args.name, args.alias, Promote(), writer=writer, expires_at=expires_at)
    was = alias.history[-1].version
    ctx.emit(
        f"{args.name}@{args.alias} -> {alias.version} (canary promoted, was {was}){_split_text(alias)}",
        alias.model_dump(),
    )


def _alias_abort(ctx: _Context, args: argparse.Namespace) -> None:
    from serving.repository import Abort

    before = ctx.repo.get_alias(args.name, args.alias)
    writer, expires_at = _alias_writer(args)
    alias = ctx.repo.move_alias(args.name, args.alias, Abort(), writer=writer, expires_at=expires_at)
    ctx.emit(
        f"{args.name}@{args.alias} -> {alias.version} (dropped {_split_text(before).removeprefix(' (')}",
        alias.model_dump(),
    )


def _rollout(ctx: _Context, args: argparse.Namespace) -> None:
    from serving.errors import RolloutAborted
    from serving.rollout import IndexSource, PrometheusSource, Rollout, Step, Thresholds

    if not args.url and not args.prometheus:
        raise InvalidRequest("give --url (the serving endpoint's repository index) or --prometheus URL")
    source: IndexSource | PrometheusSource
    if args.prometheus:
        source = PrometheusSource(
            args.prometheus, args.name, prefix=args.prometheus_prefix, selector=args.prometheus_selector
        )
    else:
        source = IndexSource(args.url, args.name)
    writer, expires_at = _alias_writer(args)

    def on_step(step: Step) -> None:
        from dataclasses import asdict

        if ctx.as_json:
            print(json.dumps({"step": asdict(step)}), flush=True)
        else:
            print(step.line(args.version, live_version), flush=True)

    import signal

    def terminated(signum: int, frame: Any) -> None:
        # NOTE: a cancelled CI job gets SIGTERM; raising here lets the rollout abort the canary.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    live_version = ctx.repo.get_alias(args.name, args.alias).version
    rollout = Rollout(
        ctx.repo,
        args.name,
        args.alias,
        args.version,
        source,
        Thresholds(
            max_error_ratio=args.max_error_ratio,
            max_p99_ratio=args.max_p99_ratio,
            max_disagreement=args.max_disagreement,
            min_requests=args.min_requests,
        ),
        writer=writer,
        expires_at=expires_at,
        on_step=on_step,
        converge_timeout_s=args.converge_timeout,
    )
    try:
        result = rollout.run(
            args.steps,
            args.step_seconds,
            shadow_seconds=args.shadow_seconds,
            shadow_fraction=args.shadow_fraction,
        )
    except RolloutAborted as exc:
        if ctx.as_json and exc.result is not None:
            print(json.dumps({"result": exc.result.as_dict()}), flush=True)
        raise RolloutAborted(
            f"rollout of {args.name}:{args.version} aborted: {exc.message}; "
            f"{args.name}@{args.alias} stays on {live_version}",
            exc.result,
        ) from exc
    finally:
        source.close()
    text = (
        f"{args.name}@{args.alias} -> {args.version} (promoted from {live_version} after "
        f"{_plural(len(result.steps), 'step')} in {result.seconds:.1f}s)"
    )
    # NOTE: JSON Lines with --json: one object per step as it ends, then the result.
    print(json.dumps({"result": result.as_dict()}) if ctx.as_json else text)


def _rollback(ctx: _Context, args: argparse.Namespace) -> None:
    from serving.repository import Rollback

    before = ctx.repo.get_alias(args.name, args.alias).version
    writer, expires_at = _alias_writer(args)
    alias = ctx.repo.move_alias(args.name, args.alias, Rollback(), writer=writer, expires_at=expires_at)
    ctx.emit(
        f"{args.name}@{args.alias} -> {alias.version} (rolled back from {before})",
        {**alias.model_dump(), "rolled_back_from": before},
    )


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


def _pull(ctx: _Context, args: argparse.Namespace) -> None:
    cached, offline = ctx.pull(args.ref)
    how = "already cached" if cached.hit else "downloaded"
    if offline:
        how += ", store unreachable: used the cache's last known target"
    ctx.emit(
        f"{cached.name}:{cached.version} -> {cached.path} "
        f"({how}, {_human_bytes(cached.manifest.total_bytes)})",
        _cached_summary(cached, offline),
    )


def _verify(ctx: _Context, args: argparse.Namespace) -> None:
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
    cached = ctx.cache.fetch(ctx.repo, resolved, ctx.progress)
    if repaired or held is None:
        ctx.cache.verify(cached)
    signed = f", signed by trusted key {key_id[:16]}" if key_id else ""
    fixed = " (repaired: the cached copy had changed and was pulled again)" if repaired else ""
    ctx.emit(
        f"{cached.name}:{cached.version} OK: {_plural(len(cached.manifest.files), 'file')} "
        f"({_human_bytes(cached.manifest.total_bytes)}) match the manifest{signed}{fixed}",
        {**_cached_summary(cached, offline), "ok": True, "signed_by": key_id, "repaired": repaired},
    )


def _predict(ctx: _Context, args: argparse.Namespace) -> None:
    import numpy as np

    from serving.formats import load_predictor
    from serving.formats.base import numpy_dtype
    from serving.trust import check_trust

    body = _load_json(args.input, "--input")
    resolved, _ = ctx.cache.resolve(ctx.repo, ModelRef.parse(args.ref))
    # NOTE: the same gate as the serving layer, decided on the manifest before any download.
    trust = check_trust(ctx.repo, resolved, ctx.settings, cache_root=ctx.cache.root)
    cached = ctx.cache.fetch(ctx.repo, resolved, ctx.progress)
    with ctx.cache.pin(cached):
        predictor = load_predictor(cached.path, cached.manifest, trust.policy)
        try:
            specs = {s.name: s for s in predictor.inputs}
            if isinstance(body, dict):
                named = body
            elif len(specs) == 1:
                named = {next(iter(specs)): body}
            else:
                raise InvalidInput(
                    f"{cached.name}:{cached.version} has inputs {sorted(specs)}: "
                    "give --input as a JSON object {name: rows}"
                )
            unknown = sorted(set(named) - set(specs))
            if unknown:
                raise InvalidInput(f"unknown input {unknown[0]!r}; the model takes {sorted(specs)}")
            try:
                arrays = {k: np.asarray(v, dtype=numpy_dtype(specs[k].datatype)) for k, v in named.items()}
                outputs = predictor.predict(arrays)
            except (ValueError, TypeError) as exc:
                # NOTE: frameworks report a wrong shape or dtype as ValueError/TypeError.
                raise InvalidInput(f"{cached.name}:{cached.version} rejected the input: {exc}") from exc
        finally:
            predictor.close()
    result = {
        "model_name": cached.name,
        "model_version": cached.version,
        "outputs": {k: np.asarray(v).tolist() for k, v in outputs.items()},
    }
    # NOTE: predict prints JSON with or without --json: JSON in, JSON out.
    print(json.dumps(result, default=_json_default))


def _import_mlflow(ctx: _Context, args: argparse.Namespace) -> None:
    import os

    from serving.mlflow_import import MlflowRef, MlflowRegistry, import_model, sync

    ref = MlflowRef.parse(args.uri)
    if args.max_polls is not None and not args.sync:
        raise InvalidRequest("--max-polls needs --sync")
    if args.version and args.sync:
        raise InvalidRequest("--version cannot be used with --sync: every import takes the next version")
    tracking_uri = args.tracking_uri or ctx.settings.mlflow_tracking_uri
    # NOTE: MLflow's client retries an unreachable server for minutes by default; a CLI
    # should say so in seconds. Explicit settings of these variables still win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    registry = MlflowRegistry(tracking_uri or "")
    kwargs: dict[str, Any] = {
        "settings": ctx.settings,
        "name": args.name,
        "alias": args.alias,
        "signing_key": _signing_key(args.signing_key),
        "encode": _encode_options(ctx, args),
    }

    def report(imported: Any) -> None:
        m, src = imported.manifest, imported.source
        text = (
            f"imported {ref.uri} (MLflow version {src.model_version or '-'}, run {src.run_id or '-'}, "
            f"{imported.plan.flavor}) as {m.name}:{m.version} ({m.format}, "
            f"{_plural(len(m.files), 'file')}, {_human_bytes(m.total_bytes)}) in {imported.seconds:.1f}s"
        )
        if args.alias:
            text += f"\n{m.name}@{args.alias} -> {m.version}"
        ctx.emit(
            text,
            {
                "name": m.name,
                "version": m.version,
                "format": m.format,
                "alias": args.alias,
                "mlflow": m.metadata["mlflow"],
                "seconds": round(imported.seconds, 3),
            },
        )

    if not args.sync:
        report(import_model(registry, ctx.repo, ref, version=args.version, **kwargs))
        return
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def on_poll(key: str, imported: Any) -> None:
        if imported is not None:
            report(imported)
        elif key.startswith("error: "):
            print(f"{PROG}: warning: {key.removeprefix('error: ')}", file=sys.stderr)

    sync(
        registry,
        ctx.repo,
        ref,
        interval_s=args.interval,
        stop=stop,
        max_polls=args.max_polls,
        on_poll=on_poll,
        **kwargs,
    )


def _serve(ctx: _Context, args: argparse.Namespace) -> int:
    from serving.server import launch as server

    args.store = ctx.store
    try:
        return int(server.main(args) or 0)
    except ModuleNotFoundError as exc:
        if not exc.name or exc.name.startswith("serving"):
            raise
        raise MissingExtra(
            f"'serving serve' needs {exc.name!r}: install the serve extra (pip install 'serving[serve]')"
        ) from exc


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _percent(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text!r} must be a percentage between 0 and 100")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a fraction between 0 and 1")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value:  # NOTE: NaN
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    return value


def _steps(text: str) -> list[float]:
    steps = [_percent(part.strip()) for part in text.split(",") if part.strip()]
    if not steps or steps != sorted(set(steps)) or steps[0] <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give increasing weights above 0, e.g. 5,25,50,100")
    return steps


# -- parser ------------------------------------------------------------------------------
def _alias_signing_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--signing-key",
        "--sign-key",
        dest="signing_key",
        metavar="PATH",
        help="Ed25519 private key (PEM): sign the alias move (rollback protection, see SECURITY.md)",
    )
    p.add_argument(
        "--expires-in",
        type=int,
        metavar="SECONDS",
        help="the signed alias expires after this many seconds (freeze protection); re-sign before then",
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; ``--store`` and ``--json`` go before or after the verb."""
    from serving import __version__

    # NOTE: SUPPRESS on the per-verb copies, so a verb's unset default does not
    # overwrite a value given before the verb.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store",
        default=argparse.SUPPRESS,
        help="store URI (path, file:// or s3://); default $SERVING_STORE",
    )
    common.add_argument(
        "--json",
        dest="as_json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="machine-readable output",
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log warnings and progress details to stderr",
    )

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Publish immutable, digest-checked model versions, move aliases, pull and predict.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--store", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", dest="as_json", action="store_true", default=False, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", default=False, help=argparse.SUPPRESS)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, func: Callable[..., Any], help: str, **kw: Any) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, parents=[common], help=help, description=help, **kw)
        p.set_defaults(func=func)
        return p

    p = verb("publish", _publish, "publish a saved artifact (file or directory) as a new version")
    p.add_argument("path", metavar="PATH", help="the artifact: a file or a directory")
    p.add_argument("--name", required=True, help="model name")
    p.add_argument("--version", help="version to publish (default: the next integer)")
    p.add_argument("--format", help="artifact format (default: detected from content and extension)")
    p.add_argument("--alias", help="move this alias to the new version once it is published")
    p.add_argument("--example", metavar="JSON", help="example input rows (JSON, @file or -)")
    p.add_argument("--inputs", metavar="JSON", help="input schema: [{name, datatype, shape}] (JSON or @file)")
    p.add_argument(
        "--outputs", metavar="JSON", help="output schema: [{name, datatype, shape}] (JSON or @file)"
    )
    p.add_argument(
        "--signing-key",
        "--sign-key",
        dest="signing_key",
        metavar="PATH",
        help="Ed25519 private key (PEM): write manifest.sig before the manifest (see SECURITY.md)",
    )
    p.add_argument(
        "--compress",
        nargs="?",
        const="zstd",
        choices=["zstd", "gzip"],
        help="store files compressed (default zstd); pulls decompress transparently",
    )
    p.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt files client-side with the configured key (SERVING_ENCRYPTION_*)",
    )
    p.add_argument(
        "--encrypt-key",
        metavar="FILE",
        help="encrypt files client-side with this key file (serving keygen PREFIX --kek)",
    )
    p.add_argument(
        "--metadata", metavar="KEY=VALUE", action="append", default=[], help="free-form metadata (repeatable)"
    )

    p = verb("versions", _versions, "list a model's published versions and the aliases on them")
    p.add_argument("name", metavar="NAME")

    p = verb("alias", lambda *_: None, "set or show an alias")
    alias_verbs = p.add_subparsers(dest="alias_verb", metavar="ACTION", required=True)
    a = alias_verbs.add_parser("set", parents=[common], help="point NAME@ALIAS at VERSION")
    a.set_defaults(func=_alias_set)
    a.add_argument("name", metavar="NAME")
    a.add_argument("alias", metavar="ALIAS")
    a.add_argument("version", metavar="VERSION")
    a.add_argument(
        "--canary",
        type=_percent,
        metavar="PCT",
        help="keep the target; send PCT percent of requests to VERSION (0-100) beside it",
    )
    a.add_argument(
        "--shadow",
        type=_fraction,
        metavar="FRACTION",
        help="keep the target; mirror FRACTION (0-1) of requests to VERSION, compared and never returned",
    )
    _alias_signing_arguments(a)
    a = alias_verbs.add_parser("get", parents=[common], help="print the version NAME@ALIAS points at")
    a.set_defaults(func=_alias_get)
    a.add_argument("name", metavar="NAME")
    a.add_argument("alias", metavar="ALIAS")
    a = alias_verbs.add_parser(
        "promote", parents=[common], help="make NAME@ALIAS's canary its target (history keeps the old one)"
    )
    a.set_defaults(func=_alias_promote)
    a.add_argument("name", metavar="NAME")
    a.add_argument("alias", metavar="ALIAS")
    _alias_signing_arguments(a)
    a = alias_verbs.add_parser(
        "abort", parents=[common], help="drop NAME@ALIAS's canary and shadow: all requests to the target"
    )
    a.set_defaults(func=_alias_abort)
    a.add_argument("name", metavar="NAME")
    a.add_argument("alias", metavar="ALIAS")
    _alias_signing_arguments(a)

    p = verb(
        "rollout",
        _rollout,
        "move a canary's weight step by step, promote it, or abort on a threshold (exit 12)",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("alias", metavar="ALIAS")
    p.add_argument("version", metavar="VERSION")
    p.add_argument("--url", help="serving endpoint whose /v2/repository/index gives per-version figures")
    p.add_argument("--prometheus", metavar="URL", help="read the figures from Prometheus instead")
    p.add_argument(
        "--prometheus-prefix",
        default="ray_",
        help="prefix of the metric names in Prometheus (ray_ on Ray; '' for --standalone)",
    )
    p.add_argument(
        "--prometheus-selector", default="", metavar="MATCHERS", help='extra matchers, e.g. namespace="ml"'
    )
    p.add_argument("--steps", type=_steps, default=[5.0, 25.0, 50.0, 100.0], help="canary weights, in %%")
    p.add_argument("--step-seconds", type=_positive_float, default=60.0, help="seconds measured per step")
    p.add_argument(
        "--shadow-seconds",
        type=float,
        default=0.0,
        help="first mirror traffic to VERSION this long and check --max-disagreement (0: no shadow phase)",
    )
    p.add_argument(
        "--shadow-fraction", type=_fraction, default=1.0, help="share mirrored in the shadow phase"
    )
    p.add_argument(
        "--max-error-ratio",
        type=float,
        default=0.05,
        help="abort when the canary's non-2xx share exceeds the live version's by more than this",
    )
    p.add_argument(
        "--max-p99-ratio", type=_positive_float, help="abort when canary p99 / live p99 exceeds this"
    )
    p.add_argument(
        "--max-disagreement", type=_fraction, default=0.05, help="shadow phase: abort above this disagreement"
    )
    p.add_argument(
        "--min-requests", type=_positive_int, default=20, help="abort a step that saw fewer canary requests"
    )
    p.add_argument(
        "--converge-timeout",
        type=_positive_float,
        default=120.0,
        help="seconds every replica may take to load the version and apply a step",
    )
    _alias_signing_arguments(p)

    p = verb("rollback", _rollback, "move an alias back to its previous target")
    p.add_argument("name", metavar="NAME")
    p.add_argument("alias", metavar="ALIAS")
    _alias_signing_arguments(p)

    p = verb("pull", _pull, "prefetch a version into the node-local cache")
    p.add_argument("ref", metavar="REF", help="NAME@ALIAS, NAME:VERSION or NAME (= NAME@production)")

    p = verb("verify", _verify, "check a version's signature, then re-hash its cached files")
    p.add_argument("ref", metavar="REF", help="NAME@ALIAS, NAME:VERSION or NAME (= NAME@production)")
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

    p = verb("keygen", _keygen, "write an Ed25519 signing key pair PREFIX.key (0600) and PREFIX.pub")
    p.add_argument("prefix", metavar="PREFIX", help="path prefix of the key files")
    p.add_argument(
        "--kek", action="store_true", help="write an AES-256 encryption key PREFIX.kek (0600) instead"
    )

    p = verb("predict", _predict, "load a version in-process and print its predictions as JSON")
    p.add_argument("ref", metavar="REF", help="NAME@ALIAS, NAME:VERSION or NAME (= NAME@production)")
    p.add_argument(
        "--input",
        required=True,
        metavar="JSON",
        help="rows for a single-input model, or {name: rows}; JSON, @file or - for stdin",
    )

    p = verb("import", lambda *_: None, "import a model from another registry as a new version")
    import_verbs = p.add_subparsers(dest="import_verb", metavar="SOURCE", required=True)
    a = import_verbs.add_parser(
        "mlflow",
        parents=[common],
        help="import an MLflow model (models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH)",
    )
    a.set_defaults(func=_import_mlflow)
    a.add_argument("uri", metavar="URI", help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH")
    a.add_argument("--tracking-uri", help="MLflow tracking server (default $MLFLOW_TRACKING_URI)")
    a.add_argument("--name", help="our model name (default: the registered model's name)")
    a.add_argument("--version", help="our version (default: the next integer)")
    a.add_argument("--alias", help="move this alias of ours to each imported version")
    a.add_argument(
        "--sync",
        action="store_true",
        help="follow the MLflow alias: poll and import again whenever it moves (until SIGINT/SIGTERM)",
    )
    a.add_argument(
        "--interval", type=_positive_float, default=30.0, metavar="SECONDS", help="seconds between polls"
    )
    a.add_argument("--max-polls", type=_positive_int, metavar="N", help="stop --sync after N polls")
    a.add_argument(
        "--signing-key",
        "--sign-key",
        dest="signing_key",
        metavar="PATH",
        help="Ed25519 private key (PEM): sign each imported version (needed for unrestricted formats)",
    )
    a.add_argument("--compress", nargs="?", const="zstd", choices=["zstd", "gzip"], help="store compressed")
    a.add_argument("--encrypt", action="store_true", help="encrypt files with the configured key")
    a.add_argument("--encrypt-key", metavar="FILE", help="encrypt files with this key file")

    from serving.server import launch as server

    p = verb("serve", _serve, "run the HTTP and gRPC serving layer (Ray Serve) in the foreground")
    server.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    # NOTE: errors end as the one `serving: error:` line; library warnings that repeat
    # them (a refused version, an offline fallback) would make two, so only with -v.
    level = logging.INFO if args.verbose else logging.CRITICAL
    logging.basicConfig(level=level, format=f"{PROG}: %(levelname)s: %(message)s")
    ctx = _Context(store=args.store, as_json=args.as_json)
    try:
        return int(args.func(ctx, args) or 0)
    except ServingError as exc:
        message = " ".join(str(exc).split())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
