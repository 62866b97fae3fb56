"""Model workers: each loaded version predicts in its own limited child process.

The process that owns the sockets never runs model code. A :class:`WorkerPredictor`
is a :class:`~serving.formats.base.Predictor` like any other, so the slot, leases,
swaps and every transport are unchanged; behind it a child process (``python -m
serving.isolation.worker``) loaded the version and answers one request at a time::

    serving process                                   model worker (one per version)
      WorkerPredictor.predict(inputs)                   confined: RLIMIT_AS, no core,
        pack inputs -> its memory file (sealed)         no_new_privs, no new processes,
        {"op": "predict", headers} --SOCK_SEQPACKET-->  CPU-time limit per request
                                                        predict on views of the file
        unpack, check, copy <----------------------    pack outputs -> its memory file
        wait at most the deadline                       {"ok": true, headers}

A worker that crashes, runs out of memory, breaks the protocol or runs past the
request's deadline is killed; the requests it held get :class:`WorkerFailed` (503)
or :class:`DeadlineExceeded` (504) with the reason, and it is started again with
backoff while every other model keeps answering. A version whose worker fails
within its first :attr:`WorkerLimits.probation_requests` requests is reported to
``on_probation_failure``: the slot puts the previous version back.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import importlib
import itertools
import json
import logging
import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from serving import errors, metrics
from serving.cache import CachedVersion
from serving.errors import DeadlineExceeded, InternalError, IsolationFailed, ServingError, WorkerFailed
from serving.formats.base import LoadPolicy, Predictor
from serving.formats.table import FORMAT_FACTS
from serving.manifest import Manifest, TensorSpec

from .confine import (
    child_env,
    classify,
    confine,
    describe,
    load_in_child,
    oom_kills,
    out_of_memory,
    settle_caches,
)
from .shm import Arena, ProtocolViolation, map_peer, pack, unpack
from .zygote import Forked, ZygoteGone, fork_worker, serve, start_module

__all__ = ["DEADLINE", "WorkerLimits", "WorkerPool", "WorkerPredictor"]

log = logging.getLogger(__name__)

DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "serving_predict_deadline", default=None
)
"""A request's own deadline (``time.monotonic()``), set by the caller around a predict;
the model's ``predict_timeout_s`` still caps it."""

_MESSAGE_LIMIT = 1 << 20
_SEND_TIMEOUT_S = 5.0
_MIN_SEND_S = 0.002
"""A request with less of its deadline left than this is answered 504 without being sent."""
_RETURNED_ERRORS = {
    cls.__name__: cls
    for cls in (
        errors.InvalidInput,
        errors.PayloadTooLarge,
        errors.LoadError,
        errors.UntrustedArtifact,
        errors.MissingExtra,
        errors.IntegrityError,
        errors.UnknownFormat,
        errors.InvalidManifest,
        errors.InvalidRequest,
    )
}
"""The errors a worker may answer with, as themselves; anything else is an internal error."""
_WAITS = ThreadPoolExecutor(32, thread_name_prefix="model-worker-wait")
"""Threads for what a request awaited on the loop cannot do there: wait for a worker a thread
holds, kill and reap a failed one (not the loop's default executor, which others share)."""


@dataclass(frozen=True)
class WorkerLimits:
    """What one model worker may use, and how its failures are handled.

    Attributes:
        memory_bytes: address space on top of the interpreter's; None: max(1 GiB,
            4 x the version's bytes), as for the isolation probe.
        load_timeout_s: wall clock for starting, loading and warming up.
        load_cpu_seconds: CPU time for the load.
        predict_timeout_s: the most a request may take (its own deadline may be shorter);
            past it the worker is killed and started again, and the request gets 504.
        probation_requests: a version whose worker fails within this many requests
            is reported as failed (the previous version goes back).
        restart_backoff_s: first wait before a restart; doubles up to ``restart_backoff_max_s``.
        max_reply_bytes: the most bytes of tensors one answer may hold.
        nice: niceness added to the worker.
        start: ``fork``: forked from this process's zygote, with its framework imported
            (:mod:`serving.isolation.zygote`); ``spawn``: a new interpreter each time.
    """

    memory_bytes: int | None = None
    load_timeout_s: float = 300.0
    load_cpu_seconds: int = 120
    predict_timeout_s: float = 30.0
    probation_requests: int = 10
    restart_backoff_s: float = 0.5
    restart_backoff_max_s: float = 30.0
    max_reply_bytes: int = 64 * 1024**2
    nice: int = 0
    start: Literal["fork", "spawn"] = "fork"

    def memory_for(self, manifest: Manifest) -> int:
        if self.memory_bytes is not None:
            return self.memory_bytes
        return max(1 << 30, 4 * manifest.total_bytes)


class _Failure(Exception):
    """The worker is gone: ``reason`` is one of confine.REASONS or ``protocol``."""

    def __init__(self, reason: str, message: str, *, before: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.before = before
        """Found before the request was sent (the worker was gone already): not its request's doing."""


def _spawn(env: dict[str, str], nice: int, child: socket.socket) -> subprocess.Popen[bytes]:
    """A worker in a new interpreter, on socket ``child`` (``PARENT_PID NICE FD``)."""
    return start_module("serving.isolation.worker", [str(os.getpid()), str(nice)], child, env)


class _Process:
    """One worker process and its end of the socket and memory files."""

    def __init__(
        self,
        env: dict[str, str],
        nice: int,
        peer_limit: int,
        start: str = "fork",
        formats: Collection[str] = (),
    ) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.oom_kills = oom_kills()
        """The OOM killer's count when it started: a SIGKILL with no OOM kill since is not an oom."""
        try:
            self.popen: subprocess.Popen[bytes] | Forked
            if start == "fork":
                try:
                    self.popen = fork_worker(env, child.fileno(), formats, nice)
                except ZygoteGone as exc:
                    log.warning("model worker started from scratch: %s", exc)
                    # NOTE: a new socket: a worker the zygote forked before it failed may hold this one.
                    parent.close()
                    child.close()
                    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    self.popen = _spawn(env, nice, child)
            else:
                self.popen = _spawn(env, nice, child)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        # NOTE: a send never blocks for long: a worker that stops reading is a failed worker.
        parent.settimeout(_SEND_TIMEOUT_S)
        self.sock = parent
        self.peer_view: Any = None
        self.peer_limit = peer_limit
        self.arena_sent = False
        self.killed = False
        """We sent it SIGKILL while it was alive (so a SIGKILL status is ours)."""

    @property
    def orphaned(self) -> bool:
        """It ended with its zygote: not its own doing, nor its version's."""
        return isinstance(self.popen, Forked) and self.popen.orphaned

    @property
    def outside_kill_baseline(self) -> int | None:
        """What :func:`classify` compares a SIGKILL against: the OOM kills when it started, or
        None once we killed it ourselves (then a SIGKILL is ours, and no outsider's)."""
        return None if self.killed else self.oom_kills

    @property
    def shut_down(self) -> bool:
        """It ended with a zygote stopped on purpose, as the serving process exits."""
        return isinstance(self.popen, Forked) and self.popen.shut_down

    def send(self, message: dict[str, Any], fds: list[int]) -> None:
        data = json.dumps(message).encode()
        if self.readable(0):
            # NOTE: an answer nobody asked for (or a hang-up): the next reply would be the wrong one.
            raise _Failure(
                "protocol", "the worker sent a message it was not asked for, or hung up", before=True
            )
        try:
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.send(data)
        except OSError as exc:
            why = f"the worker stopped reading ({exc.strerror or exc})"
            raise _Failure("crash", why, before=True) from exc

    def readable(self, timeout: float) -> bool:
        """Whether the worker sent something within ``timeout`` seconds (poll: any fd number)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(max(0, math.ceil(timeout * 1000))))

    def receive(self, deadline: float) -> dict[str, Any]:
        """The worker's answer; a peer memory file it sends is mapped (and checked) here."""
        if not self.readable(deadline - time.monotonic()):
            raise TimeoutError
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, _MESSAGE_LIMIT, 1)
        except OSError as exc:
            raise _Failure("crash", f"the worker's socket failed ({exc.strerror or exc})") from exc
        try:
            if not data:
                raise _Failure("crash", "")
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise _Failure("protocol", "the worker sent an oversized message")
            if fds:
                view = map_peer(fds[0], max_size=self.peer_limit, readonly=True)
                self.close_view()
                self.peer_view = view
            reply = json.loads(data)
            if not isinstance(reply, dict):
                raise _Failure("protocol", "the worker's answer is not an object")
            return reply
        except (ProtocolViolation, ValueError, RecursionError, OSError, MemoryError) as exc:
            # NOTE: whatever the worker's bytes make a parser or mmap raise is its fault.
            raise _Failure("protocol", f"the worker broke the protocol: {type(exc).__name__}: {exc}") from exc
        finally:
            for fd in fds:
                os.close(fd)

    def close_view(self) -> None:
        if self.peer_view is not None:
            with contextlib.suppress(BufferError):
                self.peer_view.close()
            self.peer_view = None

    def kill(self, grace_s: float = 0.0) -> int | None:
        """Stop it (after ``grace_s`` to exit on its own) and reap it; its wait status."""
        if grace_s > 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace_s)
        if isinstance(self.popen, Forked):
            # NOTE: through its pidfd; its zygote kills its process group before reaping it.
            self.killed = self.popen.kill() or self.killed
        elif self.popen.returncode is None:
            # NOTE: not reaped yet, so its process group id is still its own: signal the group even
            # when the leader has exited (what it started natively may live on). WNOWAIT: whether
            # it is alive, without reaping it.
            with contextlib.suppress(ChildProcessError):
                self.killed = (
                    os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
                )
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGKILL)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            return None
        finally:
            self.close()
        return _wait_status(self.popen.returncode)

    def stop(self, timeout: float = 2.0) -> None:
        """Close its socket (it exits on EOF), then kill it if it lingers."""
        self.close()
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def close(self) -> None:
        self.sock.close()
        self.close_view()


