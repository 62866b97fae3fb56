"""The seed's example model: iris, LogisticRegression, published with ``serving.save``.

``make serve`` runs ``python -m serving.demo --if-empty`` first, so a fresh
store has ``iris`` version 1 with ``production`` pointing at it::

    python -m serving.demo --if-empty                            # iris:1, iris@production -> 1
    python -m serving.demo --publish-next --C 0.01 --alias production   # iris:2, the alias moves

Version 2 trained with a much smaller ``C`` (stronger regularisation) answers the
same class for the example row with visibly different probabilities, which makes
a hot swap easy to see.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from serving.errors import ServingError

NAME = "iris"
EXAMPLE = [[5.1, 3.5, 1.4, 0.2]]
"""The seed's example row; the model answers class 0 (setosa)."""


def train(c: float = 1.0) -> Any:
    """LogisticRegression on the iris data set, as in the seed."""
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    return LogisticRegression(max_iter=200, C=c).fit(x, y)


def publish(
    store: str | None = None,
    *,
    name: str = NAME,
    version: str | None = None,
    alias: str | None = None,
    c: float = 1.0,
    if_empty: bool = False,
) -> str | None:
    """Train and publish one iris version; returns it, or None when ``if_empty`` found one.

    Raises:
        VersionExists: ``version`` is already published.
    """
    import serving

    if if_empty:
        from serving.repository import Repository
        from serving.settings import get_settings
        from serving.store import open_store

        settings = get_settings(store=store)
        existing = Repository(open_store(settings.store, settings)).list_versions(name)
        if existing:
            print(f"{name} already has versions {', '.join(existing)} in {settings.store}; nothing to do")
            return None
    manifest = serving.save(
        train(c),
        name,
        version=version,
        store=store,
        alias=alias,
        example=EXAMPLE,
        metadata={"trained_by": "serving.demo", "C": c, "dataset": "sklearn.datasets.load_iris"},
    )
    line = f"published {manifest.name}:{manifest.version} (LogisticRegression, C={c})"
    if alias:
        line += f"; {manifest.name}@{alias} -> {manifest.version}"
    print(line)
    return manifest.version


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.demo", description="Publish the seed's iris example model."
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--if-empty",
        action="store_true",
        help="publish version 1 with alias production, only if the store has no iris model",
    )
    mode.add_argument("--publish-next", action="store_true", help="publish the next version")
    parser.add_argument("--store", help="store URI (default: $SERVING_STORE)")
    parser.add_argument("--name", default=NAME, help="model name (default: %(default)s)")
    parser.add_argument(
        "--version", "--version-tag", dest="version", help="version to publish (default: the next integer)"
    )
    parser.add_argument("--alias", help="alias to move to the new version (--if-empty: production)")
    parser.add_argument("--C", dest="c", type=float, default=1.0, help="inverse regularisation strength")
    args = parser.parse_args(argv)
    alias = args.alias or ("production" if args.if_empty else None)
    version = args.version or ("1" if args.if_empty else None)
    try:
        publish(args.store, name=args.name, version=version, alias=alias, c=args.c, if_empty=args.if_empty)
    except ServingError as exc:
        print(f"serving: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
