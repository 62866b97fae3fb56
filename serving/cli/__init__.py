"""The ``serving`` command: parses arguments, builds settings, delegates.

Verbs::

    serving publish PATH --name NAME [--version V] [--format F] [--alias A]
    serving versions NAME
    serving alias set NAME ALIAS VERSION [--canary PCT | --shadow FRACTION] | serving alias get NAME ALIAS
    serving alias promote NAME ALIAS | serving alias abort NAME ALIAS
    serving rollback NAME ALIAS
    serving rollout NAME ALIAS VERSION --url URL [--steps 5,25,50,100] [--step-seconds 60] ...
    serving pull REF | serving verify REF [--trusted-key PUB] [--oms-public-key PUB]
    serving sign REF (--signing-key KEY | --oms-key KEY [--oms-certificate CERT --oms-certificate-chain CA])
    serving keygen PREFIX [--kek | --oms]
    serving predict REF --input JSON
    serving import mlflow URI [--name N] [--alias A] [--sync [--interval S] [--max-polls N]]
    serving import git REPO --rev REV --path PATH --name N | serving import dvc REPO PATH --rev REV --name N
    serving convert REF (--to onnx | --quantize int8|fp16)
    serving serve [--port 8000] [--grpc-port 8001] ...   (HTTP and gRPC serving, see serving.server)

Every verb takes ``--store URI`` (overrides ``SERVING_STORE``) and ``--json``.
A :class:`~serving.errors.ServingError` ends the process with the error's
``exit_code`` and one line on stderr, ``serving: error: <message>``; usage
errors exit 2 (argparse). A traceback means a bug, never a user mistake.

One module per command group, each declaring its parsers beside what they run:
:mod:`.versions` (publish, versions, sign, keygen), :mod:`.alias` (alias, rollback,
rollout), :mod:`.cache` (pull, verify), :mod:`.predict`, :mod:`.importers`
(import mlflow, git, dvc), :mod:`.convert` and :mod:`.serve`; :mod:`.options` declares every option that
more than one command takes, and :mod:`.context` is what each command gets.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from serving.cli import alias, cache, convert, importers, predict, serve, versions
from serving.cli.context import PROG, Context
from serving.cli.options import Commands, add_common_options
from serving.errors import ServingError
from serving.manifest import ModelRef

__all__ = ["ModelRef", "build_parser", "main"]
# NOTE: ModelRef stays importable from here, as from the single-module CLI (tests use it).

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; ``--store`` and ``--json`` go before or after the verb."""
    from serving import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Publish immutable, digest-checked model versions, move aliases, pull and predict.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_common_options(parser, before_verb=True)
    commands = Commands(parser.add_subparsers(dest="verb", metavar="VERB", required=True))
    # NOTE: in this order in `serving --help`.
    versions.add_publish(commands)
    versions.add_versions(commands)
    alias.add_alias(commands)
    alias.add_rollout(commands)
    alias.add_rollback(commands)
    cache.add_pull(commands)
    cache.add_verify(commands)
    versions.add_sign(commands)
    versions.add_keygen(commands)
    predict.add_predict(commands)
    importers.add_import(commands)
    convert.add_convert(commands)
    serve.add_serve(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    # NOTE: errors end as the one `serving: error:` line; library warnings that repeat
    # them (a refused version, an offline fallback) would make two, so only with -v.
    level = logging.INFO if args.verbose else logging.CRITICAL
    logging.basicConfig(level=level, format=f"{PROG}: %(levelname)s: %(message)s")
    ctx = Context(store=args.store, as_json=args.as_json)
    try:
        code = int(args.func(ctx, args) or 0)
        # NOTE: here, not at the interpreter's exit, so a reader that left is caught below.
        sys.stdout.flush()
        return code
    except ServingError as exc:
        message = " ".join(str(exc).split())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # NOTE: the reader left (`serving predict ... | head`): quiet, as a tool killed by SIGPIPE,
        # and stdout aimed at /dev/null so the interpreter's last flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return SIGPIPE_EXIT


SIGPIPE_EXIT = 141
"""The exit code when stdout's reader left early: 128 + SIGPIPE, as a shell reports such a tool."""