@dataclass(frozen=True)
class _Sent:
    """A request the worker has been sent, and when its answer is due."""

    proc: _Process
    model_deadline: float
    """Past this the worker is killed (the model's own limit, from the send)."""
    client_first: bool
    """The request's own deadline comes before the model's."""
    wait_until: float
    """The sooner of the two."""
    budget_s: float
    """What was left of the deadline at the send, for messages."""


async def _readable(loop: asyncio.AbstractEventLoop, proc: _Process, until: float) -> None:
    """Wait on ``loop``, until ``until`` (``time.monotonic``), for the worker's answer or hang-up.

    Raises:
        TimeoutError: nothing came in time.
    """
    if proc.readable(0):
        return
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    fd = proc.sock.fileno()
    loop.add_reader(fd, wake)
    try:
        async with asyncio.timeout(max(0.0, until - time.monotonic())):
            await ready
    finally:
        loop.remove_reader(fd)


def _killed_by(status: int | None, sig: int) -> bool:
    return status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == sig


def _wait_status(returncode: int | None) -> int | None:
    """Popen's returncode back as a wait status, for :func:`confine.classify`."""
    if returncode is None:
        return None
    if returncode < 0:
        return -returncode  # NOTE: WIFSIGNALED with WTERMSIG == the signal
    return (returncode & 0xFF) << 8


_KEYS = itertools.count()
"""Version keys, unique in this process: a version that moves between workers never takes the key
of another version in the worker it left."""


