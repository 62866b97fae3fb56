"""A real Prometheus server for tests: Debian's ``prometheus`` binary, scraping on loopback.

Example:
    >>> binary = find_prometheus()  # doctest: +SKIP
    >>> scrape = [{"job_name": "x", "static_configs": [{"targets": ["127.0.0.1:9090"]}]}]
    >>> with run_prometheus(binary, work, scrape) as prom:  # doctest: +SKIP
    ...     prom.value("sum(ray_serving_requests_total)")
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from serving.testing.poll import wait_for
from serving.testing.process import stop_process
from serving.testing.s3 import free_port

__all__ = ["Prometheus", "dashboard_exprs", "find_prometheus", "grafana_instantiate", "run_prometheus"]


def find_prometheus() -> str | None:
    """``$PROMETHEUS``, else ``prometheus`` on the PATH (``apt-get install prometheus``)."""
    return os.environ.get("PROMETHEUS") or shutil.which("prometheus")


@dataclass
class Prometheus:
    base: str
    process: subprocess.Popen[bytes]
    log: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector; fails if Prometheus cannot evaluate ``expr``."""
        body = httpx.get(f"{self.base}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The first sample's value, or None for an empty result."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def by(self, expr: str, label: str) -> dict[str, float]:
        """Each sample's value keyed by ``label``."""
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}


@contextlib.contextmanager
def run_prometheus(
    binary: str, work: Path, scrape_configs: list[dict[str, Any]], interval: str = "1s"
) -> Iterator[Prometheus]:
    """Start Prometheus on a free loopback port with these scrape configs; stop it on exit."""
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": scrape_configs,
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    cmd = [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}"]
    cmd += [f"--web.listen-address=127.0.0.1:{port}"]
    log = work / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"prometheus exited {process.returncode}: {log.read_text()[-2000:]}")
            return httpx.get(f"{prom.base}/-/ready", timeout=2).status_code == 200

        wait_for(ready, what="prometheus to be ready")
        yield prom
    finally:
        stop_process(process)


def dashboard_exprs(path: Path, prefix: str = "ray_serving_") -> list[str]:
    """Every panel and variable query in a Grafana dashboard JSON that names a ``prefix`` series."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query") and isinstance(value, str) and prefix in value:
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(path.read_text()))
    return found


def grafana_instantiate(expr: str, namespace: str, model: str, rate_interval: str = "30s") -> str:
    """A panel's query as Grafana sends it once a user picks ``namespace`` and ``model``."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace('=~"$namespace"', f'=~"{namespace}"')
        .replace('=~"$model"', f'=~"{model}"')
    )
