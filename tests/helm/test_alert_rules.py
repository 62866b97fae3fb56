"""The chart's alert rules pass ``promtool check rules`` and ``promtool test rules``.

The rule groups come from ``helm template`` of the PrometheusRule (release ``serving``,
namespace ``ml``), written as a plain rules file next to ``promtool/alerts_test.yaml``,
whose cases give every alert one input that fires and one that stays silent.
promtool is Debian's ``prometheus`` package (``.ci/run`` installs it) or ``$PROMTOOL``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import RELEASE, Docs, one, skip_or_fail

pytestmark = pytest.mark.helm

UNIT_TESTS = Path(__file__).parent / "promtool" / "alerts_test.yaml"
PROMETHEUS_RULE = "templates/prometheusrule.yaml"
RULE_API = ("monitoring.coreos.com/v1/PrometheusRule",)


@pytest.fixture(scope="session")
def promtool() -> Path:
    found = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not found:
        skip_or_fail("no promtool binary (apt-get install prometheus, or set PROMTOOL)")
    return Path(str(found))


def _rule_groups(render: Callable[..., Docs], values: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    rule = one(render(values=values, api_versions=RULE_API, show_only=(PROMETHEUS_RULE,)), "PrometheusRule")
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


def _write_rules(tmp: Path, groups: list[dict[str, Any]]) -> Path:
    (tmp / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    shutil.copyfile(UNIT_TESTS, tmp / UNIT_TESTS.name)
    return tmp / UNIT_TESTS.name


def _promtool(promtool: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(promtool), *args], capture_output=True, text=True, timeout=120, check=False, cwd=cwd
    )


def _alerts(groups: list[dict[str, Any]]) -> set[str]:
    return {r["alert"] for g in groups for r in g["rules"] if "alert" in r}


def test_rules_pass_promtool_check(render: Callable[..., Docs], promtool: Path, tmp_path: Path) -> None:
    """`promtool check rules` accepts the rendered groups and counts every alert."""
    groups = _rule_groups(render)
    _write_rules(tmp_path, groups)
    done = _promtool(promtool, "check", "rules", "rules.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alerts(groups))} rules found" in done.stdout


def test_every_alert_has_a_firing_and_a_silent_case(render: Callable[..., Docs]) -> None:
    """Each alert of the chart appears in a case expecting it to fire and in one
    expecting silence; no case names an alert the chart does not have."""
    alerts = _alerts(_rule_groups(render))
    assert len(alerts) >= 7
    firing: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert firing == alerts, f"no firing case: {sorted(alerts - firing)}; unknown: {sorted(firing - alerts)}"
    assert silent == alerts, f"no silent case: {sorted(alerts - silent)}; unknown: {sorted(silent - alerts)}"


def test_alert_unit_tests_pass(render: Callable[..., Docs], promtool: Path, tmp_path: Path) -> None:
    """`promtool test rules` passes: each alert fires (labels and rendered annotations
    exactly as expected) and stays silent where it should."""
    test_file = _write_rules(tmp_path, _rule_groups(render))
    done = _promtool(promtool, "test", "rules", test_file.name, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_alert_unit_tests_follow_the_rendered_values(
    render: Callable[..., Docs], promtool: Path, tmp_path: Path
) -> None:
    """The unit tests are not vacuous: with a 20% error threshold the 10%-error case
    no longer fires, and promtool says which alert failed."""
    values = tmp_path / "threshold-values.yaml"
    values.write_text("monitoring: {prometheusRule: {errorRatioThreshold: 0.2}}\n")
    test_file = _write_rules(tmp_path, _rule_groups(render, (values,)))
    done = _promtool(promtool, "test", "rules", test_file.name, cwd=tmp_path)
    assert done.returncode != 0
    failed = set(re.findall(r"alertname: (\w+)", done.stdout + done.stderr))
    assert failed == {"ServingHighErrorRate"}, done.stdout + done.stderr


def test_rules_are_scoped_to_the_release_namespace(render: Callable[..., Docs]) -> None:
    """Every alert expression selects the release's namespace (the unit tests use ml)."""
    for group in _rule_groups(render):
        for rule in group["rules"]:
            assert 'namespace="ml"' in rule["expr"], (RELEASE, rule["alert"])