class _Host:
    """One model worker over its lifetimes: the process (started again after a failure), the
    versions it holds (one; several in a :class:`WorkerPool`), and the lock that lets one
    request in at a time.

    Args:
        name: for messages, threads and its memory file (``iris:3``, ``shared-0``).
        limits: load time, restart backoff, niceness and the reply size it maps.
        env: the worker's environment.
        shared: several versions may live in it; it is confined at its first load, to
            ``memory_bytes``, and stops ``keep_idle_s`` after its last version leaves.
    """

    def __init__(
        self,
        name: str,
        limits: WorkerLimits,
        env: dict[str, str] | None,
        *,
        shared: bool = False,
        memory_bytes: int | None = None,
        model: str | None = None,
        keep_idle_s: float = 0.0,
    ) -> None:
        self.name = name
        self.model = model
        """A dedicated worker's model (its metrics label)."""
        self.limits = limits
        self.env = env
        """The worker's environment; None: :func:`confine.child_env` at each start (run-time paths)."""
        self.shared = shared
        self.memory_bytes = memory_bytes
        self.call_lock = threading.Lock()
        """Held by the request the worker is computing (one at a time), and by loads into it."""
        self.gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        """Per event loop, the queue its requests wait in for the call lock."""
        self.state = threading.Lock()
        self.closed = threading.Event()
        """A dedicated worker's version left: it is never started again."""
        self.arena = Arena(f"serving-{name[:200]}-in")  # NOTE: memfd names stop at 249 bytes
        self.proc: _Process | None = None
        self.restarting = False
        self.failures = 0
        """Failures since the last answered request (sets the backoff)."""
        self.failed_at = 0.0
        self.pending_bytes = 0
        """Versions placed here that are still loading."""
        self.restarts = 0
        self.last_failure: str | None = None
        self.tenants: dict[int, WorkerPredictor] = {}
        self.keep_idle_s = keep_idle_s
        """0 once its pool closed: it stops with its last version and never starts ahead."""
        self.idle_timer: threading.Timer | None = None
        """Stops the running worker once it has held no version for ``keep_idle_s``."""

    @property
    def pid(self) -> int | None:
        proc = self.proc
        return proc.popen.pid if proc is not None else None

    def placed(self, expected_bytes: int) -> None:
        """A version placed here finished joining (or failed to)."""
        with self.state:
            self.pending_bytes = max(0, self.pending_bytes - expected_bytes)

    def resident_bytes(self) -> int:
        """What its versions' loads added."""
        with self.state:
            return sum(t.load_bytes for t in self.tenants.values())

    def status(self) -> dict[str, Any]:
        with self.state:
            models = sorted(t.where for t in self.tenants.values())
        return {
            "name": self.name,
            "pid": self.pid,
            "restarts": self.restarts,
            "last_failure": self.last_failure,
            "versions": models,
            "bytes": self.resident_bytes(),
        }

    # -- versions in and out ---------------------------------------------------------
    def add(self, tenant: WorkerPredictor) -> dict[str, Any]:
        """Load ``tenant``'s version into the worker (starting one if none runs); its specs.

        Raises:
            WorkerFailed: a shared worker is restarting; try again.
            IsolationFailed: the load crashed the worker, or ran out of memory or time (a shared
                worker is then started again for the versions it held).
            ServingError: the loader refused the version.
        """
        with self.call_lock:
            with self.state:
                proc = self.proc
                if proc is None and self.restarting and self.tenants:
                    raise WorkerFailed(
                        f"{tenant.where}: its shared model worker is restarting after: {self.last_failure}",
                        reason="restarting",
                    )
                tenant.key = next(_KEYS)
            fresh = proc is None
            self.keep_running()
            if proc is None:
                proc = self.spawn((tenant.format,))
            try:
                reply = self.load_into(proc, tenant)
            except IsolationFailed as exc:
                if not fresh:
                    # NOTE: the worker died under the versions it held: they start again without this one.
                    told = f"a version loading beside them failed: {exc}"
                    self.fail(proc, exc.reason or "crash", told, kill=False, label=tenant.model)
                raise
            except WorkerFailed:
                if not fresh:
                    self.fail(proc, "crash", "", kill=False)
                raise
            except BaseException:
                if fresh:
                    proc.kill()
                else:
                    # NOTE: refused, the worker goes on: if it held nothing, it is idle again.
                    with self.state:
                        idle = self.proc is proc and not self.tenants
                    if idle:
                        self.stop_when_idle()
                raise
            with self.state:
                self.tenants[tenant.key] = tenant
                if fresh:
                    self.proc = proc
                    self.restarting = False
            if fresh:
                self.watch(proc)
            return reply

    def remove(self, tenant: WorkerPredictor) -> None:
        """Unload ``tenant``'s version; the worker stops with its last version. Called on an event
        loop (the last lease of a retired version given back by a request awaited there), the
        waiting happens in a thread."""
        with self.state:
            held = self.tenants.pop(tenant.key, None) is not None
            if not self.shared:
                # NOTE: its one version left: stop it now (a request it still computes fails).
                proc, self.proc = self.proc, None
                self.closed.set()

        def stop_dedicated() -> None:
            if proc is not None:
                proc.stop()
            with self.call_lock:
                self.arena.close()

        def unload_shared() -> None:
            # NOTE: under the call lock: a version joining meanwhile holds it, so "last" is decided
            # after the join, never under it.
            with self.call_lock:
                with self.state:
                    current = self.proc
                    last = not self.tenants
                    stop = last and self.keep_idle_s <= 0
                    if stop:
                        self.proc = None
                if current is None:
                    return  # NOTE: restarting: the restart loads only the versions it still holds
                if stop:
                    current.stop()
                    self.arena.close()
                    return
                if held:
                    self.unload(current, tenant)
                if last:
                    self.stop_when_idle()

        work = unload_shared if self.shared else stop_dedicated
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            work()
        else:
            threading.Thread(target=work, name=f"unload-{tenant.where}", daemon=True).start()

    # -- an idle shared worker ----------------------------------------------------------
    def prestart(self, formats: Collection[str]) -> None:
        """Start the worker with no version, and have it import ``formats``' frameworks, so the
        first load into it skips both; it stops after ``keep_idle_s`` if no version joins."""
        with self.call_lock:
            with self.state:
                if self.proc is not None or self.restarting or self.tenants or self.keep_idle_s <= 0:
                    return
            proc = self.spawn(formats)
            try:
                proc.send({"op": "prepare", "formats": sorted(formats)}, [])
                reply = proc.receive(time.monotonic() + self.limits.load_timeout_s)
            except (TimeoutError, _Failure) as exc:
                proc.kill()
                log.warning("%s: the model worker did not start ahead of its first load: %s", self.name, exc)
                return
            if reply.get("ok") is not True:
                proc.kill()
                log.warning("%s: the model worker did not start ahead: %s", self.name, reply.get("message"))
                return
            with self.state:
                self.proc = proc
            self.watch(proc)
            self.stop_when_idle()

    def keep_running(self) -> None:
        """A version joins: the idle worker is no longer stopped (the caller holds the call lock)."""
        timer, self.idle_timer = self.idle_timer, None
        if timer is not None:
            timer.cancel()

    def stop_when_idle(self) -> None:
        """Stop the running worker in ``keep_idle_s`` unless a version joins it first (the caller
        holds the call lock). Whatever replaces or ends that worker first cancels the timer: a
        version joining, a new idle period, the worker's death, :meth:`stop_idle`."""
        self.keep_running()
        timer = threading.Timer(self.keep_idle_s, lambda: self.stop_idle(timer))
        timer.name = f"idle-{self.name}"
        timer.daemon = True
        self.idle_timer = timer
        timer.start()

    def stop_idle(self, timer: threading.Timer | None = None) -> None:
        """Stop the worker if it holds no version (``timer``: only if that timer was not replaced
        or cancelled while it waited for the lock)."""
        with self.call_lock:
            if timer is not None and timer is not self.idle_timer:
                return
            with self.state:
                current = self.proc
                if current is None or self.tenants:
                    return
                self.proc = None
            self.keep_running()
            current.stop()
            self.arena.close()

    def idle_pid(self) -> int | None:
        """The process id of the worker while it runs with no version, else None."""
        with self.state:
            proc = self.proc
            return proc.popen.pid if proc is not None and not self.tenants else None

    def unload(self, proc: _Process, tenant: WorkerPredictor) -> None:
        """Have ``proc`` drop ``tenant``'s version (the caller holds the call lock); a worker that
        does not answer in time, or fails, is taken out of service."""
        try:
            proc.send({"op": "unload", "key": tenant.key}, [])
            proc.receive(time.monotonic() + self.limits.load_timeout_s)
        except TimeoutError:
            self.fail(proc, "timeout", "still unloading a version", kill=True)
        except _Failure as failure:
            self.fail(proc, failure.reason, failure.message, kill=True)

    def spawn(self, formats: Collection[str] = ()) -> _Process:
        """A new worker process; forked, it comes with ``formats``' frameworks imported."""
        env = self.env if self.env is not None else child_env()
        peer_limit = 2 * self.limits.max_reply_bytes + (2 << 20)
        return _Process(env, self.limits.nice, peer_limit, self.limits.start, formats)

    def load_into(self, proc: _Process, tenant: WorkerPredictor) -> dict[str, Any]:
        """Load ``tenant`` into ``proc``: its answer. ``proc`` is killed when it is not fit to go
        on (it failed, or ran out of memory while loading).

        Raises:
            IsolationFailed: ``proc`` crashed, ran out of memory or time, or broke the protocol.
            ServingError: the loader refused the version (``proc`` goes on).
        """
        deadline = time.monotonic() + self.limits.load_timeout_s
        request = {**tenant.load_request, "key": tenant.key, "shared": self.shared}
        if self.memory_bytes is not None:
            request["memory_bytes"] = self.memory_bytes
        try:
            proc.send(request, [])
            reply = proc.receive(deadline)
        except TimeoutError:
            proc.kill()
            seconds = self.limits.load_timeout_s
            raise tenant.isolation_failed("timeout", f"still loading after {seconds} s") from None
        except _Failure as failure:
            status = proc.kill()
            if failure.before or proc.orphaned:
                # NOTE: it was gone before this version was sent, or it ended with its zygote:
                # not this version's doing.
                raise WorkerFailed(
                    f"{tenant.where}: its model worker had stopped; it is restarting", reason="restarting"
                ) from None
            if failure.reason == "crash":
                told = classify(status, "the model worker", proc.outside_kill_baseline)
                raise tenant.isolation_failed(told["reason"], told["message"]) from None
            raise tenant.isolation_failed("crash", failure.message) from None
        if reply.get("ok") is not True:
            reason = reply.get("reason")
            if reason in ("oom", "timeout", "exec"):
                proc.kill()
                raise tenant.isolation_failed(str(reason), str(reply.get("message"))[:4000])
            cls = _RETURNED_ERRORS.get(str(reply.get("class")), errors.LoadError)
            raise cls(str(reply.get("message", ""))[:4000])
        try:
            if not isinstance(reply.get("inputs"), list) or not isinstance(reply.get("outputs"), list):
                raise ValueError("the specs are missing")
            [TensorSpec.model_validate(s) for s in reply["inputs"] + reply["outputs"]]
        except ValueError as exc:
            proc.kill()
            raise tenant.isolation_failed("crash", f"the model worker broke the protocol: {exc}") from exc
        return reply

    # -- one request ---------------------------------------------------------------
    def current(self, tenant: WorkerPredictor, deadline: float) -> _Process:
        """The worker to send ``tenant``'s request to (the caller holds the call lock)."""
        if tenant.broken is not None:
            raise WorkerFailed(f"{tenant.where}: {tenant.broken}", reason="failed")
        if tenant.key not in self.tenants:
            raise WorkerFailed(f"{tenant.where}: unloaded", reason="closed")
        proc = self.proc
        if proc is None:
            raise WorkerFailed(
                f"{tenant.where}: the model worker is restarting after: {self.last_failure or 'closed'}",
                reason="restarting",
            )
        if deadline - time.monotonic() < _MIN_SEND_S:
            raise DeadlineExceeded(
                f"{tenant.where}: the request's deadline passed before the model could run"
            )
        return proc

    # -- failures and restarts -----------------------------------------------------
    def fail(
        self,
        proc: _Process,
        reason: str,
        message: str,
        *,
        kill: bool,
        blame: WorkerPredictor | None = None,
        label: str | None = None,
    ) -> tuple[str, str]:
        """Take ``proc`` out of service (once) and schedule a restart; the reason and message told.
        ``blame``: the version whose request failed it (its probation; in a shared worker it also
        leaves for a worker of its own, so it cannot fail its neighbours again). ``label``: the
        model to count the failure under when none is blamed."""
        if kill:
            # NOTE: a worker that hung up is usually dying: give it a moment so its own death,
            # not our SIGKILL (read as "oom"), is what is reported.
            dying = reason == "crash" and (not message or self.shared)
            status = proc.kill(grace_s=1.0 if dying else 0.0)
        else:
            proc.close()
            status = _wait_status(proc.popen.returncode)
        if proc.shut_down:
            # NOTE: the serving process is exiting (close_zygotes at exit): no failure, no restart.
            with self.state:
                if self.proc is proc:
                    self.proc = None
            log.info("%s: model worker stopped with the server", self.name)
            return "closed", "the server is stopping"
        if proc.orphaned:
            # NOTE: it ended with its zygote: no version's doing.
            reason, message, blame = "crash", "its zygote ended", None
        elif reason == "crash" and not message:
            told = classify(status, "the worker", proc.outside_kill_baseline)
            reason, message = told["reason"], told["message"]
        if self.shared and blame is not None and not proc.killed and _killed_by(status, signal.SIGKILL):
            blame = (
                None  # NOTE: killed from outside (the kernel's OOM killer, an operator), not by its request
            )
        with self.state:
            if self.proc is not proc:
                return reason, message
            self.proc = None
            self.restarting = True
            exiled = self.shared and blame is not None and self.tenants.pop(blame.key, None) is not None
        self.last_failure = f"{reason}: {message}"
        self.failed_at = time.monotonic()
        metrics.WORKER_FAILURES.inc(model=label or self.label(blame), reason=reason)
        log.warning("%s: model worker failed (%s: %s)", self.name, reason, message)
        if blame is not None:
            blame.failed_in(reason, message)
        if exiled and blame is not None:
            blame.leave_shared(f"{reason}: {message}")
        self.failures += 1
        threading.Thread(target=self.restart, name=f"restart-{self.name}", daemon=True).start()
        return reason, message

    def restart(self) -> None:
        exponent = min(max(0, self.failures - 1), 20)
        delay = min(self.limits.restart_backoff_max_s, self.limits.restart_backoff_s * 2**exponent)
        while not self.closed.wait(delay):
            with self.state:
                if not self.tenants or self.proc is not None:
                    self.restarting = self.proc is None and bool(self.tenants)
                    return
            try:
                proc, loaded = self.revive()
            except Exception as exc:  # NOTE: a restart thread must never die
                if not isinstance(exc, ServingError):
                    log.exception("%s: model worker restart failed", self.name)
                self.last_failure = f"restart failed: {exc}"
                log.warning("%s: model worker restart failed: %s", self.name, exc)
                self.failures += 1
                delay = min(self.limits.restart_backoff_max_s, delay * 2)
                continue
            with self.state:
                unwanted = self.closed.is_set() or not self.tenants or self.proc is not None
                if unwanted:
                    self.restarting = False
                else:
                    self.restarts += 1
                    self.proc = proc
                    self.restarting = False
                left = [t for t in loaded if t.key not in self.tenants]
            if unwanted:
                proc.stop()
                return
            metrics.WORKER_RESTARTS.inc(model=self.label())
            log.info("%s: model worker restarted (pid %s)", self.name, proc.popen.pid)
            self.watch(proc)
            if left:
                # NOTE: versions that left while the others loaded again: unload them.
                with self.call_lock:
                    for tenant in left:
                        if self.proc is not proc:
                            break
                        self.unload(proc, tenant)
            return

    def revive(self) -> tuple[_Process, list[WorkerPredictor]]:
        """A new worker that loaded its versions again, and the versions it loaded. In a shared
        worker, a version that no longer loads is failed on this replica and left out, and the
        others start over."""
        while True:
            with self.state:
                formats = {tenant.format for tenant in self.tenants.values()}
            proc = self.spawn(formats)
            loaded: list[WorkerPredictor] = []
            loading: WorkerPredictor | None = None
            try:
                with self.state:
                    tenants = list(self.tenants.values())
                for loading in tenants:
                    with self.state:
                        if loading.key not in self.tenants:
                            continue  # NOTE: it left meanwhile
                    self.load_into(proc, loading)
                    loading.reload_failures = 0
                    loaded.append(loading)
                return proc, loaded
            except ServingError as exc:
                proc.kill()
                if not self.shared or loading is None:
                    raise
                loading.reload_failures += 1
                if loading.reload_failures < 2:
                    raise  # NOTE: maybe the node, not the version: back off and try again first
                with self.state:
                    held = self.tenants.pop(loading.key, None) is not None
                    rest = bool(self.tenants)
                if held:
                    loading.fail_for_good(f"it did not load again after its shared worker restarted: {exc}")
                if not rest:
                    raise
            except BaseException:
                proc.kill()
                raise

    def label(self, blame: WorkerPredictor | None = None) -> str:
        """The ``model`` label of its failures and restarts: its model, or in a shared worker the
        model whose request failed it, else the worker's name (once per failure, not per model)."""
        if blame is not None:
            return blame.model
        return self.model or self.name

    def watch(self, proc: _Process) -> None:
        """Notice a worker that dies between requests, so it is back before the next one."""

        def wait() -> None:
            proc.popen.wait()
            if self.closed.is_set() or self.proc is not proc:
                return
            with self.call_lock:
                with self.state:
                    idle = self.proc is proc and self.shared and not self.tenants
                    if idle:
                        # NOTE: it held no version: no one's failure; the next load starts one.
                        self.proc = None
                if idle:
                    self.keep_running()
                    told = classify(
                        _wait_status(proc.popen.returncode),
                        "the idle model worker",
                        proc.outside_kill_baseline,
                    )
                    log.warning("%s: the idle model worker ended: %s", self.name, told["message"])
                    proc.close()
                    return
                if self.proc is proc:
                    with self.state:
                        only = list(self.tenants.values()) if not self.shared else []
                    self.fail(proc, "crash", "", kill=False, blame=only[0] if len(only) == 1 else None)

        threading.Thread(target=wait, name=f"watch-{self.name}", daemon=True).start()


