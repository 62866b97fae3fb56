"""Ray token authentication is on in every rendered cluster.

Ray 2.60's ``ray start --head`` turns token authentication on, and a node that joins
without the token is refused (``InvalidAuthToken``). KubeRay 1.5.1+ handles it with
``rayClusterConfig.authOptions.mode: token``: it generates the token Secret and gives
``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN`` to the head, every worker and the autoscaler.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from conftest import CHART, CI_VALUES, REPO, Docs, one

pytestmark = pytest.mark.helm

CI_IDS = [p.name.removesuffix("-values.yaml") for p in CI_VALUES]
MIN_OPERATOR = (1, 5, 1)
"""The first KubeRay operator release whose RayCluster spec has ``authOptions``."""


def _ray_containers(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    specs = [cluster["headGroupSpec"]["template"]["spec"]]
    specs += [g["template"]["spec"] for g in cluster.get("workerGroupSpecs", [])]
    return [c for spec in specs for c in spec["containers"]]


@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_every_cluster_runs_with_token_auth(render: Callable[..., Docs], values: Path) -> None:
    """authOptions.mode is token, and no Ray container switches auth off through env."""
    rayservice = one(render(values=[values]), "RayService")
    assert rayservice["spec"]["rayClusterConfig"].get("authOptions") == {"mode": "token"}
    for container in _ray_containers(rayservice):
        for env in container.get("env", []):
            if env["name"] == "RAY_AUTH_MODE":
                assert env.get("value") == "token", f"{container['name']} sets RAY_AUTH_MODE={env}"


def test_auth_options_match_the_crd(
    render: Callable[..., Docs], crd_schemas: dict[tuple[str, str], dict[str, Any]]
) -> None:
    """The rendered authOptions is valid for the RayService CRD, and the check is not
    vacuous: the CRD refuses a mode it does not know."""
    schema = crd_schemas[("ray.io/v1", "RayService")]
    cluster_props = schema["properties"]["spec"]["properties"]["rayClusterConfig"]["properties"]
    assert "token" in cluster_props["authOptions"]["properties"]["mode"]["enum"]
    rayservice = one(render(), "RayService")
    assert not list(jsonschema.Draft7Validator(schema).iter_errors(rayservice))
    rayservice["spec"]["rayClusterConfig"]["authOptions"] = {"mode": "tokens"}
    assert list(jsonschema.Draft7Validator(schema).iter_errors(rayservice))


def test_extra_env_cannot_switch_auth_off(helm: Path) -> None:
    """RAY_AUTH_MODE=disabled through extraEnv fails the render with a reason."""
    cmd = [str(helm), "template", "x", str(CHART), "--api-versions", "ray.io/v1/RayService"]
    cmd += ["--set", "extraEnv[0].name=RAY_AUTH_MODE", "--set", "extraEnv[0].value=disabled"]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "RAY_AUTH_MODE must stay token" in done.stderr


def test_plain_rayservice_has_token_auth() -> None:
    """deploy/rayservice.yaml (generated from the chart) carries authOptions too."""
    docs = [d for d in yaml.safe_load_all((REPO / "deploy" / "rayservice.yaml").read_text()) if d]
    assert one(docs, "RayService")["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}


def test_docs_install_an_operator_that_knows_auth_options() -> None:
    """Every `helm install kuberay-operator --version X` in the docs is 1.5.1 or later."""
    files = [REPO / "README.md", CHART / "README.md", REPO / "deploy" / "README.md"]
    files += sorted((REPO / "deploy" / "kuberay").glob("*"))
    found = []
    for path in files:
        for match in re.finditer(r"kuberay/kuberay-operator --version (\d+)\.(\d+)\.(\d+)", path.read_text()):
            version = tuple(int(g) for g in match.groups())
            found.append(version)
            assert version >= MIN_OPERATOR, f"{path.relative_to(REPO)} installs KubeRay {version}"
    assert len(found) >= 3
