"""The local Ray cluster the serve tests (and ``serving serve``) start runs with
Ray 2.60's token authentication on, and its metrics port still scrapes.

Both start their cluster with ``ray.init()``, which turns token auth on by default
for a new local cluster and writes the token to ``~/.ray/auth_token``; nothing here
may set ``RAY_AUTH_MODE=disabled`` to get there.
"""

from __future__ import annotations

import os

import httpx
import pytest

from .conftest import Cluster

pytestmark = pytest.mark.ray


def test_cluster_uses_token_auth_and_runs_tasks(cluster: Cluster) -> None:
    """Token mode is on in the driver, and a task runs on the cluster's workers."""
    import ray

    # NOTE: private module; Ray exposes the mode nowhere public in 2.60.
    from ray._private.authentication.authentication_token_setup import (
        AuthenticationMode,
        get_authentication_mode,
    )

    assert os.environ.get("RAY_AUTH_MODE", "token") == "token"
    assert get_authentication_mode() == AuthenticationMode.TOKEN

    @ray.remote(num_cpus=0)
    def answer() -> int:
        return 42

    assert ray.get(answer.remote(), timeout=60) == 42


def test_metrics_port_scrapes_without_the_token(cluster: Cluster) -> None:
    """Prometheus (the PodMonitor) needs no Ray token to scrape the metrics port."""
    assert httpx.get(cluster.metrics, timeout=10).status_code == 200
