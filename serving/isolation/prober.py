"""Isolation of a new version's first load: load and warm up in a limited child first.

Before the serving process loads a version it has not loaded before, a child
process loads the same verified bytes with :func:`serving.formats.load_predictor`
and runs :func:`serving.formats.warmup.warm_up` under resource limits. Only if the child
comes back clean does the serving process load them itself; a segfault, a
memory bomb, an endless loop or an attempt to start a process kills the child,
not the live model, and fails the swap with :class:`IsolationFailed`.

How it is cheap enough to do on every swap::

    serving process --stdin/stdout JSON lines--> helper ("zygote", started once,
        |                                         scrubbed environment, frameworks
        |                                         imported once per format)
        |                                            | os.fork() per probe
        |                                            v
        |                                         probe child: rlimits (address
        |                                         space, CPU, no core), no_new_privs,
        |                                         audit hook against process starts,
        |                                         load + warm-up, JSON result on a pipe
        v
    IsolationFailed(reason) or a pass, remembered per node under the cache root

The helper exits when its stdin closes, within a second of its parent's death (it
watches its parent id), or after being idle for :attr:`Prober.idle_s`; the next probe starts a new one.
A pass is remembered per node (keyed by the manifest's sha256 and a digest of
the policy and limits), so each version is probed once per node, not per
replica restart.

Limits of this layer (SECURITY.md, "Isolation"): rlimits are not a sandbox. The
child can read any file the serving user can, and native code can start
processes without passing the audit hook. Code that a hostile artifact runs in
the child can also forge a pass; the load policy, not isolation, is what keeps
artifacts from running code.

Example:
    >>> prober = Prober(IsolationLimits(), memo_dir=cache.root / "isolation")  # doctest: +SKIP
    >>> prober.probe(cached, policy, warmup=True)  # raises IsolationFailed on a crash # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import hashlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from serving import errors
from serving.cache import CachedVersion
from serving.errors import IsolationFailed, LoadError, ServingError
from serving.fileio import atomic_write
from serving.formats.base import LoadPolicy
from serving.formats.table import FORMAT_FACTS
from serving.manifest import Manifest

from .confine import (
    PR_SET_PDEATHSIG,
    REASONS,
    child_env,
    classify,
    confine,
    load_in_child,
    prctl,
    settle_caches,
)

__all__ = ["REASONS", "IsolationLimits", "IsolationMode", "Prober", "needs_isolation"]

log = logging.getLogger(__name__)

IsolationMode = Literal["auto", "always", "never"]

_EXIT_INTERNAL = 87
_RESULT_LIMIT = 1 << 20

# NOTE: after a pass, the helper also imports what the child imported under these
# packages (installed code only), so the next probe of that kind does not pay for it.
_WARM_PACKAGES = frozenset(p for facts in FORMAT_FACTS.values() for p in facts.warm_packages)


def needs_isolation(mode: IsolationMode, manifest: Manifest) -> bool:
    """Whether ``mode`` isolates this version's first load."""
    # NOTE: auto probed every format but ONNX and Keras until a 223-byte ONNX graph that
    # constant-folds to 1 GiB and Keras Lambda layers showed that "pure data" formats build
    # native objects from what the artifact says too; it now probes every format, as always.
    del manifest
    return mode != "never"


@dataclass(frozen=True)
class IsolationLimits:
    """What a probe child may use. ``memory_bytes=None``: max(1 GiB, 4 x the version's bytes)."""

    memory_bytes: int | None = None
    cpu_seconds: int = 120
    timeout_s: float = 300.0
    nice: int = 10
    """Niceness added to the helper and its probe children: a probe runs while the
    live version serves, and on a busy node it should wait for requests, not
    compete with them for CPU."""

    def memory_for(self, manifest: Manifest) -> int:
        if self.memory_bytes is not None:
            return self.memory_bytes
        return max(1 << 30, 4 * manifest.total_bytes)


