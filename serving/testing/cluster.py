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
    """Serve's HTTP base URL (HAProxy in front of the replicas when ``haproxy``)."""
    metrics: str
    """The node's Prometheus endpoint."""


@contextlib.contextmanager
def local_cluster(num_cpus: int = 4, *, haproxy: bool = True) -> Iterator[Cluster]:
    """Start Ray and Serve on free loopback ports; shut both down on exit.

    ``haproxy`` runs Serve's HTTP ingress as the chart does (``RAY_SERVE_ENABLE_HA_PROXY=1``).
    The dashboard is off; metrics are flushed every half second so metric tests poll briefly.
    """
    import ray
    from ray import serve

    http_port, metrics_port = free_port(), free_port()
    previous = os.environ.get("RAY_SERVE_ENABLE_HA_PROXY")
    # NOTE: Ray's processes read it at start, from the environment they inherit.
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if haproxy else "0"
    try:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            namespace="serving",
            _metrics_export_port=metrics_port,
            _system_config={"metrics_report_interval_ms": 500},
            log_to_driver=False,
        )
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        yield Cluster(f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        if previous is None:
            os.environ.pop("RAY_SERVE_ENABLE_HA_PROXY", None)
        else:
            os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = previous
