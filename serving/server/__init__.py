"""``serving serve``: a local Ray instance and the app, in the foreground.

Built from the same :func:`serving.app.build_app` the Serve config and the Helm
chart use, so what runs here is what runs on the cluster.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import yaml

from serving.config import AppConfig
from serving.errors import InvalidRequest
from serving.manifest import ModelRef

log = logging.getLogger("serving.server")


def app_args_from(args: argparse.Namespace) -> dict[str, Any]:
    """Merge ``--config`` (a Serve config or bare app args) with ``--store`` and ``--model``."""
    app_args: dict[str, Any] = {}
    if args.config:
        try:
            doc = yaml.safe_load(Path(args.config).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidRequest(f"cannot read config {args.config}: {exc}") from exc
        if isinstance(doc, dict) and "applications" in doc:
            doc = doc["applications"][0].get("args", {})
        app_args = dict(doc or {})
    # NOTE: --store is the CLI's global option; absent when called without it.
    store = getattr(args, "store", None)
    if store:
        app_args["store"] = store
    if args.model:
        models = []
        for ref_text in args.model:
            ref = ModelRef.parse(ref_text)
            models.append({"name": ref.name, "alias": ref.alias, "version": ref.version})
        app_args["models"] = models
    app_args.setdefault("models", [{"name": "iris", "alias": "production"}])
    if args.poll_interval:
        app_args["poll_interval_s"] = args.poll_interval
    AppConfig.model_validate(app_args)  # fail fast, before Ray starts
    return app_args


def main(args: argparse.Namespace) -> int:
    if getattr(args, "standalone", False):
        from serving import standalone

        return standalone.main(args, app_args_from(args))
    import ray
    from ray import serve

    from serving.app import build_app
    from serving.logs import configure_logging

    configure_logging()
    app_args = app_args_from(args)
    ray.init(
        num_cpus=args.num_cpus,
        include_dashboard=False,
        _metrics_export_port=args.metrics_port,
        namespace="serving",
    )
    serve.start(http_options={"host": args.host, "port": args.port})
    log.info("serving on http://%s:%d, metrics on :%d/metrics", args.host, args.port, args.metrics_port)
    serve.run(build_app(app_args), name="serving", route_prefix="/", blocking=True)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="Serve config file (deploy/serve.yaml) or app args YAML")
    parser.add_argument("--model", action="append", help="REF to serve, e.g. iris@production (repeatable)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8080)
    parser.add_argument("--poll-interval", type=float, default=None, help="seconds between alias checks")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray instance")
    parser.add_argument(
        "--standalone", action="store_true", help="one process, no Ray (serving.standalone): uvicorn"
    )
    parser.add_argument("--workers", type=int, default=1, help="--standalone: uvicorn worker processes")
    parser.add_argument(
        "--predict",
        choices=("inline", "thread"),
        default="inline",
        help="--standalone: predict on the event loop (small models) or in worker threads",
    )