class Prober:
    """Runs first loads in a limited child; one helper process, one probe at a time.

    Args:
        limits: memory, CPU and wall-clock limits of each probe.
        mode: ``auto``, ``always`` or ``never`` (see :func:`needs_isolation`).
        memo_dir: where passes are remembered (the cache root's ``isolation/``);
            None remembers nothing.
        env: the helper's environment; defaults to
            :func:`serving.settings.isolated_child_env` (no secrets).
        idle_s: the helper exits after this long without a probe.
    """

    def __init__(
        self,
        limits: IsolationLimits | None = None,
        *,
        mode: IsolationMode = "auto",
        memo_dir: Path | None = None,
        env: dict[str, str] | None = None,
        idle_s: float = 600.0,
    ) -> None:
        self.limits = limits or IsolationLimits()
        self.mode: IsolationMode = mode
        self.memo_dir = memo_dir
        self.idle_s = idle_s
        self._env = env
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._closed = False
        _live_probers.add(self)

    # -- public ----------------------------------------------------------------------
    def probe(self, cached: CachedVersion, policy: LoadPolicy, *, warmup: bool = True) -> bool:
        """Load (and warm up) ``cached`` in a limited child unless this node already passed it.

        Returns:
            True if a child ran now, False if isolation is off for it or a pass is remembered.

        Raises:
            IsolationFailed: the child crashed, hit a limit or tried to start a process.
            ServingError: the loader raised in the child; the same class, same message.
        """
        manifest = cached.manifest
        if not needs_isolation(self.mode, manifest):
            return False
        budget = self.limits.memory_for(manifest)
        memo = self._memo_path(cached, policy, warmup, budget)
        if memo is None:
            return self._probe(cached, policy, warmup, budget, None)
        if memo.exists():
            return False
        # NOTE: replicas on one node that see the same new version at once (every
        # replica, on an alias move) probe it once: the others wait here, then find
        # the pass. The kernel drops the lock if its holder dies. A failed probe leaves
        # no pass, so the next waiter probes again; one that waits longer than a probe
        # may take probes without the lock.
        memo.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _node_lock(memo.with_suffix(".lock"), self.limits.timeout_s + 120.0):
            if memo.exists():
                return False
            return self._probe(cached, policy, warmup, budget, memo)

    def _probe(
        self, cached: CachedVersion, policy: LoadPolicy, warmup: bool, budget: int, memo: Path | None
    ) -> bool:
        manifest = cached.manifest
        request = {
            "path": str(cached.path),
            "manifest": manifest.model_dump(mode="json"),
            "policy": policy.to_json(),
            "warmup": warmup,
            "memory_bytes": budget,
            "cpu_seconds": self.limits.cpu_seconds,
            "timeout_s": self.limits.timeout_s,
        }
        where = f"{cached.name}:{cached.version}"
        started = time.perf_counter()
        with self._lock:
            if self._closed:
                raise LoadError(f"{where}: the isolation helper is closed")
            reply = self._ask(request, where)
        self._raise_for(reply, where)
        log.info(
            "%s passed isolation in %.3f s (load and warm-up in the child: %s s)",
            where,
            time.perf_counter() - started,
            reply.get("seconds"),
        )
        if memo is not None:
            _write_memo(memo)
        return True

    def close(self) -> None:
        """Stop the helper (it also stops on its own when this process exits)."""
        with self._lock:
            self._closed = True
            self._stop_helper()

    # -- the helper ----------------------------------------------------------------
    def _ask(self, request: dict[str, Any], where: str) -> dict[str, Any]:
        line = (json.dumps(request) + "\n").encode()
        for attempt in (1, 2):
            proc = self._helper()
            assert proc.stdin is not None
            assert proc.stdout is not None
            try:
                proc.stdin.write(line)
                proc.stdin.flush()
            except OSError as exc:
                self._stop_helper()
                if attempt == 2:
                    raise IsolationFailed(
                        f"{where}: the isolation helper could not be started", "crash"
                    ) from exc
                continue  # NOTE: it had exited while idle; start a fresh one
            # NOTE: the helper enforces the probe's own deadline; this margin covers
            # importing a framework for the first time on a busy node.
            reply = _read_line(proc.stdout, self.limits.timeout_s + 120.0)
            if reply is not None:
                return reply
            idle_exit = proc.poll() == 0
            self._stop_helper()
            if idle_exit and attempt == 1:
                continue
            raise IsolationFailed(
                f"{where}: the isolation helper died or stopped answering during the probe", "crash"
            )
        raise AssertionError("unreachable")

    def _helper(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._stop_helper()
        env = child_env(self._env)
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serving.isolation.prober",
                str(os.getpid()),
                str(self.idle_s),
                str(self.limits.nice),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
            cwd="/",
        )
        return self._proc

    def _stop_helper(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()  # the helper exits when its stdin closes
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()

    # -- results ---------------------------------------------------------------------
    @staticmethod
    def _raise_for(reply: dict[str, Any], where: str) -> None:
        if reply.get("ok") is True:
            return
        reason = str(reply.get("reason", "crash"))
        message = str(reply.get("message", "no detail"))
        if reason == "error":
            cls = getattr(errors, str(reply.get("class", "")), None)
            if isinstance(cls, type) and issubclass(cls, ServingError) and cls is not IsolationFailed:
                raise cls(message)
            raise LoadError(message)
        if reason not in REASONS:
            reason = "crash"
        raise IsolationFailed(f"{where}: failed isolation ({reason}): {message}", reason)

    def _memo_path(self, cached: CachedVersion, policy: LoadPolicy, warmup: bool, budget: int) -> Path | None:
        if self.memo_dir is None:
            return None
        from serving import __version__
        from serving.formats import FORMATS

        fmt = FORMATS.get(cached.manifest.format)
        key = {
            "policy": policy.to_json(),
            "warmup": warmup,
            "memory_bytes": budget,
            "cpu_seconds": self.limits.cpu_seconds,
            "timeout_s": self.limits.timeout_s,
            "framework": fmt.framework_version() if fmt is not None else None,
            "serving": __version__,
            "python": sys.version,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.memo_dir / cached.name / f"{cached.manifest_sha256}-{digest}.ok"


@contextlib.contextmanager
def _node_lock(path: Path, timeout_s: float) -> Iterator[bool]:
    """An exclusive lock on ``path`` across the processes of this node; yields whether it holds it.

    After ``timeout_s`` without it (a holder stuck in a probe), it goes on without the lock:
    a second probe of the same version costs CPU, an endless wait would stall the swap.
    """
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    log.warning("%s: still locked after %.0f s; probing without the lock", path, timeout_s)
                    held = False
                    break
                time.sleep(0.05)
        yield held
    finally:
        os.close(fd)  # NOTE: closing releases the lock


def _write_memo(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, b"")


def _read_line(stream: IO[bytes], timeout: float) -> dict[str, Any] | None:
    """One JSON reply from the helper, or None if it died or the deadline passed."""
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        return None
    line = stream.readline(_RESULT_LIMIT)
    if not line:
        return None
    try:
        reply = json.loads(line)
    except ValueError:
        return None
    return reply if isinstance(reply, dict) else None


_live_probers: weakref.WeakSet[Prober] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for prober in list(_live_probers):
        prober.close()


# ---------------------------------------------------------------------------------
# The helper process (``python -m serving.isolation.prober PARENT_PID IDLE_S [NICE]``)
# ---------------------------------------------------------------------------------
_parent_pid: int | None = None
"""The serving process, in the helper: it exits once that is gone (probes check it too)."""


def _helper_main(parent_pid: int, idle_s: float, nice: int = 0) -> int:
    # NOTE: a terminal's Ctrl-C reaches the whole process group; stopping is the serving
    # process's call (it closes our stdin), so the helper ignores SIGINT (its children too).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # NOTE: not PR_SET_PDEATHSIG: it fires when the *thread* that started us ends, and a
    # shared prober's helper is started by whichever load thread probes first; that killed
    # it under the probes of every other thread. The loop below watches the parent instead.
    if os.getppid() != parent_pid:
        return 0
    global _parent_pid
    _parent_pid = parent_pid
    if nice > 0:
        with contextlib.suppress(OSError):
            os.nice(nice)  # NOTE: inherited by every probe child it forks
    from serving.hardening import harden_process

    harden_process()
    import serving.formats.warmup  # noqa: F401 -- NOTE: the loaders and warm_up, imported before any fork

    preloaded: set[str] = set()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        idle_until = time.monotonic() + idle_s
        ready: list[Any] = []
        while not ready:
            if os.getppid() != parent_pid:
                return 0  # NOTE: orphaned: the serving process is gone
            left = idle_until - time.monotonic()
            if left <= 0:
                return 0
            ready, _, _ = select.select([stdin], [], [], min(1.0, left))
        line = stdin.readline()
        if not line:
            return 0
        request = json.loads(line)
        fmt = str(request["manifest"].get("format", ""))
        if fmt not in preloaded:
            preloaded.add(fmt)
            facts = FORMAT_FACTS.get(fmt)
            _import_quietly(facts.preload if facts is not None else ())
            settle_caches()  # NOTE: before the fork: the probe child is confined
        # NOTE: a collection in the child would walk (and so copy-on-write) every
        # object the helper holds; frozen objects are never walked.
        gc.freeze()
        reply, learned, pending = _run_probe(request)
        stdout.write((json.dumps(reply) + "\n").encode())
        stdout.flush()
        if pending is not None:
            # NOTE: after answering: tearing down a child that holds a large model
            # takes a while and is not the serving process's wait.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pending[0], signal.SIGKILL)
            _reap(*pending)
        _import_quietly(learned)


def _import_quietly(modules: Any) -> None:
    import importlib

    for name in modules:
        if name.split(".")[0] in _WARM_PACKAGES:
            # NOTE: only a warm-up for later forks; the probe child imports what
            # it needs itself, so a module that fails here fails there with a message.
            with contextlib.suppress(Exception):
                importlib.import_module(name)


def _run_probe(
    request: dict[str, Any],
) -> tuple[dict[str, Any], list[str], tuple[int, int | None] | None]:
    """Fork one child for ``request``; wait for its result, its death or the deadline.

    Returns the reply, the modules worth importing in the helper, and for a pass
    the child (pid, pidfd) still to kill and reap.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover -- NOTE: runs in the probe child
        try:
            os.close(rfd)
            _child(request, wfd)
        finally:
            os._exit(_EXIT_INTERNAL)
    os.close(wfd)
    deadline = time.monotonic() + float(request["timeout_s"])
    data = b""
    eof = timed_out = False
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    exited = False
    while not eof:
        if _parent_pid is not None and os.getppid() != _parent_pid:
            # NOTE: orphaned mid-probe: nobody waits for the answer; free the child's memory now.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _reap(pid, pidfd)
            os._exit(0)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        watch = [rfd] if pidfd is None or exited else [rfd, pidfd]
        ready, _, _ = select.select(watch, [], [], min(remaining, 1.0))
        if rfd in ready:
            chunk = os.read(rfd, 65536)
            eof = not chunk
            data = (data + chunk)[:_RESULT_LIMIT]
        if pidfd is not None and pidfd in ready:
            exited = True
            # NOTE: dead, but a descendant it forked natively may hold the pipe open;
            # take what it wrote without waiting for an EOF that may never come.
            os.set_blocking(rfd, False)
            with contextlib.suppress(BlockingIOError):
                while chunk := os.read(rfd, 65536):
                    data = (data + chunk)[:_RESULT_LIMIT]
            break
    os.close(rfd)
    result = _parse_result(data)
    if result is not None and result.get("ok") is True and not timed_out:
        learned = [str(m) for m in result.get("modules", [])]
        return {"ok": True, "seconds": result.get("seconds")}, learned, (pid, pidfd)
    if timed_out:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _reap(pid, pidfd)
        message = f"still running after {request['timeout_s']} s"
        return {"ok": False, "reason": "timeout", "message": message}, [], None
    status = _reap(pid, pidfd, deadline)
    if result is not None and status is not None and not os.WIFSIGNALED(status):
        return result, [], None
    return classify(status, "the probe child"), [], None


def _reap(pid: int, pidfd: int | None, deadline: float | None = None) -> int | None:
    """Wait for ``pid`` (killing it at ``deadline``); its wait status."""
    try:
        if deadline is not None:
            while time.monotonic() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    return status
                if pidfd is not None:
                    select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
                else:
                    time.sleep(0.01)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return None
    finally:
        if pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(pidfd)


def _parse_result(data: bytes) -> dict[str, Any] | None:
    try:
        result = json.loads(data)
    except ValueError:
        return None
    return result if isinstance(result, dict) else None


def _child(request: dict[str, Any], wfd: int) -> None:  # pragma: no cover -- NOTE: probe child
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)  # NOTE: never the helper's protocol pipe
    before = set(sys.modules)
    confine(int(request["memory_bytes"]), int(request["cpu_seconds"]))
    gc.disable()  # NOTE: short-lived; RLIMIT_AS still bounds what garbage can hold
    started = time.perf_counter()
    result = _load_and_warm(request)
    result["seconds"] = time.perf_counter() - started
    if result.get("ok"):
        result["modules"] = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in _WARM_PACKAGES)
    os.write(wfd, json.dumps(result).encode())
    os.close(wfd)
    os._exit(0)


def _load_and_warm(request: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover -- probe child
    return load_in_child(request)[1]


if __name__ == "__main__":
    sys.exit(_helper_main(int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0))
