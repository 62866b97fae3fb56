"""The chart lints, renders and validates against real schemas, offline.

Core kinds are checked with kubernetes-validate (strict: unknown fields fail) for
Kubernetes ``KUBE_VERSION``; CRD kinds with jsonschema against the CRDs'
``openAPIV3Schema`` from ``$SERVING_CRDS_DIR``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from conftest import CHART, CI_VALUES, CRD_APIS, CRD_KINDS, KUBE_VERSION, Docs, by_kind

pytestmark = pytest.mark.helm

CI_IDS = [p.name.removesuffix("-values.yaml") for p in CI_VALUES]


def test_ci_matrix_is_not_empty() -> None:
    """The ci/ values files exist, so the parametrized checks below run."""
    assert len(CI_VALUES) >= 4


@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_lint_strict(helm: Path, values: Path) -> None:
    """`helm lint --strict` passes for every ci/*-values.yaml."""
    done = subprocess.run(
        [str(helm), "lint", "--strict", str(CHART), "--values", str(values), "--kube-version", KUBE_VERSION],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_schema_refuses_unknown_keys(helm: Path) -> None:
    """A misspelled value is an error, not silently ignored."""
    done = subprocess.run(
        [str(helm), "template", "x", str(CHART), "--set", "store.url=s3://typo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "url" in done.stderr


def _validate_core(doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        raise AssertionError(f"{name}: {exc.message} at {list(exc.absolute_path)}") from exc


@pytest.mark.parametrize("with_crds", [True, False], ids=["with-crd-apis", "without-crd-apis"])
@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_core_kinds_validate(render: Callable[..., Docs], values: Path, with_crds: bool) -> None:
    """Every rendered core kind is valid for the stated Kubernetes version, with and
    without the CRD API versions available."""
    docs = render(values=[values], api_versions=CRD_APIS if with_crds else ())
    core = [d for d in docs if d["kind"] not in CRD_KINDS]
    assert core, "no core kinds rendered"
    for doc in core:
        _validate_core(doc)


@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_crd_kinds_validate(
    render: Callable[..., Docs], crd_schemas: dict[tuple[str, str], dict[str, Any]], values: Path
) -> None:
    """RayService, PodMonitor, ServiceMonitor and PrometheusRule match their CRD
    schemas, with unknown fields refused as the API server prunes them."""
    docs = render(values=[values])
    crd_docs = [d for d in docs if d["kind"] in CRD_KINDS]
    assert by_kind(crd_docs, "RayService")
    for doc in crd_docs:
        schema = crd_schemas[(doc["apiVersion"], doc["kind"])]
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, f"{doc['kind']}: " + "; ".join(
            f"{list(e.absolute_path)}: {e.message}" for e in errors[:5]
        )


def test_crd_validation_catches_a_wrong_field(crd_schemas: dict[tuple[str, str], dict[str, Any]]) -> None:
    """The CRD check is not vacuous: a misspelled RayService field fails it."""
    schema = crd_schemas[("ray.io/v1", "RayService")]
    bad = {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "x"}}
    bad["spec"] = {"servConfig": ""}
    assert list(jsonschema.Draft7Validator(schema).iter_errors(bad))


def test_without_crd_apis_no_crd_kinds_render(render: Callable[..., Docs]) -> None:
    """Each CRD-backed kind is gated on .Capabilities.APIVersions.Has."""
    docs = render(values=[CHART / "ci" / "minio-values.yaml"], api_versions=())
    assert not [d for d in docs if d["kind"] in CRD_KINDS]
    assert by_kind(docs, "ConfigMap"), "the dashboard ConfigMap needs no CRD"


def test_notes_explain_rollouts(helm: Path) -> None:
    """NOTES.txt renders and says version moves need no chart change, serve config
    updates in place, and cluster-spec changes trigger KubeRay's upgrade."""
    done = subprocess.run(
        [str(helm), "install", "serving", str(CHART), "--namespace", "ml", "--dry-run=client"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    assert "needs no chart change" in notes
    assert "in place" in notes
    assert "zero-downtime upgrade" in notes
    assert "does not serve ray.io/v1 RayService" in notes, "no CRD here: the warning shows"
