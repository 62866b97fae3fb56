"""Every PromQL expression in the dashboard and the alert rules names only metrics
that serving.metrics really exports (as Ray's node exporter names them)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import CHART, REPO, Docs, one

from serving import metrics

DASHBOARD = CHART / "files" / "serving-dashboard.json"
DEPLOY_DASHBOARD = REPO / "deploy" / "grafana" / "serving-dashboard.json"

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w$.:])([A-Za-z_:][A-Za-z0-9_:]*)\b(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (or a Grafana label_values query).

    Strings, label matchers, ranges and grouping clauses are removed first; what
    remains that is not a function call, keyword or number is a metric name.
    """
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub(" ", text)
    # label_values(metric, label): the second argument is a label, not a metric.
    text = re.sub(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*\w+\s*\)", r"\1", text)
    names = set()
    for name, call in _IDENT.findall(text):
        if call or name.lower() in _KEYWORDS or name.startswith("$"):
            continue
        names.add(name)
    return names


def test_extractor_finds_metrics_and_skips_functions_labels_and_variables() -> None:
    """The extractor itself: metrics in, functions, labels, keywords and $vars out."""
    expr = (
        'histogram_quantile(0.99, sum by (model, le) (rate(foo_bucket{model=~"$model", a="b c"}'
        "[$__rate_interval]))) / on (model) group_left bar_total > bool 0.5 and ignoring(x) baz"
    )
    assert metric_names(expr) == {"foo_bucket", "bar_total", "baz"}
    assert metric_names('label_values(up{job="x"}, namespace)') == {"up"}


def _dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dashboard["panels"]):
        for t in p.get("targets", []):
            yield f"panel {p['title']!r}", t["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            yield f"variable {var['name']!r}", query["query"] if isinstance(query, dict) else query


def test_dashboard_queries_name_only_exported_metrics() -> None:
    """Each dashboard query references at least one metric, all of them exported."""
    exported = metrics.exported_names()
    exprs = list(_dashboard_exprs(json.loads(DASHBOARD.read_text())))
    assert len(exprs) >= 10
    for where, expr in exprs:
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        assert names <= exported, f"{where}: not exported: {sorted(names - exported)}"


def test_dashboard_in_deploy_is_the_charts_dashboard() -> None:
    """deploy/grafana/serving-dashboard.json is byte-identical to the chart's copy."""
    assert DEPLOY_DASHBOARD.read_bytes() == DASHBOARD.read_bytes()


def test_dashboard_covers_every_exported_metric() -> None:
    """No metric goes unseen: each one appears in some dashboard panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    used = set().union(*(metric_names(e) for _, e in _dashboard_exprs(dashboard)))
    bases = {metrics.RAY_PREFIX + m.name for m in metrics.ALL}
    missing = {b for b in bases if not any(u == b or u.startswith(b + "_") for u in used)}
    assert not missing


@pytest.mark.helm
def test_alert_rules_name_only_exported_metrics(render: Callable[..., Docs]) -> None:
    """Each alert expression references at least one metric, all of them exported."""
    exported = metrics.exported_names()
    rule = one(render(), "PrometheusRule")
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    names = {r["alert"] for r in alerts}
    assert {
        "ServingSwapFailed",
        "ServingAliasCheckStale",
        "ServingHighErrorRate",
        "ServingLatencyObjectiveBreached",
        "ServingReplicasUnhealthy",
    } <= names
    for r in alerts:
        found = metric_names(r["expr"])
        assert found, f"{r['alert']}: no metric in {r['expr']!r}"
        assert found <= exported, f"{r['alert']}: not exported: {sorted(found - exported)}"
