"""Render the plain manifests in ``deploy/`` from the chart, so they never drift.

``deploy/rayservice.yaml`` is ``helm template`` of the chart's defaults (the
ServiceAccount and the RayService, release ``serving`` in namespace ``serving``);
``deploy/grafana/serving-dashboard.json`` is the chart's dashboard. A test checks
both are in sync. Regenerate after changing the chart::

    python tests/helm/deploy_manifests.py
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from helm_binary import REPO, find_helm

CHART = REPO / "charts" / "serving"
RAYSERVICE = REPO / "deploy" / "rayservice.yaml"
DASHBOARD_SRC = CHART / "files" / "serving-dashboard.json"
DASHBOARD_DST = REPO / "deploy" / "grafana" / "serving-dashboard.json"
KUBE_VERSION = "1.35.0"

HEADER = """\
# Generated from charts/serving with its default values; do not edit by hand.
# Regenerate: python tests/helm/deploy_manifests.py
# Apply (KubeRay operator installed, namespace `serving`, IRSA or a Secret for the store):
#   kubectl create namespace serving
#   kubectl apply -n serving -f deploy/rayservice.yaml
"""


def render_rayservice(helm: Path) -> str:
    """The ServiceAccount and RayService of the chart's defaults, with a header."""
    cmd = [
        str(helm), "template", "serving", str(CHART),
        "--namespace", "serving",
        "--kube-version", KUBE_VERSION,
        "--api-versions", "ray.io/v1/RayService",
        "--show-only", "templates/serviceaccount.yaml",
        "--show-only", "templates/rayservice.yaml",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    return HEADER + out


def main() -> None:
    RAYSERVICE.write_text(render_rayservice(find_helm()))
    shutil.copyfile(DASHBOARD_SRC, DASHBOARD_DST)
    print(f"wrote {RAYSERVICE.relative_to(REPO)} and {DASHBOARD_DST.relative_to(REPO)}")


if __name__ == "__main__":
    main()
