"""A local Ray instance with Serve's HTTP ingress, for tests and benchmarks (imports Ray lazily)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from serving.testing.s3 import free_port


@dataclass(frozen=True)
class Cluster:
    http: str
    """Serve's HTTP base URL (HAProxy in front of the replicas)."""
    metrics: str
    """The node's Prometheus endpoint."""
    grpc: str = ""
    """Serve's gRPC address (``host:port``) for OIP over gRPC; empty when off."""


@contextlib.contextmanager
def local_cluster(num_cpus: int = 4, *, grpc: bool = True) -> Iterator[Cluster]:
    """Start Ray and Serve on free loopback ports, set up as the chart's pods are; stop both on exit.

    Ray runs with :data:`serving.server.launch.FAST_PATH_ENV` (HAProxy, replicas reporting
    ongoing requests to the autoscaler) and, with ``grpc``, Serve's gRPC ingress for OIP
    over gRPC (:func:`serving.server.grpc_options`). The dashboard is off; metrics are
    flushed every half second so metric tests poll briefly.
    """
    import ray
    from ray import serve

    from serving.server.launch import FAST_PATH_ENV, HAPROXY_PORT_ENV, KEEP_ALIVE_S, grpc_options
    from serving.server.process import end_haproxy

    http_port, metrics_port = free_port(), free_port()
    grpc_port = free_port() if grpc else 0
    env = {
        **FAST_PATH_ENV,
        # NOTE: HAProxy's fixed stats/metrics/fallback ports would clash with any other Ray on the machine.
        **{key: str(free_port()) for key in HAPROXY_PORT_ENV},
        # NOTE: behind HAProxy a deleted replica drains for 30 s by default; tests delete apps often.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    }
    previous = {key: os.environ.get(key) for key in env}
    # NOTE: Ray's processes read these at start, from the environment they inherit.
    os.environ.update(env)
    node_id = ""
    try:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            namespace="serving",
            _metrics_export_port=metrics_port,
            _system_config={"metrics_report_interval_ms": 500},
            log_to_driver=False,
        )
        node_id = ray.get_runtime_context().get_node_id()
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_port, "keep_alive_timeout_s": KEEP_ALIVE_S},
            grpc_options=grpc_options(grpc_port),
        )
        yield Cluster(
            f"http://127.0.0.1:{http_port}",
            f"http://127.0.0.1:{metrics_port}/metrics",
            f"127.0.0.1:{grpc_port}" if grpc_port else "",
        )
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()  # type: ignore[no-untyped-call]  # NOTE: untyped in Ray
        ray.shutdown()
        end_haproxy([node_id])
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
