"""``serving predict``: load a version in this process and print its predictions."""

from __future__ import annotations

import argparse
import json
import logging

from serving.cli.context import Context, json_default, load_json
from serving.cli.options import Commands, add_ref
from serving.errors import InvalidInput
from serving.manifest import ModelRef

log = logging.getLogger(__name__)


def add_predict(commands: Commands) -> None:
    p = commands.add("predict", predict, "load a version in-process and print its predictions as JSON")
    add_ref(p)
    p.add_argument(
        "--input",
        required=True,
        metavar="JSON",
        help="rows for a single-input model, or {name: rows}; JSON, @file or - for stdin",
    )


def predict(ctx: Context, args: argparse.Namespace) -> None:
    import numpy as np

    from serving.formats import load_predictor
    from serving.formats.base import numpy_dtype
    from serving.trust import check_trust

    body = load_json(args.input, "--input")
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
    print(json.dumps(result, default=json_default))