class WorkerPool:
    """Shared model workers: ``size`` processes that each hold several versions, for models with
    ``workers: shared``. A version goes to the worker that holds the fewest bytes.

    The trade-off: a crash, hang or memory blow-up in one version costs every version in its
    worker a restart (they are loaded again, with backoff), never the serving process or the
    other workers, a crash while a version joins included. A version that failed to join is
    remembered (by its manifest digest) and loads in a worker of its own from then on, so it
    costs its neighbours one restart at most.
    """

    def __init__(
        self,
        size: int,
        limits: WorkerLimits,
        *,
        memory_bytes: int,
        env: dict[str, str] | None = None,
        keep_idle_s: float = 0.0,
    ) -> None:
        self.memory_bytes = memory_bytes
        self.hosts = [
            _Host(f"shared-{i}", limits, env, shared=True, memory_bytes=memory_bytes, keep_idle_s=keep_idle_s)
            for i in range(size)
        ]
        self._placing = threading.Lock()
        self._refused: dict[str, str] = {}

    def place(self, expected_bytes: int) -> _Host:
        """The worker for a new version of about ``expected_bytes``: among those not restarting,
        one with room for it under ``memory_bytes``, the one holding the fewest bytes (a version
        still loading counts as its expected bytes)."""
        with self._placing:

            def load(host: _Host) -> int:
                return host.resident_bytes() + host.pending_bytes

            def serving(host: _Host) -> bool:
                return not (host.restarting and host.tenants)

            candidates = [h for h in self.hosts if serving(h)] or self.hosts
            roomy = [h for h in candidates if load(h) + expected_bytes <= self.memory_bytes] or candidates
            host = min(roomy, key=lambda h: (load(h), len(h.tenants)))
            with host.state:
                host.pending_bytes += expected_bytes
            return host

    def refused(self, digest: str) -> str | None:
        """Why the version with this manifest digest failed to join a shared worker (it then loads
        in a worker of its own), or None."""
        with self._placing:
            return self._refused.get(digest)

    def refuse(self, digest: str, why: str) -> None:
        with self._placing:
            if len(self._refused) >= 10_000:
                self._refused.pop(next(iter(self._refused)))
            self._refused[digest] = why

    def status(self) -> list[dict[str, Any]]:
        return [host.status() for host in self.hosts]

    def prestart(self, formats: Collection[str]) -> list[threading.Thread]:
        """Start every worker that is not running, each importing ``formats``' frameworks, in
        the background; the threads that do it."""
        threads = [
            threading.Thread(target=host.prestart, args=(formats,), name=f"prestart-{host.name}", daemon=True)
            for host in self.hosts
        ]
        for thread in threads:
            thread.start()
        return threads

    def idle_pids(self) -> list[int]:
        """The workers running with no version (kept for ``keep_idle_s``, or started ahead)."""
        return [pid for host in self.hosts if (pid := host.idle_pid()) is not None]

    def close(self) -> None:
        """Stop the workers that hold no version; the others stop with their last version, and
        none starts ahead any more."""
        for host in self.hosts:
            host.keep_idle_s = 0.0
        self.stop_idle()

    def stop_idle(self) -> None:
        """Stop the workers that hold no version now (a memory budget needs their room)."""
        for host in self.hosts:
            host.stop_idle()


