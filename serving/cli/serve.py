"""``serving serve``: the HTTP and gRPC serving layer, in the foreground (:mod:`serving.server.launch`)."""

from __future__ import annotations

import argparse
import logging

from serving.cli.context import Context
from serving.cli.options import Commands
from serving.errors import MissingExtra

log = logging.getLogger(__name__)


def add_serve(commands: Commands) -> None:
    from serving.server import launch

    p = commands.add("serve", serve, "run the HTTP and gRPC serving layer (Ray Serve) in the foreground")
    launch.add_arguments(p)


def serve(ctx: Context, args: argparse.Namespace) -> int:
    from serving.server import launch

    args.store = ctx.store
    try:
        return int(launch.main(args) or 0)
    except ModuleNotFoundError as exc:
        if not exc.name or exc.name.startswith("serving"):
            raise
        raise MissingExtra(
            f"'serving serve' needs {exc.name!r}: install the serve extra (pip install 'serving[serve]')"
        ) from exc
