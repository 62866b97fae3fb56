"""Every option that more than one command takes, declared once, and what reads it back.

A command module asks for an option group (:func:`add_alias_signing`,
:func:`add_encode_options`, ...) instead of repeating its ``add_argument`` calls,
and turns the parsed values into objects with the reader beside it
(:func:`alias_writer`, :func:`encode_options`, :func:`signing_key`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.cli.context import load_json
from serving.errors import InvalidRequest
from serving.manifest import TensorSpec

if TYPE_CHECKING:
    from serving.cli.context import Context
    from serving.encoding import EncodeOptions
    from serving.repository import AliasWriter
    from serving.signing import SigningKey

log = logging.getLogger(__name__)

Handler = Callable[["Context", argparse.Namespace], "int | None"]
"""What a command runs: its exit code, or None for 0."""


# -- the options every command takes ------------------------------------------------------
_COMMON: list[tuple[tuple[str, ...], dict[str, Any], Any, str]] = [
    (("--store",), {}, None, "store URI (path, file:// or s3://); default $SERVING_STORE"),
    (("--json",), {"dest": "as_json", "action": "store_true"}, False, "machine-readable output"),
    (("-v", "--verbose"), {"action": "store_true"}, False, "log warnings and progress details to stderr"),
]


def add_common_options(parser: argparse.ArgumentParser, *, before_verb: bool) -> None:
    """``--store``, ``--json`` and ``-v``: accepted before the verb and after it.

    Before the verb they are hidden and carry the defaults; after it they are in the
    verb's help with no default (SUPPRESS), so a verb's unset option does not
    overwrite a value given before the verb.
    """
    for flags, kwargs, default, text in _COMMON:
        if before_verb:
            parser.add_argument(*flags, **kwargs, default=default, help=argparse.SUPPRESS)
        else:
            parser.add_argument(*flags, **kwargs, default=argparse.SUPPRESS, help=text)


class Commands:
    """Adds commands that all take the common options; :meth:`group` nests them (``alias set``)."""

    def __init__(
        self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser], *, describe: bool = True
    ) -> None:
        self._subparsers = subparsers
        self._describe = describe
        self._common = argparse.ArgumentParser(add_help=False)
        add_common_options(self._common, before_verb=False)

    def add(self, name: str, func: Handler, help: str) -> argparse.ArgumentParser:
        """The parser of command ``name``, which runs ``func``; ``help`` also describes it."""
        description = help if self._describe else None
        parser = self._subparsers.add_parser(name, parents=[self._common], help=help, description=description)
        parser.set_defaults(func=func)
        return parser

    def group(self, name: str, help: str, *, dest: str, metavar: str) -> Commands:
        """A command whose first argument is one of the commands added to the returned group."""
        parser = self.add(name, _needs_a_subcommand, help)
        return Commands(parser.add_subparsers(dest=dest, metavar=metavar, required=True), describe=False)


def _needs_a_subcommand(ctx: Context, args: argparse.Namespace) -> None:
    """Never runs: argparse requires the group's subcommand first."""


