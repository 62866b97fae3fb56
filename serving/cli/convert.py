"""``serving convert REF --to onnx``: a version converted to ONNX, checked against its source, and
published as a new version (:mod:`serving.convert`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from serving.cli.context import Context, alias_text, version_text
from serving.cli.options import (
    Commands,
    add_encode_options,
    add_signing_key,
    encode_options,
    key_values,
    signing_key,
)
from serving.errors import InvalidRequest


def add_convert(commands: Commands) -> None:
    c = commands.add(
        "convert",
        convert,
        "convert a version to ONNX, check it against the source, and publish it as a new version",
    )
    c.add_argument("ref", metavar="REF", help="the source: NAME:VERSION or NAME@ALIAS")
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--to", choices=["onnx"], help="convert to this format")
    what.add_argument(
        "--quantize", choices=["int8", "fp16"], help="quantize an ONNX version (int8: dynamic, fp16: weights)"
    )
    c.add_argument(
        "--validation-data",
        metavar="FILE",
        help="rows (.npy or .csv) both must answer alike, besides the manifest's example",
    )
    c.add_argument(
        "--tolerance",
        type=_tolerance,
        default=1e-4,
        help="--to: the largest score difference allowed (default 1e-4); labels must agree on every row",
    )
    c.add_argument(
        "--max-accuracy-drop",
        type=_tolerance,
        default=0.01,
        help="--quantize: the largest share of rows whose label may change (default 0.01)",
    )
    c.add_argument("--version", help="version to publish (default: the next integer)")
    c.add_argument("--alias", help="move this alias to the new version once it is published")
    add_signing_key(c, "Ed25519 private key (PEM): sign the new version")
    add_encode_options(c)
    c.add_argument(
        "--metadata", metavar="KEY=VALUE", action="append", default=[], help="free-form metadata (repeatable)"
    )


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a finite number >= 0")
    return value


def convert(ctx: Context, args: argparse.Namespace) -> None:
    from serving import convert as conversions

    validation = (
        conversions.read_validation_data(Path(args.validation_data)) if args.validation_data else None
    )
    if "@" not in args.ref and ":" not in args.ref:
        raise InvalidRequest(f"{args.ref!r}: name the source as NAME:VERSION or NAME@ALIAS")
    publish = {
        "version": args.version,
        "alias": args.alias,
        "metadata": key_values(args.metadata, "--metadata"),
        "signing_key": signing_key(args.signing_key),
        "encode": encode_options(ctx, args),
        "progress": ctx.progress,
    }
    where = (ctx.repo, ctx.cache, ctx.settings, args.ref)
    if args.quantize:
        manifest, derived = conversions.quantize(
            *where, args.quantize, validation=validation, max_accuracy_drop=args.max_accuracy_drop, **publish
        )
        m = derived.measured
        told = (
            f"quantized {manifest.name}:{derived.version} to {args.quantize} as {version_text(manifest)}: "
            f"{m['rows_checked']} rows checked, accuracy drop {m['accuracy_drop']:.3g} (at most "
            f"{m['max_accuracy_drop']:g}), largest score change {m['max_score_change']:.3g}, "
            f"size x{m['size_ratio']:.2f}, latency x{m['latency_ratio']:.2f}"
        )
    else:
        manifest, derived = conversions.convert(
            *where, to=args.to, validation=validation, tolerance=args.tolerance, **publish
        )
        m = derived.measured
        told = (
            f"converted {manifest.name}:{derived.version} with {derived.converter} "
            f"{derived.converter_version} to {version_text(manifest)}: {m['rows_checked']} rows checked, "
            f"largest score difference {m['max_error']:.3g} (tolerance {m['tolerance']:g})"
            + (f"; not converted: {', '.join(m['left_out'])}" if m["left_out"] else "")
            + (
                ""
                if m["validation_rows"]
                else "; no --validation-data: checked on the example and rows made from it"
            )
        )
    ctx.emit(
        told + alias_text(manifest, args.alias),
        {
            "name": manifest.name,
            "version": manifest.version,
            "format": manifest.format,
            "alias": args.alias,
            "derived_from": derived.as_metadata(),
        },
    )
