"""What every child that runs model code is held to, and how its death is read.

Both kinds of child use it: the prober's short-lived probe children
(:mod:`.prober`) and the long-lived model workers (:mod:`.worker`).

- :func:`confine` sets the limits a child applies to itself before it touches an
  artifact: no core dumps, an address-space limit, a CPU-time limit,
  ``no_new_privs`` and an audit hook that ends the process on any attempt to
  start another one.
- :func:`classify` turns a wait status into one of :data:`REASONS` and a message.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving.errors import ServingError
from serving.formats.base import LoadPolicy, Predictor
from serving.manifest import Manifest

__all__ = [
    "EXIT_EXEC",
    "REASONS",
    "child_env",
    "classify",
    "confine",
    "describe",
    "load_in_child",
    "out_of_memory",
    "prctl",
    "vm_size",
]

REASONS = ("crash", "oom", "killed", "timeout", "exec")
"""Every reason a child can fail for; a bounded metric label."""

SIGNAL_EVENTS = frozenset({"os.kill", "os.killpg"})
"""Audit events of a signal sent: a confined child may signal only itself."""
EXIT_EXEC = 86
"""Exit code of a child whose audit hook saw a process start (or a signal to another process)."""

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

PROCESS_EVENTS = frozenset(
    {
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.fork",
        "os.forkpty",
        "os.startfile",
        "subprocess.Popen",
        "pty.spawn",
    }
)


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child that loads models: ``base`` (default: no secrets, see
    :func:`serving.settings.isolated_child_env`), importing exactly what this process would."""
    from serving.settings import isolated_child_env

    env = dict(base if base is not None else isolated_child_env())
    # NOTE: the child must import exactly what this process would (this serving
    # package, a module class_path names), however this process found them:
    # PYTHONPATH, a Ray runtime env, entries added at run time.
    package_root = str(Path(__file__).resolve().parent.parent.parent)
    paths = [package_root, *(os.path.abspath(p) for p in sys.path if p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    return env


def prctl(option: int, arg: int) -> None:
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)


def settle_caches(*, confined: bool = False) -> None:
    """Fill what frameworks fill by starting a process the first time, before this process is
    confined (where starting one kills it): joblib's (loky's) count of physical cores runs
    ``lscpu`` the first time a scikit-learn model reduces pairwise distances (NearestCentroid,
    brute-force neighbours, KMeans), so every such model died in a model worker at its first
    predict. ``confined``: this process is confined already (a shared worker's later load):
    the count is set to the logical cores instead, without ``lscpu``."""
    joblib = sys.modules.get("joblib")
    if joblib is None:
        return
    if confined:
        with contextlib.suppress(Exception):
            from joblib.externals.loky.backend import context

            if context.physical_cores_cache is None:
                context.physical_cores_cache = os.cpu_count() or 1
        return
    with contextlib.suppress(Exception):
        joblib.cpu_count(only_physical_cores=True)


def confine(memory_bytes: int, cpu_seconds: int | None) -> None:
    """Limit this process: ``memory_bytes`` more address space than it maps now, CPU time,
    no core, no new privileges, no new processes (the audit hook exits with :data:`EXIT_EXEC`).

    ``cpu_seconds=None`` leaves the CPU limit to the caller (a worker sets one per request).
    """
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if cpu_seconds is not None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    address_space = vm_size() + memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    prctl(PR_SET_NO_NEW_PRIVS, 1)

    own = os.getpid()

    def no_processes(event: str, args: tuple[Any, ...]) -> None:
        if event in PROCESS_EVENTS:
            os._exit(EXIT_EXEC)
        # NOTE: a signal to another process (its zygote, the serving process, a sibling
        # worker) is no version's business either; to itself, or signal 0 (is it alive?), fine.
        if event in SIGNAL_EVENTS and len(args) > 1 and args[0] not in (own, 0) and args[1] != 0:
            os._exit(EXIT_EXEC)

    def refused(*_args: Any, **_kwargs: Any) -> Any:
        os._exit(EXIT_EXEC)

    # NOTE: a signal through a pidfd raises no audit event: the calls themselves are gone.
    for module, name in ((os, "pidfd_open"), (signal, "pidfd_send_signal")):
        if hasattr(module, name):
            setattr(module, name, refused)

    sys.addaudithook(no_processes)


def load_in_child(
    request: dict[str, Any], prepare: Callable[[], None] | None = None
) -> tuple[Predictor | None, dict[str, Any]]:  # pragma: no cover -- NOTE: runs in a child
    """Load (and warm up) the version a child was sent: the predictor and ``{"ok": True}``, or
    None and the failure as an answer (``oom``, or the error's class and message).

    ``prepare`` runs first, inside the same handling (a worker confines itself there).
    """
    from serving.formats import load_predictor
    from serving.formats.warmup import warm_up

    try:
        if prepare is not None:
            prepare()
        manifest = Manifest.model_validate(request["manifest"])
        predictor = load_predictor(Path(request["path"]), manifest, LoadPolicy.from_json(request["policy"]))
        if request["warmup"]:
            warm_up(predictor, manifest)
    except BaseException as exc:  # noqa: BLE001 -- NOTE: every failure becomes an answer
        if out_of_memory(exc):
            return None, {"ok": False, "reason": "oom", "message": describe(exc)}
        if isinstance(exc, ServingError):
            return None, {"ok": False, "reason": "error", "class": type(exc).__name__, "message": exc.message}
        return None, {"ok": False, "reason": "error", "class": "LoadError", "message": describe(exc)}
    return predictor, {"ok": True}


def oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has ended since boot (``/proc/vmstat``, a
    cgroup's memory limit included); None where it cannot be read."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def classify(
    status: int | None, who: str = "the child", oom_kills_before: int | None = None
) -> dict[str, Any]:
    """What a wait status means: ``{"ok": False, "reason": ..., "message": ...}``.

    ``oom_kills_before``: :func:`oom_kills` when the child started. A SIGKILL while the OOM
    killer killed nothing since came from outside (an operator, a supervisor): ``killed``.
    """
    if status is None:
        return {"ok": False, "reason": "crash", "message": f"{who} vanished"}
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == signal.SIGXCPU:
            return {"ok": False, "reason": "timeout", "message": "CPU time limit reached (SIGXCPU)"}
        if sig == signal.SIGKILL:
            if oom_kills_before is not None and oom_kills() == oom_kills_before:
                return {
                    "ok": False,
                    "reason": "killed",
                    "message": "killed (SIGKILL) from outside: no OOM kill since it started",
                }
            # NOTE: callers that kill on their own deadline report a timeout themselves,
            # so this is the kernel's OOM killer or a cgroup memory limit.
            return {"ok": False, "reason": "oom", "message": "killed (SIGKILL), out of memory"}
        return {"ok": False, "reason": "crash", "message": f"killed by {name}"}
    code = os.WEXITSTATUS(status)
    if code == EXIT_EXEC:
        return {"ok": False, "reason": "exec", "message": "tried to start a process or signal another"}
    return {"ok": False, "reason": "crash", "message": f"exited with code {code} without a result"}


_OOM_MARKERS = (
    "can't allocate memory",
    "cannot allocate memory",
    "failed to allocate memory",  # onnxruntime's arena
    "oom when allocating",  # TensorFlow's ResourceExhaustedError
    "bad_alloc",
    "out of memory",
)


def out_of_memory(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, MemoryError) or any(m in str(seen).lower() for m in _OOM_MARKERS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0