class WorkerPredictor(Predictor):
    """A version loaded in a model worker process; predicts there, within a deadline.

    Args:
        cached: the verified version in the loader cache.
        policy: what its loader may trust.
        limits: memory, time and restart limits.
        model: the model's name, for metrics and messages.
        warmup: run the manifest's example in the worker before it serves.
        env: the worker's environment (no secrets; the caller scrubs it).
        on_probation_failure: called (from a background thread) with a message when
            the worker fails within its first ``probation_requests`` requests.
        pool: load into one of these shared workers; None: a worker of its own.

    Raises:
        IsolationFailed: the worker crashed, ran out of memory or time while loading.
        ServingError: the loader refused the version; the same class and message.
    """

    def __init__(
        self,
        cached: CachedVersion,
        policy: LoadPolicy,
        limits: WorkerLimits,
        *,
        model: str,
        warmup: bool = True,
        env: dict[str, str] | None = None,
        on_probation_failure: Callable[[str], None] | None = None,
        pool: WorkerPool | None = None,
    ) -> None:
        self.where = f"{cached.name}:{cached.version}"
        self.model = model
        self.limits = limits
        self.on_probation_failure = on_probation_failure
        self.load_request = {
            "op": "load",
            "path": str(cached.path),
            "manifest": cached.manifest.model_dump(mode="json"),
            "policy": policy.to_json(),
            "warmup": warmup,
            "memory_bytes": limits.memory_for(cached.manifest),
            "cpu_seconds": limits.load_cpu_seconds,
        }
        self.format = cached.manifest.format
        self.key = 0
        """Its name in the worker."""
        self.reload_failures = 0
        """Restarts of its shared worker in a row in which it failed to load again."""
        self._pool = pool
        self._digest = cached.manifest_sha256
        self._env = env
        self._closed = False
        self.broken: str | None = None
        """Why it can no longer be served here (it did not load again after a restart)."""
        self.load_bytes = cached.manifest.total_bytes
        """What its load added to the worker's resident memory (its files' size until measured)."""
        self._served = 0
        """Requests this version answered (counts towards probation)."""
        if pool is not None and pool.refused(cached.manifest_sha256) is None:
            self._host = pool.place(cached.manifest.total_bytes)
            try:
                spec = self._host.add(self)
            except IsolationFailed as exc:
                pool.refuse(cached.manifest_sha256, str(exc))
                raise
            finally:
                self._host.placed(cached.manifest.total_bytes)
        else:
            if pool is not None:
                log.warning("%s: it failed in a shared worker; it loads in a worker of its own", self.where)
            self._host = _Host(self.where, limits, child_env(env), model=model)
            spec = self._host.add(self)
        measured = spec.get("bytes")
        if isinstance(measured, int) and measured > 0:
            self.load_bytes = max(measured, cached.manifest.total_bytes)
        self.inputs = [TensorSpec.model_validate(s) for s in spec["inputs"]]
        self.outputs = [TensorSpec.model_validate(s) for s in spec["outputs"]]
        self._output_names = frozenset(o.name for o in self.outputs)
        primary = spec.get("primary")
        self._primary = (
            primary if isinstance(primary, str) and primary in {o.name for o in self.outputs} else None
        )

    # -- Predictor ---------------------------------------------------------------
    @property
    def primary_output(self) -> str:
        return self._primary or super().primary_output

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._call(inputs, None)

    def predict_only(self, inputs: dict[str, np.ndarray], names: Collection[str]) -> dict[str, np.ndarray]:
        return self._call(inputs, list(names))

    def close(self) -> None:
        """Unload the version; its own worker stops (a shared one, with its last version)."""
        self._closed = True
        self._host.remove(self)

    def convert(
        self, directory: str, example: list[Any], *, to: str = "onnx", source: str | None = None
    ) -> dict[str, Any]:
        """Have the worker convert its version to ONNX (:mod:`serving.formats.onnx_convert`), or
        quantize its ONNX file ``source`` (``to``: ``int8`` or ``fp16``), and write ``model.onnx``
        into ``directory``, within the load's time and CPU limits: the converter runs on the
        version's objects (or bytes), so it runs where they were loaded.

        Returns:
            ``converter``, ``converter_version``, ``outputs`` (the source's outputs the ONNX model
            computes) and ``left_out``.

        Raises:
            InvalidRequest: no converter for this version, or the converter refused it.
            IsolationFailed: the worker crashed, ran out of memory or time while converting.
        """
        seconds = self.limits.load_timeout_s
        host = self._host
        blame = None if host.shared else self
        with host.call_lock:
            deadline = time.monotonic() + seconds
            proc = host.current(self, deadline)
            message = {
                "op": "convert",
                "key": self.key,
                "to": to,
                "source": source,
                "dir": directory,
                "example": example,
                "cpu_seconds": self.limits.load_cpu_seconds,
            }
            try:
                proc.send(message, [])
                reply = proc.receive(deadline)
            except TimeoutError:
                host.fail(proc, "timeout", f"still converting after {seconds} s", kill=True, blame=blame)
                raise self.isolation_failed("timeout", f"still converting after {seconds} s") from None
            except _Failure as failure:
                reason, told = host.fail(proc, failure.reason, failure.message, kill=True, blame=blame)
                raise self.isolation_failed(reason, told) from None
        if reply.get("ok") is True:
            return reply
        if reply.get("reason") == "oom":
            raise self.isolation_failed("oom", str(reply.get("message", ""))[:4000])
        raise self._error_from(reply, "converting")

    @property
    def pid(self) -> int | None:
        """The worker's process id (None while it restarts)."""
        return self._host.pid

    def share(self) -> float:
        """Its part of its worker's memory: 1 for a worker of its own; in a shared worker, what its
        load added over what every version's load added there (the rest, the interpreter and the
        frameworks, split the same way)."""
        if not self._host.shared:
            return 1.0
        total = self._host.resident_bytes()
        return self.load_bytes / total if total > 0 else 0.0

    @property
    def shared(self) -> bool:
        """Whether other versions share its worker."""
        return self._host.shared

    @property
    def restarts(self) -> int:
        return self._host.restarts

    @property
    def last_failure(self) -> str | None:
        return self._host.last_failure

    @property
    def _call_lock(self) -> threading.Lock:
        return self._host.call_lock

    def status(self) -> dict[str, Any]:
        status = {"pid": self.pid, "restarts": self.restarts, "last_failure": self.last_failure}
        if self.shared:
            status.update(shared=self._host.name, bytes=self.load_bytes)
        if self.broken is not None:
            status["broken"] = self.broken
        return status

    # -- one request ---------------------------------------------------------------
    def _deadline(self) -> tuple[float, float | None]:
        """When this request must be answered (the model's limit, or the request's own deadline if
        sooner), and the request's own deadline."""
        own = DEADLINE.get()
        deadline = time.monotonic() + self.limits.predict_timeout_s
        return (min(deadline, own) if own is not None else deadline), own

    def _call(self, inputs: dict[str, np.ndarray], names: list[str] | None) -> dict[str, np.ndarray]:
        deadline, own = self._deadline()
        lock = self._host.call_lock
        if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise DeadlineExceeded(f"{self.where}: waited for the model worker past the request's deadline")
        handed_off = False
        try:
            proc = self._host.current(self, deadline)
            try:
                sent = self._send(proc, inputs, names, deadline, own)
                outputs = self._outputs(proc, proc.receive(sent.wait_until))
            except TimeoutError:
                handed_off = sent.client_first
                raise self._timed_out(sent) from None
            except _Failure as failure:
                raise self._failed(proc, failure) from None
            self._answered()
            return outputs
        finally:
            if not handed_off:
                lock.release()

    async def predict_async(
        self, inputs: dict[str, np.ndarray], names: Collection[str] | None = None
    ) -> dict[str, np.ndarray]:
        """:meth:`predict` (or :meth:`predict_only` with ``names``) awaited on the running loop.

        No thread waits for the worker: the request is sent from the loop, and the loop
        wakes when the worker's answer is readable. Requests from one loop queue on an
        ``asyncio.Lock`` in arrival order; while the worker is busy with a request from a
        thread (a drain, a canary check), the one waiting for it waits in a thread.
        A request cancelled while the worker computes it (its client left) is drained
        in a thread, so the next request gets its own answer. Killing and reaping a
        failed worker happen in a thread too.
        """
        loop = asyncio.get_running_loop()
        host = self._host
        deadline, own = self._deadline()
        gate = host.gates.get(loop)
        if gate is None:
            gate = host.gates.setdefault(loop, asyncio.Lock())
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await gate.acquire()
        except TimeoutError:
            raise DeadlineExceeded(
                f"{self.where}: waited for the model worker past the request's deadline"
            ) from None
        try:
            await self._acquire_call_lock(loop, deadline)
            handed_off = False
            try:
                proc = host.current(self, deadline)
                try:
                    sent = self._send(proc, inputs, None if names is None else list(names), deadline, own)
                    await _readable(loop, proc, sent.wait_until)
                    outputs = self._outputs(proc, proc.receive(sent.wait_until))
                except TimeoutError:
                    handed_off = True
                    if sent.client_first:
                        raise self._timed_out(sent) from None  # NOTE: a drain thread releases the lock
                    raise await self._then_release(self._timed_out, sent) from None
                except _Failure as failure:
                    handed_off = True
                    raise await self._then_release(self._failed, proc, failure) from None
                except asyncio.CancelledError:
                    handed_off = True
                    self._hand_off(proc, sent.model_deadline)
                    raise
                self._answered()
                return outputs
            finally:
                if not handed_off:
                    host.call_lock.release()
        finally:
            gate.release()

    async def _acquire_call_lock(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """Take the call lock from the loop: at once when it is free, else in a thread (a thread
        holds it), giving it back if this request is cancelled in the meantime."""
        lock = self._host.call_lock
        if lock.acquire(blocking=False):
            return
        waiting = loop.run_in_executor(_WAITS, lock.acquire, True, max(0.0, deadline - time.monotonic()))
        try:
            acquired = await asyncio.shield(waiting)
        except asyncio.CancelledError:

            def give_back(done: asyncio.Future[bool]) -> None:
                if not done.cancelled() and done.exception() is None and done.result():
                    lock.release()

            waiting.add_done_callback(give_back)
            raise
        if not acquired:
            raise DeadlineExceeded(f"{self.where}: waited for the model worker past the request's deadline")

    async def _then_release(self, fn: Callable[..., ServingError], *args: Any) -> ServingError:
        """``fn(*args)`` (a kill and a reap) in a thread, then the call lock released there, even
        when the request is cancelled meanwhile: the next request waits for the kill."""
        lock = self._host.call_lock

        def run() -> ServingError:
            try:
                return fn(*args)
            finally:
                lock.release()

        return await asyncio.shield(asyncio.get_running_loop().run_in_executor(_WAITS, run))

    def _answered(self) -> None:
        self._served += 1
        host = self._host
        # NOTE: in a shared worker, a neighbour's answers must not reset the backoff of a version
        # that keeps crashing it: only a quiet spell does.
        if not host.shared or time.monotonic() - host.failed_at > host.limits.restart_backoff_max_s:
            host.failures = 0

    def _send(
        self,
        proc: _Process,
        inputs: dict[str, np.ndarray],
        names: list[str] | None,
        deadline: float,
        own: float | None,
    ) -> _Sent:
        """Send one request to ``proc`` (the caller holds the call lock).

        Raises:
            _Failure: the worker is gone.
        """
        sent_at = time.monotonic()
        # NOTE: the worker is killed only past the model's own limit, counted from the send; a
        # request's shorter deadline answers 504 but lets the worker finish, so a client
        # cannot make a healthy worker look failed.
        timeout = self.limits.predict_timeout_s
        model_deadline = sent_at + timeout
        asked = None
        if names is not None and all(n in self._output_names for n in names):
            asked = list(names)  # NOTE: unknown names: compute everything, the codec refuses them
        arena = self._host.arena
        headers, replaced = pack(inputs, arena)
        fds = [arena.fd] if replaced or not proc.arena_sent else []
        message = {
            "op": "predict",
            "key": self.key,
            "inputs": headers,
            "names": asked,
            "seconds": timeout,
            "limit": self.limits.max_reply_bytes,
        }
        proc.send(message, fds)
        proc.arena_sent = True
        client_first = own is not None and own < model_deadline
        wait_until = own if client_first and own is not None else model_deadline
        return _Sent(proc, model_deadline, client_first, wait_until, deadline - sent_at)

    def _timed_out(self, sent: _Sent) -> DeadlineExceeded:
        """The error for a request whose answer did not come in time. Past the request's own
        deadline, the worker finishes it in the background (a drain thread then holds the call
        lock); past the model's limit, the worker is killed."""
        if sent.client_first:
            self._hand_off(sent.proc, sent.model_deadline)
            return DeadlineExceeded(
                f"{self.where}: predict ran past the request's deadline of {sent.budget_s:.3g} s"
            )
        timeout = self.limits.predict_timeout_s
        message = f"predict ran past its deadline of {timeout:.3g} s"
        self._host.fail(sent.proc, "timeout", f"{self.where}: {message}", kill=True, blame=self)
        return DeadlineExceeded(f"{self.where}: {message}; the worker was stopped")

    def _failed(self, proc: _Process, failure: _Failure) -> WorkerFailed:
        blame = self if not (failure.before and self._host.shared) else None  # NOTE: it was dead already
        reason, message = self._host.fail(proc, failure.reason, failure.message, kill=True, blame=blame)
        return WorkerFailed(
            f"{self.where}: the model worker failed ({message}); it is restarting", reason=reason
        )

    def _hand_off(self, proc: _Process, model_deadline: float) -> None:
        """Let a drain thread wait out the request in flight; it releases the call lock."""
        threading.Thread(
            target=self._drain, args=(proc, model_deadline), name=f"drain-{self.where}", daemon=True
        ).start()

    def _drain(self, proc: _Process, model_deadline: float) -> None:
        """Wait out a request its client gave up on (holding the call lock), so the next request
        gets its own answer; kill the worker only past the model's limit."""
        try:
            self._outputs(proc, proc.receive(model_deadline))
        except TimeoutError:
            seconds = self.limits.predict_timeout_s
            message = f"{self.where}: predict ran past its deadline of {seconds:.3g} s"
            self._host.fail(proc, "timeout", message, kill=True, blame=self)
        except _Failure as failure:
            self._host.fail(proc, failure.reason, failure.message, kill=True, blame=self)
        except ServingError:
            pass  # NOTE: the model's own answer (a 4xx, an internal error, logged); nobody waits for it
        finally:
            self._host.call_lock.release()

    def _outputs(self, proc: _Process, reply: dict[str, Any]) -> dict[str, np.ndarray]:
        if reply.get("ok") is True:
            try:
                return unpack(
                    reply.get("outputs"), proc.peer_view, copy=True, limit=self.limits.max_reply_bytes
                )
            except (ProtocolViolation, ValueError, TypeError, OverflowError, MemoryError) as exc:
                raise _Failure(
                    "protocol", f"the worker broke the protocol: {type(exc).__name__}: {exc}"
                ) from exc
        if reply.get("reason") == "oom":
            raise _Failure("oom", f"out of memory: {str(reply.get('message', ''))[:4000]}")
        raise self._error_from(reply, "predicting")

    def _error_from(self, reply: dict[str, Any], doing: str) -> ServingError:
        """The error a worker's failed answer names: one it may return, as itself; anything else
        is logged once, with the worker's traceback, and is an internal error."""
        cls = _RETURNED_ERRORS.get(str(reply.get("class")))
        if cls is not None:
            return cls(str(reply.get("message", ""))[:4000])
        log.error(
            "%s: unexpected error %s in the model worker:\n%s",
            self.where,
            doing,
            str(reply.get("traceback", ""))[:20000],
        )
        return InternalError(f"internal error: {str(reply.get('class', 'Exception'))[:80]}")

    # -- failures ------------------------------------------------------------------
    def failed_in(self, reason: str, message: str) -> None:
        """Its worker failed in its request or load: within probation, report it."""
        if self._served < self.limits.probation_requests and self.on_probation_failure is not None:
            first = self.limits.probation_requests
            self._report(f"its worker failed within its first {first} requests ({reason}: {message})")

    def leave_shared(self, why: str) -> None:
        """It failed its shared worker in a request: move it to a worker of its own (in a thread),
        so a client that can crash it costs its neighbours one restart, not one per request."""
        pool = self._pool
        if pool is not None:
            pool.refuse(self._digest, why)
        log.warning("%s: failed its shared worker (%s); it moves to a worker of its own", self.where, why)

        def move() -> None:
            own = _Host(self.where, self.limits, child_env(self._env), model=self.model)
            try:
                own.add(self)
            except Exception as exc:  # NOTE: a background thread must never die
                if not isinstance(exc, ServingError):
                    log.exception("%s: could not start a worker of its own", self.where)
                self.fail_for_good(
                    f"it failed its shared worker ({why}) and then could not load alone: {exc}"
                )
                return
            self._host = own
            if self._closed:
                own.remove(self)

        threading.Thread(target=move, name=f"own-worker-{self.where}", daemon=True).start()

    def fail_for_good(self, why: str) -> None:
        """It can no longer be served here (a shared worker could not load it again): report it."""
        self.broken = why
        if self.on_probation_failure is not None:
            self._report(why)

    def _report(self, note: str) -> None:
        callback = self.on_probation_failure
        if callback is not None:
            name = f"probation-{self.where}"
            threading.Thread(target=callback, args=(note,), name=name, daemon=True).start()

    def isolation_failed(self, reason: str, message: str) -> IsolationFailed:
        return IsolationFailed(
            f"{self.where}: failed isolation ({reason}) in its model worker: {message}", reason
        )


# ---------------------------------------------------------------------------------
# The worker process (``python -m serving.isolation.worker PARENT_PID FD NICE``)
# ---------------------------------------------------------------------------------
def _worker_main(parent_pid: int, fd: int, nice: int) -> int:  # pragma: no cover -- NOTE: runs in the worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # NOTE: not PR_SET_PDEATHSIG: it fires when the *thread* that started us ends, and
    # workers are started from short-lived threads (restarts, version loads).
    _exit_when_orphaned(parent_pid)
    if nice > 0:
        with contextlib.suppress(OSError):
            os.nice(nice)
    from serving.hardening import harden_process

    harden_process()
    import serving.formats.warmup  # noqa: F401 -- NOTE: the loaders, before the limits

    sock = socket.socket(fileno=fd)
    predictors: dict[int, Predictor] = {}
    inputs_view: Any = None
    outputs = Arena("serving-worker-out")
    while True:
        request = _receive(sock, keep_fd=True)
        if request is None:
            return 0
        fd_in = request.pop("_fd", None)
        if fd_in is not None:
            inputs_view = map_peer(fd_in)
            os.close(fd_in)
        op, key = request.get("op"), request.get("key", 0)
        if op == "prepare":
            _prepare(request.get("formats") or [])
            sock.send(b'{"ok": true}')
            continue
        if op == "load":
            predictor, reply = _load(request, freeze=not predictors and request.get("shared") is True)
            if predictor is not None:
                predictors[key] = predictor
            sock.send(json.dumps(reply).encode())
            continue
        if op == "unload":
            predictors.pop(key, None)
            # NOTE: this loop's own name for the last version it ran would keep it alive.
            predictor = None
            # NOTE: what the version held in reference cycles; frozen objects are not walked.
            gc.collect()
            sock.send(b'{"ok": true}')
            continue
        predictor = predictors.get(key)
        if predictor is None:
            sock.send(json.dumps({"ok": False, "class": "KeyError", "message": f"no version {key}"}).encode())
            continue
        if op == "convert":
            sock.send(json.dumps(_convert(predictor, request)).encode())
            continue
        reply, replaced = _predict(predictor, request, inputs_view, outputs)
        data = json.dumps(reply).encode()
        if replaced:
            socket.send_fds(sock, [data], [outputs.fd])
        else:
            sock.send(data)


def _prepare(formats: list[str]) -> None:  # pragma: no cover -- worker
    """Import ``formats``' frameworks ahead of any version (a shared worker started ahead)."""
    for name in formats:
        _import_framework(str(name))
    _freeze()


def _import_framework(fmt: str, *, before_fork: bool = False) -> None:  # pragma: no cover -- worker
    """Import what a worker loads ``fmt`` with (its preloads); one that fails is left to the load.
    ``before_fork``: in the zygote, never ``worker_preload`` (TensorFlow starts threads when
    imported, and a fork copies none of them)."""
    facts = FORMAT_FACTS.get(fmt)
    extra = facts.worker_preload if facts is not None and not before_fork else ()
    for module in (*facts.preload, *extra) if facts is not None else ():
        with contextlib.suppress(Exception):
            importlib.import_module(module)


def _freeze() -> None:  # pragma: no cover -- worker
    """Collect, then freeze what is left (the interpreter, serving, the frameworks imported), so
    that an unload's collection walks the versions' objects and not the frameworks' (about
    130,000 objects for scikit-learn: 65 ms each time, under the worker's lock, which held back
    every other version in a shared worker).

    Only while the worker holds no version: a frozen version's reference cycles would outlive
    it (a Keras model's layers hold their weights in cycles). A framework first imported beside
    loaded versions stays unfrozen, and is walked by each unload. Only in a shared worker: a
    dedicated one never unloads (it stops), so the collection would only delay its first load.
    """
    gc.collect()
    gc.freeze()


def _exit_when_orphaned(parent_pid: int) -> None:  # pragma: no cover -- worker
    """Exit within a second of the serving process's death, even in the middle of a predict."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _receive(sock: socket.socket, keep_fd: bool = False) -> dict[str, Any] | None:  # pragma: no cover
    data, fds, _, _ = socket.recv_fds(sock, _MESSAGE_LIMIT, 1)
    if not data:
        return None
    message: dict[str, Any] = json.loads(data)
    if fds:
        if keep_fd:
            message["_fd"] = fds[0]
        else:
            os.close(fds[0])
    return message


_CONFINED = False
"""Whether this worker confined itself (at its first load)."""


def _load(
    request: dict[str, Any], freeze: bool
) -> tuple[Predictor | None, dict[str, Any]]:  # pragma: no cover
    """Load the version ``request`` names; ``freeze``: :func:`_freeze` before it (a shared
    worker that holds no other version)."""
    before = 0

    def prepare() -> None:
        global _CONFINED
        nonlocal before
        # NOTE: the framework's own import is not the version's to pay for.
        _import_framework(str(request["manifest"].get("format", "")))
        settle_caches(confined=_CONFINED)
        if freeze:
            _freeze()
        before = _rss()  # NOTE: what the version's own load adds, without its framework
        if not _CONFINED:
            # NOTE: once: a shared worker's limit is for all its versions (and cannot be raised).
            confine(int(request["memory_bytes"]), None)
            _CONFINED = True
        _cpu_budget(float(request["cpu_seconds"]))

    predictor, answer = load_in_child(request, prepare)
    if predictor is None:
        return None, answer
    return predictor, {
        "ok": True,
        "inputs": [s.model_dump(mode="json") for s in predictor.inputs],
        "outputs": [s.model_dump(mode="json") for s in predictor.outputs],
        "primary": predictor.primary_output if predictor.outputs else None,
        "bytes": max(0, _rss() - before),
    }


def _rss() -> int:  # pragma: no cover -- worker
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu_budget(seconds: float) -> None:  # pragma: no cover -- worker
    """SIGXCPU after ``seconds`` more CPU time than this process used so far (all threads)."""
    import resource

    used = resource.getrusage(resource.RUSAGE_SELF)
    spent = used.ru_utime + used.ru_stime
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = int(spent + seconds) + 1
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


_CLIENT_ERRNOS = frozenset({2, 21, 20, 36, 22, 13, 40})
"""ENOENT, EISDIR, ENOTDIR, ENAMETOOLONG, EINVAL, EACCES, ELOOP: a path from the request."""


def _predict(
    predictor: Predictor, request: dict[str, Any], view: Any, outputs: Arena
) -> tuple[dict[str, Any], bool]:  # pragma: no cover -- worker
    try:
        inputs = unpack(request["inputs"], view, copy=False)
        # NOTE: threads can take CPU faster than the clock; the parent's wall deadline is exact.
        _cpu_budget(float(request["seconds"]) * (os.cpu_count() or 1) + 1)
        names = request.get("names")
        result = predictor.predict_only(inputs, names) if names is not None else predictor.predict(inputs)
        if names is not None:
            result = {k: v for k, v in result.items() if k in names} or result
        headers, replaced = pack(result, outputs, limit=int(request["limit"]))
    except OverflowError as exc:
        return {"ok": False, "class": "PayloadTooLarge", "message": f"the answer is too large: {exc}"}, False
    except MemoryError as exc:
        # NOTE: the parent stops this worker: a heap that ran out may be in any state.
        return {"ok": False, "reason": "oom", "message": describe(exc)}, False
    except ServingError as exc:
        return {"ok": False, "class": type(exc).__name__, "message": exc.message}, False
    except (ValueError, TypeError) as exc:
        return {
            "ok": False,
            "class": "InvalidInput",
            "message": f"the model rejected the input: {exc}"[:4000],
        }, False
    except OSError as exc:
        if exc.errno in _CLIENT_ERRNOS:
            message = f"the model could not use the input: {exc.strerror or exc}"
            return {"ok": False, "class": "InvalidInput", "message": message}, False
        return _unexpected(exc), False
    except Exception as exc:  # noqa: BLE001 -- NOTE: the serving process logs it once
        if out_of_memory(exc):
            return {"ok": False, "reason": "oom", "message": describe(exc)}, False
        return _unexpected(exc), False
    return {"ok": True, "outputs": headers}, replaced


def _convert(predictor: Predictor, request: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover -- worker
    """Convert the loaded version (op ``convert``) and write it as ``model.onnx`` into ``dir``."""
    try:
        from serving.formats.onnx_convert import quantize, to_onnx

        _cpu_budget(float(request["cpu_seconds"]))
        if request.get("to", "onnx") == "onnx":
            converted = to_onnx(predictor, np.asarray(request["example"]))
        else:
            converted = quantize(str(request["source"]), str(request["to"]), workdir=str(request["dir"]))
        target = os.path.join(str(request["dir"]), "model.onnx")
        with open(target, "xb") as f:
            f.write(converted.model)
    except MemoryError as exc:
        return {"ok": False, "reason": "oom", "message": describe(exc)}
    except ServingError as exc:
        known = next(
            (c.__name__ for c in type(exc).__mro__ if c.__name__ in _RETURNED_ERRORS), "InvalidRequest"
        )
        return {"ok": False, "class": known, "message": exc.message}
    except Exception as exc:  # noqa: BLE001 -- NOTE: the serving process logs it once
        if out_of_memory(exc):
            return {"ok": False, "reason": "oom", "message": describe(exc)}
        return _unexpected(exc)
    return {
        "ok": True,
        "converter": converted.converter,
        "converter_version": converted.converter_version,
        "outputs": converted.outputs,
        "left_out": converted.left_out,
    }


def _unexpected(exc: BaseException) -> dict[str, Any]:  # pragma: no cover -- worker
    import traceback

    text = "".join(traceback.format_exception(exc))
    return {"ok": False, "class": type(exc).__name__, "message": describe(exc), "traceback": text[-20000:]}


def _zygote_prepare(formats: list[str]) -> None:  # pragma: no cover -- zygote
    """Before a fork: import ``formats``' frameworks, fill the caches a confined worker cannot,
    and freeze what is there, so a worker's collections never walk (and copy) it."""
    for name in formats:
        _import_framework(name, before_fork=True)
    settle_caches()
    _freeze()


def _forked_worker(fd: int, request: dict[str, Any]) -> int:  # pragma: no cover -- forked worker
    # NOTE: a fork copies the frameworks' global random state (Python's own random reseeds itself).
    np.random.seed()
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            torch.seed()
    return _worker_main(os.getppid(), fd, int(request.get("nice") or 0))


def _zygote_main(parent_pid: int, fd: int) -> int:  # pragma: no cover -- zygote
    if os.getppid() != parent_pid:
        return 0
    from serving.hardening import harden_process

    harden_process()
    import serving.formats.warmup  # noqa: F401 -- NOTE: the loaders, once, for every worker

    return serve(parent_pid, fd, _zygote_prepare, _forked_worker)


if __name__ == "__main__":
    if sys.argv[1] == "zygote":
        sys.exit(_zygote_main(int(sys.argv[2]), int(sys.argv[3])))
    sys.exit(_worker_main(int(sys.argv[1]), int(sys.argv[3]), int(sys.argv[2])))
