"""A real Prometheus scrapes ``serving serve --standalone`` through a swap.

The test starts Debian's ``prometheus`` (or ``$PROMETHEUS``) on loopback with a
temporary storage dir and a 1 s scrape of the standalone server's metrics port, and
stops it afterwards. The scrape config renames ``serving_*`` to ``ray_serving_*`` and
adds ``namespace="ml"``, which is what Ray's node exporter and the PodMonitor give the
same metrics in a cluster, so the dashboard's and the alerts' PromQL run verbatim.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from test_standalone_process import Server, publish, start_server

from serving.repository import Repository, SetTarget
from serving.settings import Settings
from serving.store import open_store
from serving.testing.poll import wait_for
from serving.testing.prometheus import (
    Prometheus,
    dashboard_exprs,
    find_prometheus,
    grafana_instantiate,
    run_prometheus,
)

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = REPO_ROOT / "charts" / "serving" / "files" / "serving-dashboard.json"
NAMESPACE = "ml"
MODEL = "scraped"
_SERIES = re.compile(r"\bray_serving_[a-z_]+\b")


def _on_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _alert_exprs() -> list[str]:
    """The chart's alert expressions for namespace ml, when a helm binary is at hand."""
    spec = importlib.util.spec_from_file_location(
        "helm_binary", REPO_ROOT / "tests" / "helm" / "helm_binary.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        helm = module.find_helm()
    except module.HelmUnavailable as exc:
        if _on_ci():
            pytest.fail(f"no helm binary: {exc} (CI=true: required)")
        return []
    cmd = [str(helm), "template", "serving", str(REPO_ROOT / "charts" / "serving"), "--namespace", NAMESPACE]
    cmd += ["--api-versions", "monitoring.coreos.com/v1/PrometheusRule"]
    cmd += ["--show-only", "templates/prometheusrule.yaml"]
    rule = yaml.safe_load(subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout)
    return [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    found = find_prometheus()
    if not found:
        reason = "no prometheus binary (apt-get install prometheus, or set PROMETHEUS)"
        if _on_ci():
            pytest.fail(f"{reason} (CI=true: required)")
        pytest.skip(reason)
    return str(found)


@pytest.fixture(scope="module")
def serving_and_prometheus(
    prometheus_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Prometheus, Repository]]:
    root = tmp_path_factory.mktemp("store")
    work = tmp_path_factory.mktemp("work")
    repo = Repository(open_store(str(root), Settings(store=str(root))))
    publish(repo, work, MODEL, "1")
    publish(repo, work, MODEL, "2", c=0.01)
    repo.move_alias(MODEL, "production", SetTarget("1"))
    server = start_server(work, str(root), [MODEL], poll_s=0.2)
    try:
        wait_for(
            lambda: httpx.get(server.base + "/v2/health/ready", timeout=2).status_code == 200, what="ready"
        )
        target = server.metrics.removeprefix("http://").removesuffix("/metrics")
        scrape = [
            {
                "job_name": "serving",
                "static_configs": [{"targets": [target], "labels": {"namespace": NAMESPACE}}],
                "metric_relabel_configs": [
                    {
                        "source_labels": ["__name__"],
                        "regex": "serving_(.*)",
                        "target_label": "__name__",
                        "replacement": "ray_serving_$1",
                    }
                ],
            }
        ]
        with run_prometheus(prometheus_binary, work, scrape) as prom:
            yield server, prom, repo
    finally:
        server.stop()


def _predict(server: Server, n: int) -> None:
    for _ in range(n):
        reply = httpx.post(
            f"{server.base}/v2/models/{MODEL}/infer",
            json={
                "inputs": [
                    {"name": "input-0", "datatype": "FP64", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}
                ]
            },
            timeout=10,
        )
        assert reply.status_code == 200, reply.text


def test_prometheus_sees_every_dashboard_and_alert_series_after_a_swap(
    serving_and_prometheus: tuple[Server, Prometheus, Repository],
) -> None:
    """After requests on v1, a swap to v2 and requests on v2, Prometheus holds every
    series the dashboard and the alerts use that the standalone server exports, with
    the values the server reported; every dashboard and alert expression evaluates."""
    server, prom, repo = serving_and_prometheus
    _predict(server, 3)
    repo.move_alias(MODEL, "production", SetTarget("2"))
    live_v2 = f'serving_live_version_info{{model="{MODEL}",version="2"}} 1.0'
    wait_for(lambda: live_v2 in httpx.get(server.metrics, timeout=2).text, what="the swap to v2")
    _predict(server, 4)

    sel = f'namespace="{NAMESPACE}",model="{MODEL}"'
    wait_for(
        lambda: (
            prom.value(f"sum(ray_serving_requests_total{{{sel}}})") == 7
            and prom.value(f'ray_serving_live_version_info{{{sel},version="2"}}') == 1
        ),
        timeout=60,
        what="prometheus to scrape the swap and all 7 requests",
    )

    exported = {
        "ray_" + line.split("{")[0].split(" ")[0]
        for line in httpx.get(server.metrics, timeout=5).text.splitlines()
        if line.startswith("serving_")
    }
    used = {name for expr in dashboard_exprs(DASHBOARD) + _alert_exprs() for name in _SERIES.findall(expr)}
    checked = sorted(used & exported)
    core = {
        "ray_serving_requests_total",
        "ray_serving_request_duration_seconds_bucket",
        "ray_serving_live_version_info",
        "ray_serving_swaps_total",
        "ray_serving_alias_check_age_seconds",
        "ray_serving_alias_checks_total",
        "ray_serving_model_loads_total",
        "ray_serving_cache_bytes",
        "ray_serving_trust_checks_total",
    }
    assert core <= set(checked), f"not exported by the standalone server: {sorted(core - set(checked))}"
    missing = [name for name in checked if not prom.query(f'{name}{{namespace="{NAMESPACE}"}}')]
    assert not missing, f"exported but not in Prometheus: {missing}"

    # The values the dashboard panels show, as the server counted them.
    assert prom.value(f'sum(ray_serving_requests_total{{{sel},version="1"}})') == 3
    assert prom.value(f'sum(ray_serving_requests_total{{{sel},version="2"}})') == 4
    assert prom.value(f'ray_serving_live_version_info{{{sel},version="1"}}') == 0
    swaps = prom.value(f"sum(ray_serving_swaps_total{{{sel}}})")
    assert swaps is not None
    assert swaps >= 1
    assert prom.value(f'sum(ray_serving_model_loads_total{{{sel},outcome="success"}})') == 2
    assert prom.value(f"sum(ray_serving_request_duration_seconds_count{{{sel}}})") == 7
    age = prom.value(f"max(ray_serving_alias_check_age_seconds{{{sel}}})")
    assert age is not None
    assert 0 <= age < 30
    cache_bytes = prom.value(f'ray_serving_cache_bytes{{namespace="{NAMESPACE}"}}')
    assert cache_bytes is not None
    assert cache_bytes > 0

    for expr in dashboard_exprs(DASHBOARD):
        if expr.startswith("label_values("):
            continue
        prom.query(grafana_instantiate(expr, NAMESPACE, MODEL))  # NOTE: asserts Prometheus evaluates it
    skew = f"count by (namespace, model) (ray_serving_live_version_info{{{sel}}} == 1)"
    assert prom.value(skew) == 1, "one live version after the swap"
    for expr in _alert_exprs():
        # NOTE: a healthy swap: no 5xx, no failure, no refusal, nothing stale.
        assert prom.query(expr) == [], f"alert expression not silent after a healthy swap: {expr}"
    print(f"checked in Prometheus: {checked}; used but not exported standalone: {sorted(used - exported)}")


def test_rollout_reads_its_figures_from_prometheus_and_promotes(
    serving_and_prometheus: tuple[Server, Prometheus, Repository], tmp_path: Path
) -> None:
    """``serving rollout --prometheus`` measures each step from the scraped counters and promotes."""
    import sys
    import threading

    server, prom, repo = serving_and_prometheus
    current = repo.get_alias(MODEL, "production").version
    nxt = str(int(current) + 1)
    publish(repo, tmp_path, MODEL, nxt, c=0.5)
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                client.post(
                    f"{server.base}/v2/models/{MODEL}/infer",
                    json={
                        "inputs": [
                            {
                                "name": "input-0",
                                "datatype": "FP64",
                                "shape": [1, 4],
                                "data": [5.1, 3.5, 1.4, 0.2],
                            }
                        ]
                    },
                )

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        cmd = [
            sys.executable,
            "-m",
            "serving.cli",
            "--store",
            repo.store.uri,
            "rollout",
            MODEL,
            "production",
            nxt,
        ]
        cmd += ["--prometheus", prom.base, "--prometheus-selector", f'namespace="{NAMESPACE}"']
        cmd += ["--steps", "50,100", "--step-seconds", "3", "--min-requests", "3", "--converge-timeout", "30"]
        cmd += ["--shadow-seconds", "0"]  # NOTE: the canary steps are what this test reads from Prometheus
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SERVING_", "AWS_"))}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    finally:
        stop.set()
        thread.join(30)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"canary {nxt} at 50% for 3s: ")
    assert lines[0].endswith("-> ok")
    assert f"live {current}: " in lines[0]
    assert lines[-1].startswith(f"{MODEL}@production -> {nxt} (promoted from {current} after 2 steps")
    assert repo.get_alias(MODEL, "production").version == nxt
