"""The systems under test as processes on 127.0.0.1, started once and stopped at the end.

A :class:`System` knows its base URL and, per route kind (``v2``, ``v1``, ``mlp``),
the path it serves; a missing kind means the system has no such route.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from serving.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / "bench" / ".venvs"
MLSERVER_VENV = VENVS / "mlserver"


@dataclass
class System:
    name: str
    base: str
    paths: dict[str, str]
    note: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    grpc: str = ""
    """OIP over gRPC, ``host:port``; empty when the system serves none."""

    def url(self, kind: str) -> str | None:
        path = self.paths.get(kind)
        return self.base + path if path else None


class Processes:
    """Starts server processes, waits until they answer, stops them all (process group) at exit."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._shm_before = _shared_memory()

    def start(
        self,
        name: str,
        cmd: list[str],
        ready: tuple[str, bytes | None],
        env: dict[str, str] | None = None,
        timeout: float = 240.0,
    ) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 -- NOTE: the child owns it
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.procs.append((name, proc))
        url, body = ready
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {log.name}")
            try:
                r = (
                    httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=5)
                    if body is not None
                    else httpx.get(url, timeout=5)
                )
                if r.status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{name} did not answer {url} within {timeout:.0f}s; see {log.name}")

    def stop_all(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    if proc.stdin:
                        proc.stdin.close()
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
                except OSError:
                    pass
            # NOTE: what the server left in its session (PyTriton's tritonserver outlives its
            # Python parent) goes too.
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
        self.procs.clear()
        # NOTE: PyTriton's shared-memory regions and LitServe's queues outlive a stopped server.
        for leftover in _shared_memory() - self._shm_before:
            with contextlib.suppress(OSError):
                (SHM / leftover).unlink()


SHM = Path("/dev/shm")
PEER_SHM_PREFIXES = ("pytrtion", "psm_")
"""Shared-memory files the peers create (PyTriton's, Python's multiprocessing's) and leave."""


def _shared_memory() -> set[str]:
    if not SHM.is_dir():
        return set()
    return {p.name for p in SHM.iterdir() if p.name.startswith(PEER_SHM_PREFIXES) and p.is_file()}


def start_ray_host(
    procs: Processes,
    name: str,
    apps: list[dict[str, Any]],
    work: Path,
    ready_path: str,
    ready_body: bytes,
    env: dict[str, str] | None = None,
) -> str:
    port = free_port()
    spec = work / f"{name}.json"
    spec.write_text(json.dumps({"port": port, "num_cpus": 2, "apps": apps}))
    base = f"http://127.0.0.1:{port}"
    procs.start(
        name, [sys.executable, "-m", "bench.ray_host", str(spec)], (base + ready_path, ready_body), env
    )
    return base


def start_starlette(procs: Processes, model_path: Path, ready_body: bytes) -> System:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs.start(
        "starlette",
        [sys.executable, "-m", "bench.baselines.starlette_app", str(model_path), str(port)],
        (base + "/v2/models/iris/infer", ready_body),
    )
    return System(
        "starlette",
        base,
        {"v2": "/v2/models/iris/infer", "v1": "/v1/models/iris:predict"},
        "bare Starlette + uvicorn, one process, orjson, calls predict",
    )


def start_standalone(
    procs: Processes, app_args: dict[str, Any], work: Path, ready_body: bytes, name: str = "ours-standalone"
) -> System:
    """``serving serve --standalone``: this project's models in one uvicorn process, no Ray."""
    port, metrics_port, grpc_port = free_port(), free_port(), free_port()
    config = work / f"{name}.json"
    config.write_text(json.dumps(app_args))  # NOTE: JSON is YAML; --config reads either
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--standalone", "--config", str(config)]
    cmd += ["--port", str(port), "--metrics-port", str(metrics_port), "--grpc-port", str(grpc_port)]
    procs.start(name, cmd, (base + "/v2/models/iris/infer", ready_body))
    return System(
        name,
        base,
        {
            "v2": "/v2/models/iris/infer",
            "v2all": "/v2/models/iris/infer",
            "v1": "/v1/models/iris:predict",
            "v2bin": "/v2/models/iris/infer",
        },
        "serving.server.standalone: one uvicorn process, raw ASGI, predict on the loop while "
        "the model is fast; "
        "gRPC on a grpc.aio server on the same loop",
        grpc=f"127.0.0.1:{grpc_port}",
    )


def start_serve(
    procs: Processes, app_args: dict[str, Any], work: Path, ready_body: bytes, name: str = "ours"
) -> System:
    """``serving serve``: the default Ray path as the chart deploys it (HAProxy, single-hop replicas)."""
    port, metrics_port, grpc_port = free_port(), free_port(), free_port()
    config = work / f"{name}.json"
    config.write_text(json.dumps(app_args))  # NOTE: JSON is YAML; --config reads either
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--config", str(config), "--num-cpus", "2"]
    cmd += ["--port", str(port), "--metrics-port", str(metrics_port), "--grpc-port", str(grpc_port)]
    procs.start(name, cmd, (base + "/v2/models/iris/infer", ready_body))
    return System(
        name,
        base,
        {
            "v2": "/v2/models/iris/infer",
            "v2all": "/v2/models/iris/infer",
            "v1": "/v1/models/iris:predict",
            "v2bin": "/v2/models/iris/infer",
            "mlp": "/v2/models/mlp/infer",
        },
        "serving serve: Ray Serve behind HAProxy (direct ingress), single-hop replicas "
        "reporting to the autoscaler (serving.server.launch.FAST_PATH_ENV, as the chart sets it); "
        "gRPC the same way",
        grpc=f"127.0.0.1:{grpc_port}",
    )


def install_venv(name: str, packages: list[str], ready: str) -> str | None:
    """Create ``bench/.venvs/NAME`` with ``packages`` unless ``ready`` (a path in it) exists.

    Each peer has its own venv, set up as its docs say; returns None, or why it failed."""
    venv = VENVS / name
    if (venv / ready).exists():
        return None
    py = venv / "bin" / "python"
    try:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", *packages], check=True, capture_output=True, timeout=1200
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        tail = getattr(exc, "stderr", b"") or b""
        return f"pip install {' '.join(packages)} failed: {exc}; {tail.decode(errors='replace')[-300:]}"
    return None


def venv_version(name: str, module: str) -> str:
    """``module.__version__`` as the peer's own venv has it (empty if it cannot say)."""
    py = VENVS / name / "bin" / "python"
    return subprocess.run(
        [str(py), "-c", f"import {module}; print({module}.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()


def install_mlserver() -> str | None:
    """Create bench/.venvs/mlserver with mlserver + mlserver-sklearn; None, or why it failed."""
    return install_venv("mlserver", ["mlserver", "mlserver-sklearn"], "bin/mlserver")


def start_mlserver(procs: Processes, work: Path, ready_body: bytes) -> System:
    """MLServer with its sklearn runtime; the model is trained and dumped by MLServer's own sklearn."""
    folder = work / "mlserver"
    model_dir = folder / "iris"
    model_dir.mkdir(parents=True, exist_ok=True)
    py = str(MLSERVER_VENV / "bin" / "python")
    train = (
        "import joblib,sys; from sklearn.datasets import load_iris; "
        "from sklearn.linear_model import LogisticRegression; x,y=load_iris(return_X_y=True); "
        "joblib.dump(LogisticRegression(max_iter=200).fit(x,y), sys.argv[1])"
    )
    subprocess.run([py, "-c", train, str(model_dir / "model.joblib")], check=True, capture_output=True)
    port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    (folder / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": port,
                "grpc_port": grpc_port,
                "metrics_port": metrics_port,
                # NOTE: MLServer's default inference pool (parallel_workers=1) dies at start
                # with uvloop >= 0.22 ("no current event loop"); 0 runs predict in the
                # server process, which is also MLServer's advice for light models.
                "parallel_workers": 0,
            }
        )
    )
    (model_dir / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "iris",
                "implementation": "mlserver_sklearn.SKLearnModel",
                "parameters": {"uri": "./model.joblib", "version": "1"},
            }
        )
    )
    base = f"http://127.0.0.1:{port}"
    procs.start(
        "mlserver",
        [str(MLSERVER_VENV / "bin" / "mlserver"), "start", str(folder)],
        (base + "/v2/models/iris/infer", ready_body),
    )
    version = venv_version("mlserver", "mlserver")
    return System(
        "mlserver",
        base,
        {"v2": "/v2/models/iris/infer", "v2all": "/v2/models/iris/infer"},
        f"MLServer {version} sklearn runtime, parallel_workers=0 (no v1 'instances' route)",
        grpc=f"127.0.0.1:{grpc_port}",
    )
