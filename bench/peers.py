"""The peers beyond MLServer, each in its own venv and set up as its docs show.

KServe's ``ModelServer`` (predict as its sklearnserver), LitServe, BentoML and NVIDIA
PyTriton (the Triton server its wheel bundles, Python backend). Each serves the same
iris ``LogisticRegression`` (``bench/baselines/_iris.py``, trained in the peer's venv)
on ``/v2/models/iris/infer``; ``workers`` is each one's own scaling knob, for the N
against N rounds.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from dataclasses import dataclass

from bench.systems import ROOT, VENVS, Processes, System, install_venv, venv_version
from serving.testing import free_port

BASELINES = ROOT / "bench" / "baselines"
V2 = "/v2/models/iris/infer"


@dataclass(frozen=True)
class Peer:
    name: str
    packages: list[str]
    module: str
    """Its import name, for the version it reports."""
    knob: str
    """Its scaling knob, as the N against N rounds set it."""
    start: Callable[[Processes, str, int, bytes], System]


def _python(peer: str) -> str:
    return str(VENVS / peer / "bin" / "python")


def _kserve(procs: Processes, name: str, workers: int, ready: bytes) -> System:
    port, grpc_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [_python("kserve"), str(BASELINES / "kserve_app.py"), str(port), str(grpc_port), str(workers)]
    procs.start(name, cmd, (base + V2, ready))
    return System(name, base, {"v2": V2, "v2all": V2, "v2bin": V2}, grpc=f"127.0.0.1:{grpc_port}")


def _litserve(procs: Processes, name: str, workers: int, ready: bytes) -> System:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs.start(
        name,
        [_python("litserve"), str(BASELINES / "litserve_app.py"), str(port), str(workers)],
        (base + V2, ready),
    )
    return System(name, base, {"v2": V2, "v2all": V2})


def _bentoml(procs: Processes, name: str, workers: int, ready: bytes) -> System:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [str(VENVS / "bentoml" / "bin" / "bentoml"), "serve", "bentoml_app:Iris", "--port", str(port)]
    cmd += ["--host", "127.0.0.1", "--working-dir", str(BASELINES)]
    procs.start(name, cmd, (base + V2, ready), env={"BENCH_WORKERS": str(workers)})
    return System(name, base, {"v2": V2, "v2all": V2})


def _pytriton(procs: Processes, name: str, workers: int, ready: bytes) -> System:
    port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [_python("pytriton"), str(BASELINES / "pytriton_app.py")]
    cmd += [str(port), str(grpc_port), str(metrics_port), str(workers)]
    # NOTE: under pyenv, Triton's Python backend stub needs the interpreter's own libpython.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    procs.start(name, cmd, (base + V2, ready), env={"LD_LIBRARY_PATH": libdir})
    return System(name, base, {"v2": V2, "v2all": V2, "v2bin": V2}, grpc=f"127.0.0.1:{grpc_port}")


PEERS = {
    "kserve": Peer("kserve", ["kserve", "scikit-learn"], "kserve", "--workers", _kserve),
    "litserve": Peer("litserve", ["litserve", "scikit-learn"], "litserve", "workers_per_device", _litserve),
    "bentoml": Peer(
        "bentoml", ["bentoml", "scikit-learn"], "bentoml", "@bentoml.service(workers=)", _bentoml
    ),
    "pytriton": Peer(
        "pytriton", ["nvidia-pytriton", "scikit-learn"], "pytriton", "model instances", _pytriton
    ),
}


def start_peer(
    procs: Processes, peer: Peer, workers: int, ready: bytes, notes: list[str]
) -> dict[str, System]:
    """Install (once) and start ``peer`` with ``workers``; {} with a note when it cannot run."""
    name = peer.name if workers == 1 else f"{peer.name}-x{workers}"
    why = install_venv(
        peer.name, peer.packages, f"lib/python{sysconfig.get_python_version()}/site-packages/{peer.module}"
    )
    if why is not None:
        notes.append(f"{peer.name} not measured: {why}")
        return {}
    try:
        system = peer.start(procs, name, workers, ready)
    except RuntimeError as exc:
        notes.append(f"{name} installed but did not run: {exc}")
        return {}
    system.note = f"{peer.name} {venv_version(peer.name, peer.module)}, {peer.knob} = {workers}"
    return {name: system}
