"""A Ray cluster of several nodes on one machine, token auth on, for the cluster tests.

``multi_node_cluster()`` starts ``ray start --head --block`` and one
``ray start --address … --block`` per worker node, each in its own process group
(so a test can kill a whole node: raylet, object store, workers, HAProxy), each
with its own custom resource (``node_<name>``), CPUs, metrics export port, temp
dir and serving cache folder (``SERVING_CACHE_DIR`` in the node's environment,
which its workers inherit). Every port is chosen free on loopback; nothing is
shared with another Ray on the machine, and ``ray stop`` is never run.

Token authentication is on, with a token of the cluster's own: the head, the
worker nodes and the driver get ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN``
(the token in ``~/.ray/auth_token``, if any, is neither read nor written).
A node or driver without the token is refused (``InvalidAuthToken``).

Serve runs in :data:`serving.server.launch.FAST_PATH_ENV` (HAProxy, direct ingress)
with a proxy (an HAProxy) on every node, as the chart runs it. Every node here
has the same IP, so each worker node's proxy gets a port of its own
(``RAY_SERVE_WORKER_PROXY_HTTP_PORT``, and its own HAProxy stats and metrics
ports); the head's is ``MultiNodeCluster.http``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from serving.testing.s3 import HOST, free_port

HEALTH_CHECK_ENV = {
    # NOTE: the GCS marks a silent raylet dead after period * threshold (default 3 s * 5);
    # shorter here so a killed node is noticed in about 2 s.
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "4",
}
METRICS_ENV = {"RAY_metrics_report_interval_ms": "500"}
WORKER_PORTS = 40
"""Worker ports per node (one per worker process: replicas, controller, tasks)."""


@dataclass
class Node:
    """One ``ray start`` process and what it was given."""

    name: str
    head: bool
    num_cpus: int
    metrics_port: int
    http_port: int
    """The port of the Serve proxy (HAProxy) on this node."""
    cache_dir: Path
    temp_dir: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    node_id: str = ""

    @property
    def resource(self) -> str:
        """The node's custom resource (1 unit); ``{resource: 0.01}`` pins an actor here."""
        return f"node_{self.name}"

    @property
    def metrics(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    @property
    def http(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class MultiNodeCluster:
    """A running cluster: its address, token, nodes, and Serve's HTTP base URL once started."""

    address: str
    token: str
    env: dict[str, str]
    """What every node and the driver run with (auth, fast path, HAProxy ports)."""
    nodes: dict[str, Node] = field(default_factory=dict)
    http: str = ""

    @property
    def head(self) -> Node:
        return next(n for n in self.nodes.values() if n.head)

    def kill(self, name: str) -> float:
        """SIGKILL a node's whole process group (no graceful drain); returns when it was killed."""
        node = self.nodes[name]
        assert node.process is not None
        killed_at = time.monotonic()
        _kill_group(node.process, signal.SIGKILL)
        return killed_at


_EPHEMERAL_LOW = 32768
"""Linux's default lowest ephemeral port: outgoing connections take ports from there up."""
_taken: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _EPHEMERAL_LOW


def _port() -> int:
    """A free port below the ephemeral range, not handed out before in this process.

    NOTE: a port from the ephemeral range (what binding port 0 gives) may be taken by any
    outgoing connection on the machine in the minute between picking it and Ray binding it;
    seen with HAProxy's HTTP port on a busy machine. Below the range, only a process that
    binds a port on purpose takes it.
    """
    import random

    for _ in range(500):
        # NOTE: 30000-31000 is Serve's direct-ingress range (replicas of every Ray here).
        port = random.randrange(26000, min(_ephemeral_low(), 30000))  # noqa: S311 -- NOTE: not a secret
        if port not in _taken and _bindable(port):
            _taken.add(port)
            return port
    return free_port()


def _port_range(count: int) -> tuple[int, int]:
    """``count`` consecutive free ports below :func:`_port`'s (for a node's workers)."""
    import random

    for _ in range(200):
        low = random.randrange(20000, 26000 - count)  # noqa: S311 -- NOTE: a port, not a secret
        span = range(low, low + count)
        if not _taken.intersection(span) and all(_bindable(p) for p in span):
            _taken.update(span)
            return low, low + count - 1
    raise RuntimeError(f"no {count} free consecutive ports")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _ray_cli() -> str:
    found = Path(sys.executable).with_name("ray")
    return str(found) if found.exists() else (shutil.which("ray") or "ray")


def _kill_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _start_node(cluster: MultiNodeCluster, node: Node, resources: Mapping[str, float]) -> None:
    low, high = _port_range(WORKER_PORTS)
    cmd = [_ray_cli(), "start", "--block", "--disable-usage-stats", "--node-ip-address", HOST]
    if node.head:
        cmd += ["--head", "--port", str(cluster.address.rsplit(":", 1)[1]), "--include-dashboard=false"]
        cmd += ["--dashboard-port", str(_port())]
        cmd += ["--ray-client-server-port", str(_port())]
    else:
        cmd += ["--address", cluster.address]
    cmd += ["--num-cpus", str(node.num_cpus), "--resources", json.dumps(dict(resources))]
    cmd += ["--object-store-memory", str(80 * 1024 * 1024)]
    cmd += ["--temp-dir", str(node.temp_dir), "--metrics-export-port", str(node.metrics_port)]
    cmd += ["--node-manager-port", str(_port()), "--object-manager-port", str(_port())]
    cmd += ["--min-worker-port", str(low), "--max-worker-port", str(high)]
    cmd += ["--dashboard-agent-listen-port", str(_port())]
    cmd += ["--dashboard-agent-grpc-port", str(_port())]
    cmd += ["--runtime-env-agent-port", str(_port())]
    env = {
        **os.environ,
        **cluster.env,
        "SERVING_CACHE_DIR": str(node.cache_dir),
        # NOTE: HAProxy's fixed stats/metrics ports would clash between nodes (and other Rays).
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_port()),
    }
    if not node.head:
        env["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] = str(node.http_port)
    env.pop("RAY_ADDRESS", None)
    with node.log.open("wb") as log:
        # NOTE: its own session, so killpg reaches the raylet and every worker it started.
        node.process = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_nodes(cluster: MultiNodeCluster, count: int, timeout: float) -> list[dict[str, Any]]:
    import ray

    deadline = time.monotonic() + timeout
    alive: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        for node in cluster.nodes.values():
            if node.process is not None and node.process.poll() is not None:
                raise RuntimeError(f"ray start for node {node.name} exited: {node.log.read_text()[-3000:]}")
        alive = [n for n in ray.nodes() if n["Alive"]]  # type: ignore[no-untyped-call]  # NOTE: untyped
        if len(alive) >= count:
            return alive
        time.sleep(0.2)
    raise RuntimeError(f"only {len(alive)} of {count} nodes joined in {timeout}s")


@dataclass
class RequestLoop:
    """Requests one after another on one keep-alive connection, each recorded; bounded in time.

    ``send`` makes one request and says how it went: ``"ok…"``, or what failed. An HTTP
    error (a connection the killed node dropped) is recorded as its type and message.
    """

    send: Callable[[httpx.Client], str]
    max_s: float
    timeout_s: float = 5.0
    stamp_sent: bool = False
    """Record each request at the time it was sent; False: when it was answered."""
    results: list[tuple[float, str]] = field(default_factory=list)
    """(monotonic time, the outcome)."""
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        deadline = time.monotonic() + self.max_s
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self.stop.is_set() and time.monotonic() < deadline:
                sent = time.monotonic()
                try:
                    outcome = self.send(client)
                except httpx.HTTPError as exc:
                    outcome = f"{type(exc).__name__}: {exc}"[:120]
                self.results.append((sent if self.stamp_sent else time.monotonic(), outcome))

    def failures(self, since: float = 0.0, until: float = float("inf")) -> list[tuple[float, str]]:
        return [(t, o) for t, o in self.results if since <= t < until and not o.startswith("ok")]


@contextlib.contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set ``values`` in this process's environment; put back what was there on exit."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def multi_node_cluster(
    workers: Mapping[str, int] | None = None,
    head_cpus: int = 2,
    serve_http: bool = True,
    proxy_location: str = "EveryNode",
) -> Iterator[MultiNodeCluster]:
    """Start a head and worker nodes (name: CPUs), connect this process, start Serve; stop all on exit.

    Nodes are named ``head`` and the ``workers`` keys (default ``a`` and ``b``).
    Logical CPUs may exceed the machine's cores; replicas ask for fractions.
    """
    from serving.server.launch import FAST_PATH_ENV
    from serving.server.process import end_haproxy

    workers = dict(workers or {"a": 2, "b": 2})
    root = Path(tempfile.mkdtemp(prefix="srvc-"))  # NOTE: short: Ray's unix socket paths must fit 107 bytes
    token = secrets.token_hex(32)
    env = {
        **FAST_PATH_ENV,
        **HEALTH_CHECK_ENV,
        **METRICS_ENV,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    }
    cluster = MultiNodeCluster(address=f"{HOST}:{_port()}", token=token, env=env)
    names = [("head", head_cpus, True), *((name, cpus, False) for name, cpus in workers.items())]
    for name, cpus, head in names:
        node_dir = root / name
        node_dir.mkdir()
        cluster.nodes[name] = Node(
            name=name,
            head=head,
            num_cpus=cpus,
            metrics_port=_port(),
            http_port=_port(),
            cache_dir=node_dir / "cache",
            temp_dir=node_dir / "ray",
            log=node_dir / "ray-start.log",
        )
    import ray

    try:
        with environ(env):
            _start_node(cluster, cluster.head, {cluster.head.resource: 1})
            _wait_head(cluster, timeout=90)
            _use_token_here()
            for node in cluster.nodes.values():
                if not node.head:
                    _start_node(cluster, node, {node.resource: 1})
            ray.init(address=cluster.address, namespace="serving", log_to_driver=False)
            joined = _wait_nodes(cluster, len(cluster.nodes), timeout=120)
            for info in joined:
                for node in cluster.nodes.values():
                    if info["Resources"].get(node.resource):
                        node.node_id = info["NodeID"]
            if serve_http:
                from ray import serve

                serve.start(
                    proxy_location=proxy_location,
                    http_options={"host": HOST, "port": cluster.head.http_port},
                )
                cluster.http = cluster.head.http
            yield cluster
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        _stop(cluster)
        end_haproxy(n.node_id for n in cluster.nodes.values())
        shutil.rmtree(root, ignore_errors=True)


def _use_token_here() -> None:
    """Make this process (the driver) read the auth mode and token from the environment now."""
    # NOTE: Ray reads RAY_AUTH_MODE into its config, and the token into a cache, once per
    # process; refreshed here because Ray may have been imported (and used) before.
    from ray._raylet import (  # type: ignore[attr-defined]  # NOTE: compiled, no stubs
        AuthenticationTokenLoader,
        Config,
    )

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _wait_head(cluster: MultiNodeCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    head = cluster.head
    while time.monotonic() < deadline:
        if not head.alive:
            raise RuntimeError(f"ray start --head exited: {head.log.read_text()[-3000:]}")
        if "Ray runtime started" in head.log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the head did not start in {timeout}s: {head.log.read_text()[-3000:]}")


def _stop(cluster: MultiNodeCluster) -> None:
    """Stop worker nodes then the head: SIGTERM each group (``ray start --block`` stops its
    processes), then SIGKILL what is left after a grace period."""
    order = [n for n in cluster.nodes.values() if not n.head] + [cluster.head]
    started = [n for n in order if n.process is not None]
    for node in started:
        assert node.process is not None
        _kill_group(node.process, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for node in started:
        assert node.process is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
    for node in started:
        assert node.process is not None
        # NOTE: whatever is left in the group (workers outliving ray start) goes too.
        _kill_group(node.process, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.process.wait(timeout=5)
