"""``serving import mlflow``, ``serving import git`` and ``serving import dvc``: a model from
another registry, a Git repository or a DVC remote, published as a new version."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from serving.cli.context import PROG, Context, alias_text, version_text
from serving.cli.options import (
    Commands,
    add_encode_options,
    add_publish_options,
    add_signing_key,
    encode_options,
    positive_float,
    positive_int,
    publish_options,
    signing_key,
)
from serving.errors import InvalidRequest

if TYPE_CHECKING:
    from serving.manifest import Manifest
    from serving.mlflow_import import MlflowRef

log = logging.getLogger(__name__)

MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": 2,
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": 1,
    "MLFLOW_HTTP_REQUEST_TIMEOUT": 30,
}
"""MLflow's client retries an unreachable server for minutes by default; a CLI should say so in seconds."""


def add_import(commands: Commands) -> None:
    group = commands.group(
        "import",
        "import a model from another registry as a new version",
        dest="import_verb",
        metavar="SOURCE",
    )
    a = group.add(
        "mlflow",
        import_mlflow,
        "import an MLflow model (models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH)",
    )
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
        "--interval", type=positive_float, default=30.0, metavar="SECONDS", help="seconds between polls"
    )
    a.add_argument("--max-polls", type=positive_int, metavar="N", help="stop --sync after N polls")
    add_signing_key(
        a, "Ed25519 private key (PEM): sign each imported version (needed for unrestricted formats)"
    )
    add_encode_options(
        a,
        compress="store compressed",
        encrypt="encrypt files with the configured key",
        encrypt_key="encrypt files with this key file",
    )

    g = group.add(
        "git",
        import_git,
        "publish a file or folder of a Git repository at a tag, branch or commit (Git LFS resolved)",
    )
    g.add_argument("repo", metavar="REPO", help="a local path or a URL git can fetch (https, ssh, file)")
    g.add_argument("--rev", required=True, help="a tag, branch or commit")
    g.add_argument("--path", required=True, help="the model file or folder in the repository")
    g.add_argument("--name", required=True, help="model name")
    add_publish_options(g)

    d = group.add(
        "dvc",
        import_dvc,
        "publish a DVC-tracked file or folder at a revision, read from its DVC remote, checked by md5",
    )
    d.add_argument(
        "repo", metavar="REPO", help="the Git repository: a local path or a URL (https, ssh, file)"
    )
    d.add_argument(
        "path", metavar="PATH", help="the DVC-tracked file or folder (or a path inside a tracked folder)"
    )
    d.add_argument("--rev", required=True, help="a tag, branch or commit")
    d.add_argument("--remote", help="the DVC remote to read from (default: the repository's default remote)")
    d.add_argument("--name", required=True, help="model name")
    add_publish_options(d)


@contextlib.contextmanager
def mlflow_http_defaults(defaults: dict[str, int]) -> Iterator[None]:
    """MLflow's HTTP retries and timeout at ``defaults`` while the block runs; the environment wins.

    NOTE: MLflow's client has no API for these: each request reads the ``MLFLOW_HTTP_REQUEST_*``
    settings of :mod:`mlflow.environment_variables` from ``os.environ`` when it is made, else
    their defaults. So this changes those defaults (and restores them after), never the
    process environment, which every child process would inherit.
    """
    try:
        import mlflow.environment_variables as settings
    except ImportError:
        yield  # NOTE: MlflowRegistry says which extra is missing
        return
    saved = []
    for name, value in defaults.items():
        variable = getattr(settings, name, None)
        if variable is not None:
            saved.append((variable, variable.default))
            variable.default = value
    try:
        yield
    finally:
        for variable, default in saved:
            variable.default = default


def import_mlflow(ctx: Context, args: argparse.Namespace) -> None:
    from serving.mlflow_import import MlflowRef

    ref = MlflowRef.parse(args.uri)
    if args.max_polls is not None and not args.sync:
        raise InvalidRequest("--max-polls needs --sync")
    if args.version and args.sync:
        raise InvalidRequest("--version cannot be used with --sync: every import takes the next version")
    with mlflow_http_defaults(MLFLOW_HTTP_DEFAULTS):
        _import_mlflow(ctx, args, ref)


def _import_mlflow(ctx: Context, args: argparse.Namespace, ref: MlflowRef) -> None:
    from serving.mlflow_import import MlflowRegistry, import_model, sync

    tracking_uri = args.tracking_uri or ctx.settings.mlflow_tracking_uri
    registry = MlflowRegistry(tracking_uri or "")
    kwargs: dict[str, Any] = {
        "settings": ctx.settings,
        "name": args.name,
        "alias": args.alias,
        "signing_key": signing_key(args.signing_key),
        "encode": encode_options(ctx, args),
    }

    def report(imported: Any) -> None:
        m, src = imported.manifest, imported.source
        ctx.emit(
            f"imported {ref.uri} (MLflow version {src.model_version or '-'}, run {src.run_id or '-'}, "
            f"{imported.plan.flavor}) as {version_text(m)} in {imported.seconds:.1f}s"
            + alias_text(m, args.alias),
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


@contextlib.contextmanager
def unwind_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C while the block runs, so scratch clones are removed.

    A scratch clone's config may hold the URL's credentials; git's process group is ended too.
    """
    import signal

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def import_git(ctx: Context, args: argparse.Namespace) -> None:
    with unwind_on_sigterm():
        _import_git(ctx, args)


def import_dvc(ctx: Context, args: argparse.Namespace) -> None:
    from serving.dvc_import import import_dvc as run

    with unwind_on_sigterm():
        manifest, source = run(
            ctx.repo,
            args.repo,
            args.path,
            rev=args.rev,
            remote=args.remote,
            name=args.name,
            **publish_options(ctx, args),
        )
    _emit_import(
        ctx,
        manifest,
        source.as_metadata(),
        args.alias,
        f"{source.repo}@{source.rev}:{source.path} (commit {source.commit[:12]}, "
        f"DVC {source.hash} {source.md5}, checked)",
    )


def _import_git(ctx: Context, args: argparse.Namespace) -> None:
    from serving.git_import import import_git as run

    manifest, source = run(
        ctx.repo, args.repo, args.rev, args.path, name=args.name, **publish_options(ctx, args)
    )
    _emit_import(
        ctx,
        manifest,
        source.as_metadata(),
        args.alias,
        f"{source.repo}@{source.rev}:{source.path} (commit {source.commit[:12]}"
        f"{', Git LFS' if source.lfs else ''})",
    )


def _emit_import(
    ctx: Context, manifest: Manifest, source: dict[str, Any], alias: str | None, origin: str
) -> None:
    """One line (and the JSON) for a version imported from ``origin``, as the Git and DVC imports say it."""
    ctx.emit(
        f"imported {origin} as {version_text(manifest)}" + alias_text(manifest, alias),
        {
            "name": manifest.name,
            "version": manifest.version,
            "format": manifest.format,
            "alias": alias,
            "source": source,
        },
    )