# -- positionals ---------------------------------------------------------------------------
def add_name_alias(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME")
    parser.add_argument("alias", metavar="ALIAS")


def add_ref(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref", metavar="REF", help="NAME@ALIAS, NAME:VERSION or NAME (= NAME@production)")


# -- signing and encoding ------------------------------------------------------------------
def add_signing_key(parser: argparse.ArgumentParser, help: str) -> None:
    """``--signing-key PATH`` (alias ``--sign-key``); ``help`` says what it signs."""
    parser.add_argument("--signing-key", "--sign-key", dest="signing_key", metavar="PATH", help=help)


def add_alias_signing(parser: argparse.ArgumentParser) -> None:
    """``--signing-key`` and ``--expires-in`` of a command that moves an alias (see :func:`alias_writer`)."""
    add_signing_key(
        parser, "Ed25519 private key (PEM): sign the alias move (rollback protection, see SECURITY.md)"
    )
    parser.add_argument(
        "--expires-in",
        type=int,
        metavar="SECONDS",
        help="the signed alias expires after this many seconds (freeze protection); re-sign before then",
    )


def add_encode_options(
    parser: argparse.ArgumentParser,
    *,
    compress: str = "store files compressed (default zstd); pulls decompress transparently",
    encrypt: str = "encrypt files client-side with the configured key (SERVING_ENCRYPTION_*)",
    encrypt_key: str = "encrypt files client-side with this key file (serving keygen PREFIX --kek)",
) -> None:
    """``--compress``, ``--encrypt`` and ``--encrypt-key`` (the help of each may be shorter); read by
    :func:`encode_options`."""
    parser.add_argument("--compress", nargs="?", const="zstd", choices=["zstd", "gzip"], help=compress)
    parser.add_argument("--encrypt", action="store_true", help=encrypt)
    parser.add_argument("--encrypt-key", metavar="FILE", help=encrypt_key)


def signing_key(path: str | None) -> SigningKey | None:
    if path is None:
        return None
    from serving.signing import load_signing_key

    return load_signing_key(path)


def alias_writer(args: argparse.Namespace) -> tuple[AliasWriter | None, str | None]:
    """``--signing-key`` and ``--expires-in``: how an alias move is signed (SECURITY.md)."""
    expires_at = None
    if args.expires_in is not None:
        if args.signing_key is None:
            raise InvalidRequest("--expires-in needs --signing-key: only a signed alias can expire")
        from datetime import UTC, datetime, timedelta

        when = datetime.now(UTC) + timedelta(seconds=args.expires_in)
        expires_at = when.isoformat(timespec="seconds")
    key = signing_key(args.signing_key)
    if key is None:
        return None, None
    from serving.signing import alias_signer

    return alias_signer(key), expires_at


def encode_options(ctx: Context, args: argparse.Namespace) -> EncodeOptions | None:
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


# -- value types ---------------------------------------------------------------------------
def _parse(text: str, convert: Callable[[str], Any], what: str) -> Any:
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def _number(text: str) -> float:
    value: float = _parse(text, float, "a number")
    if value != value:  # NOTE: NaN
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    return value


def positive_float(text: str) -> float:
    value: float = _parse(text, float, "a number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def positive_int(text: str) -> int:
    value: int = _parse(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _between_0_and(top: int, what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = _number(text)
        if not 0 <= value <= top:
            raise argparse.ArgumentTypeError(f"{text!r} must be {what} between 0 and {top}")
        return value

    return parse


percent = _between_0_and(100, "a percentage")
fraction = _between_0_and(1, "a fraction")


def steps(text: str) -> list[float]:
    """``5,25,50,100``: canary weights, as :func:`serving.rollout.valid_steps` accepts them."""
    from serving.rollout import valid_steps

    weights = [percent(part.strip()) for part in text.split(",") if part.strip()]
    if not valid_steps(weights):
        raise argparse.ArgumentTypeError(f"{text!r}: give increasing weights above 0, e.g. 5,25,50,100")
    return weights


def add_publish_options(parser: argparse.ArgumentParser) -> None:
    """What a new version is published with (``serving publish``, ``serving import git``)."""
    parser.add_argument("--version", help="version to publish (default: the next integer)")
    parser.add_argument("--format", help="artifact format (default: detected from content and extension)")
    parser.add_argument("--alias", help="move this alias to the new version once it is published")
    parser.add_argument("--example", metavar="JSON", help="example input rows (JSON, @file or -)")
    parser.add_argument(
        "--inputs", metavar="JSON", help="input schema: [{name, datatype, shape}] (JSON or @file)"
    )
    parser.add_argument(
        "--outputs", metavar="JSON", help="output schema: [{name, datatype, shape}] (JSON or @file)"
    )
    add_signing_key(
        parser, "Ed25519 private key (PEM): write manifest.sig before the manifest (see SECURITY.md)"
    )
    add_encode_options(parser)
    parser.add_argument(
        "--oms-signature",
        metavar="FILE",
        help="an OpenSSF model signature of these files (model_signing sign ...), stored with the version",
    )
    parser.add_argument(
        "--metadata", metavar="KEY=VALUE", action="append", default=[], help="free-form metadata (repeatable)"
    )


def publish_options(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`serving.publish.publish_path`'s keywords from :func:`add_publish_options`' flags."""
    return {
        "version": args.version,
        "format": args.format,
        "alias": args.alias,
        "inputs": _tensor_specs(args.inputs, "--inputs"),
        "outputs": _tensor_specs(args.outputs, "--outputs"),
        "example": load_json(args.example, "--example") if args.example is not None else None,
        "metadata": key_values(args.metadata, "--metadata"),
        "progress": ctx.progress,
        "signing_key": signing_key(args.signing_key),
        "encode": encode_options(ctx, args),
        "oms_signature": oms_signature(args.oms_signature),
    }


def oms_signature(path: str | None) -> bytes | None:
    """The bytes of ``--oms-signature FILE`` (checked at load against the trust policy, not here)."""
    if path is None:
        return None
    from serving.oms import OMS_MAX_BYTES

    try:
        with open(path, "rb") as f:
            raw = f.read(OMS_MAX_BYTES + 1)
    except OSError as exc:
        raise InvalidRequest(f"--oms-signature: cannot read {path}: {exc.strerror}") from None
    if len(raw) > OMS_MAX_BYTES:
        raise InvalidRequest(f"--oms-signature: {path} is over {OMS_MAX_BYTES} bytes; not an OMS signature")
    return raw


def _tensor_specs(text: str | None, what: str) -> list[TensorSpec] | None:
    if text is None:
        return None
    from pydantic import ValidationError

    raw = load_json(text, what)
    if not isinstance(raw, list):
        raise InvalidRequest(f"{what} must be a JSON list of {{name, datatype, shape}} objects")
    try:
        return [TensorSpec.model_validate(item) for item in raw]
    except ValidationError as exc:
        raise InvalidRequest(f"{what}: {exc.errors()[0]['msg']}") from exc


LINEAGE_KEYS = ("source", "derived_from")
"""Metadata that ``serving import`` and ``serving convert`` write; ``--metadata`` cannot set it."""


def key_values(pairs: Sequence[str], what: str) -> dict[str, str]:
    """``--metadata KEY=VALUE`` pairs; the lineage keys are refused (only the tools write them)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"{what} {pair!r} is not KEY=VALUE")
        if key in LINEAGE_KEYS:
            raise InvalidRequest(
                f"{what}: {key!r} is written by serving import and serving convert, not by hand"
            )
        out[key] = value
    return out
