"""deploy/ stays in step with the chart and the app config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import CHART, REPO
from deploy_manifests import RAYSERVICE, render_rayservice

from serving.config import AppConfig


@pytest.mark.helm
def test_plain_rayservice_is_in_sync_with_the_chart_defaults(helm: Path) -> None:
    """deploy/rayservice.yaml equals `helm template` of the defaults
    (regenerate with `python tests/helm/deploy_manifests.py`)."""
    assert RAYSERVICE.read_text() == render_rayservice(helm)


def test_serve_yaml_parses_with_the_app_config_model() -> None:
    """deploy/serve.yaml's args validate as AppConfig, with the chart's import path."""
    doc = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    (app,) = doc["applications"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert app["import_path"] == values["serve"]["importPath"]
    config = AppConfig.model_validate(app["args"])
    assert config.models


def test_example_values_files_are_yaml() -> None:
    """The operator and kube-prometheus-stack examples parse."""
    files = sorted((REPO / "deploy").glob("*/*-values.yaml"))
    assert len(files) >= 2
    for path in files:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path
