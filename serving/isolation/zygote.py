"""Model workers forked from a warm process (a "zygote") instead of started from scratch.

A model worker started with ``python -m`` pays for a new interpreter and its framework's import
at every start and every restart: about 2 s of CPU for scikit-learn, most of it the import. The
zygote pays it once per serving process (per worker environment). It imports the loaders at
start and a format's preloads the first time a worker for that format is asked for, then forks
one worker per request::

    serving process --SOCK_SEQPACKET: fork requests; pids, pidfds, exit statuses--> zygote
        |                                                                             | fork()
        +------------- the worker's own socket, passed through the zygote ------> model worker

- The zygote never reads a version, a manifest's bytes or a request: it runs no model code.
  It is single-threaded, so a fork copies no lock another thread held.
- Each worker calls ``setsid`` first (its own process group, as a spawned worker has), then runs
  the same loop a spawned worker runs, confining itself at its first load.
- The zygote reaps its workers and reports each exit status. Before it reaps one, it kills the
  worker's process group (what the worker started natively), while the zombie still holds the
  group's id.
- The serving process holds a pidfd for each worker, so its kill never reaches a reused pid.
- The zygote exits when the serving process closes its socket or dies, and kills its workers
  first. A zygote that dies is started again at the next fork; its workers end with it.

The trade-off (SECURITY.md, "Model workers"): forked workers share the zygote's memory layout
(ASLR), so an address one worker leaks holds in the others. ``SERVING_WORKER_START=spawn``
starts each worker from scratch instead.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import logging
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Collection
from typing import Any

from .confine import PR_SET_PDEATHSIG, prctl

__all__ = ["Forked", "ZygoteGone", "close_zygotes", "fork_worker", "serve", "zygote_pids"]

log = logging.getLogger(__name__)

_MESSAGE_LIMIT = 1 << 16
_FORK_TIMEOUT_S = 120.0
"""A fork that needs a format's framework imported first waits for that import."""


class ZygoteGone(OSError):
    """The zygote could not be started, or died before it answered."""


def _returncode(status: int) -> int:
    """A wait status as ``Popen.returncode`` writes it (minus the signal for a signalled one)."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1


def start_module(
    module: str, args: list[str], sock: socket.socket, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """``python -m module *args FD`` in a new interpreter and session (so a kill of its group
    reaches whatever it starts natively), given socket ``sock`` as ``FD`` and nothing else open."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args, str(sock.fileno())],
        pass_fds=(sock.fileno(),),
        env=env,
        stdin=subprocess.DEVNULL,
        close_fds=True,
        cwd="/",
        start_new_session=True,
    )


class Forked:
    """A worker the zygote forked, with what the serving process uses of ``subprocess.Popen``:
    ``pid``, ``returncode``, ``wait``, ``poll`` and ``send_signal`` (through its pidfd)."""

    def __init__(self, pid: int, pidfd: int) -> None:
        os.set_inheritable(pidfd, False)
        self.pid = pid
        self.args = ["zygote-child", str(pid)]
        self.returncode: int | None = None
        self.orphaned = False
        """It ended because its zygote did (not its own doing, nor its version's)."""
        self.shut_down = False
        """Its zygote was stopped on purpose (:func:`close_zygotes`, as this process exits)."""
        self._pidfd: int | None = pidfd
        self._fd_lock = threading.Lock()
        self._done = threading.Event()

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode

    def alive(self) -> bool:
        """Whether it has not exited yet (its pidfd is readable once it has)."""
        with self._fd_lock:
            return self._pidfd is not None and not _readable(self._pidfd)

    def send_signal(self, sig: int) -> bool:
        """Signal it if it has not exited: whether it was alive when signalled."""
        with self._fd_lock:
            if self._pidfd is None:
                return False
            alive = not _readable(self._pidfd)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)
            return alive

    def kill(self) -> bool:
        return self.send_signal(signal.SIGKILL)

    def _exited(self, status: int, *, orphaned: bool = False, shut_down: bool = False) -> None:
        with self._fd_lock:
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
        self.orphaned = orphaned
        self.shut_down = shut_down
        self.returncode = _returncode(status)
        self._done.set()


def _readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


_CRASH_SIGNALS = frozenset(
    {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGABRT, signal.SIGFPE, signal.SIGSYS}
)
"""A worker that died of one of these may have been probing the memory layout it shares with its
zygote's other children (its stack canary, say, one guess per crash): its zygote forks no more."""


class _Zygote:
    """The serving process's end of one zygote."""

    def __init__(self, env: dict[str, str], module: str = "serving.isolation.worker") -> None:
        """``module``: what ``python -m`` runs, as ``MODULE zygote PARENT_PID FD``; it calls
        :func:`serve`."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.popen = start_module(module, ["zygote", str(os.getpid())], child, env)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.sock = parent
        self.gone = False
        self.closing = False
        """Stopped on purpose (:meth:`close`): its workers' ends are no failure."""
        self.retired = False
        """It forks no more (a newer zygote took its place); it stops with its last worker."""
        self.children: dict[int, Forked] = {}
        self.pending: dict[int, queue.Queue[Forked | str | None]] = {}
        self.ids = itertools.count(1)
        self.state = threading.Lock()
        """Guards the fields above, and every use of the socket but the reader's receive."""
        threading.Thread(target=self._read, name="zygote-reader", daemon=True).start()

    def fork(self, fd: int, formats: Collection[str], nice: int, timeout: float) -> Forked:
        answer: queue.Queue[Forked | str | None] = queue.Queue(1)
        with self.state:
            if self.gone or self.retired:
                raise ZygoteGone("the model worker zygote forks no more")
            request_id = next(self.ids)
            message = json.dumps({"id": request_id, "formats": sorted(formats), "nice": nice}).encode()
            try:
                socket.send_fds(self.sock, [message], [fd])
            except OSError as exc:
                raise ZygoteGone(f"the model worker zygote stopped reading ({exc})") from exc
            self.pending[request_id] = answer
        try:
            reply = answer.get(timeout=timeout)
        except queue.Empty:
            with self.state:
                late = self.pending.pop(request_id, None) is None
            if late:  # NOTE: it answered as the wait ended
                reply = answer.get()
                if isinstance(reply, Forked):
                    reply.kill()
            raise ZygoteGone("the model worker zygote did not answer in time") from None
        if reply is None:
            raise ZygoteGone("the model worker zygote died")
        if isinstance(reply, str):
            raise ZygoteGone(f"the model worker zygote could not fork: {reply}")
        return reply

    def idle(self) -> bool:
        """Whether none of its workers runs and none is being forked."""
        with self.state:
            return self.gone or not (self.children or self.pending)

    def retire(self) -> None:
        """Fork no more; stop once its last worker has ended."""
        with self.state:
            self.retired = True
            done = not (self.children or self.pending)
        if done:
            self.close()

    def _read(self) -> None:
        try:
            while True:
                try:
                    data, fds, _, _ = socket.recv_fds(self.sock, _MESSAGE_LIMIT, 1)
                except OSError:
                    break
                if not data:
                    break
                self._handle(json.loads(data), fds)
        except Exception:  # NOTE: the reader must end in the cleanup below, whatever it read
            log.exception("the model worker zygote's messages could not be read")
        finally:
            self._gone()

    def _handle(self, message: dict[str, Any], fds: list[int]) -> None:
        if "exited" in message:
            status = int(message["status"])
            with self.state:
                ended = self.children.pop(int(message["exited"]), None)
                if os.WIFSIGNALED(status) and os.WTERMSIG(status) in _CRASH_SIGNALS:
                    self.retired = True
                last = self.retired and not (self.children or self.pending)
            if ended is not None:
                ended._exited(status)
            if last:
                threading.Thread(target=self.close, name="zygote-close", daemon=True).start()
            return
        child = Forked(int(message["forked"]), fds[0]) if "forked" in message and fds else None
        if child is None:
            for fd in fds:
                os.close(fd)
        with self.state:
            answer = self.pending.pop(int(message.get("id", 0)), None)
            if child is not None and answer is not None:
                self.children[child.pid] = child
        if answer is not None:
            answer.put(child if child is not None else str(message.get("error", "no reason given")))
        elif child is not None:
            child.kill()  # NOTE: nobody waits for it any more (its fork timed out)
            child._exited(signal.SIGKILL)

    def _gone(self) -> None:
        """The zygote is gone: so are its workers (each dies with it: ``PR_SET_PDEATHSIG``).
        Kill their process groups now: a group's id stays its own while a member lives."""
        with self.state:
            self.gone = True
            orphans, self.children = list(self.children.values()), {}
            waiting, self.pending = list(self.pending.values()), {}
            # NOTE: under the lock, after ``gone``: no send can reach the number a new fd reuses.
            self.sock.close()
        for child in orphans:
            with contextlib.suppress(OSError):
                os.killpg(child.pid, signal.SIGKILL)
            child.kill()
            # NOTE: the wait status of a SIGKILL
            child._exited(signal.SIGKILL, orphaned=True, shut_down=self.closing)
        for answer in waiting:
            answer.put(None)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def close(self) -> None:
        """Close its socket: it kills its workers and exits."""
        self.closing = True
        with self.state, contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


def _pidfds() -> bool:
    """Whether this kernel gives pidfds (what the zygote and the kills rely on)."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (OSError, AttributeError):
        return False
    return True


_PIDFDS = _pidfds()
_ZYGOTES: dict[tuple[tuple[str, str], ...], _Zygote] = {}
"""The zygote each environment forks from."""
_STARTED: list[_Zygote] = []
"""Every zygote started, retired ones (that wait for their last worker) included."""
_ZYGOTES_LOCK = threading.Lock()


def fork_worker(env: dict[str, str], fd: int, formats: Collection[str], nice: int = 0) -> Forked:
    """A model worker on socket ``fd`` at niceness ``nice``, forked by this process's zygote for
    ``env`` (started, or started again, as needed) after it imported ``formats``' preloads.

    Raises:
        ZygoteGone: no zygote could be started, or it died or timed out before it forked.
    """
    if not _PIDFDS:
        raise ZygoteGone("this kernel has no pidfds (Linux 5.3 and later): workers are spawned")
    key = tuple(sorted(env.items()))
    others: list[_Zygote] = []
    with _ZYGOTES_LOCK:
        zygote = _ZYGOTES.get(key)
        if zygote is None or zygote.gone or zygote.retired:
            if zygote is not None:
                others.append(zygote)
            try:
                zygote = _ZYGOTES[key] = _Zygote(env)
            except OSError as exc:
                raise ZygoteGone(f"the model worker zygote could not be started: {exc}") from exc
            _STARTED[:] = [z for z in _STARTED if not z.gone] + [zygote]
            # NOTE: one zygote per environment in use: one for an environment no longer asked
            # for stops with its last worker.
            for other_key, other in list(_ZYGOTES.items()):
                if other is not zygote and other.idle():
                    others.append(_ZYGOTES.pop(other_key))
    for other in others:
        other.retire()
    return zygote.fork(fd, formats, nice, _FORK_TIMEOUT_S)


def zygote_pids() -> list[int]:
    """The process ids of this process's zygotes that still run."""
    with _ZYGOTES_LOCK:
        return [z.popen.pid for z in _STARTED if not z.gone]


def close_zygotes() -> None:
    """Stop every zygote of this process (and so the workers they forked)."""
    with _ZYGOTES_LOCK:
        zygotes = list(_STARTED)
        _ZYGOTES.clear()
        _STARTED.clear()
    for zygote in zygotes:
        zygote.close()


atexit.register(close_zygotes)


# -- the zygote process ---------------------------------------------------------------------
def serve(
    parent_pid: int,
    fd: int,
    prepare: Callable[[list[str]], None],
    child: Callable[[int, dict[str, Any]], int],
) -> int:  # pragma: no cover -- NOTE: runs in the zygote
    """The zygote's loop: for each request, ``prepare`` its formats, then fork ``child(fd,
    request)`` in a new session; report each child's pid (with a pidfd) and exit status."""
    import ctypes  # noqa: F401 -- NOTE: what prctl uses, imported once here, not in each child

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    children: dict[int, int] = {}
    """pidfd -> pid"""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    try:
        while os.getppid() == parent_pid:
            for ready, _ in poller.poll(1000):
                if ready != sock.fileno():
                    _reap(sock, poller, children, ready)
                    continue
                data, fds, _, _ = socket.recv_fds(sock, _MESSAGE_LIMIT, 1)
                if not data:
                    return 0
                request = json.loads(data)
                request_id = request.get("id")
                if not fds:
                    sock.send(json.dumps({"id": request_id, "error": "no socket for the worker"}).encode())
                    continue
                with contextlib.suppress(Exception):
                    prepare([str(f) for f in request.get("formats") or []])
                zygote = os.getpid()
                try:
                    pid = os.fork()
                except OSError as exc:
                    os.close(fds[0])
                    sock.send(json.dumps({"id": request_id, "error": str(exc)}).encode())
                    continue
                if pid == 0:
                    code = 1
                    try:
                        # NOTE: dies with its zygote (safe here: the zygote is single-threaded,
                        # so the thread that forked it is the whole zygote); a zygote that died
                        # before this line is caught by the check after it.
                        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                        if os.getppid() != zygote:
                            os._exit(1)
                        sock.close()
                        for pidfd in children:
                            os.close(pidfd)
                        os.setsid()
                        code = child(fds[0], request)
                    except BaseException:  # noqa: BLE001 -- NOTE: a forked child never returns into the loop
                        traceback.print_exc()
                    finally:
                        os._exit(code)
                os.close(fds[0])
                pidfd = os.pidfd_open(pid)
                children[pidfd] = pid
                poller.register(pidfd, select.POLLIN)
                socket.send_fds(sock, [json.dumps({"id": request_id, "forked": pid}).encode()], [pidfd])
        return 0
    except ConnectionError:
        # NOTE: the serving process closed or reset its end (it exited): stop quietly.
        return 0
    finally:
        for pidfd, pid in list(children.items()):
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _reap(sock: socket.socket, poller: Any, children: dict[int, int], pidfd: int) -> None:  # pragma: no cover
    """A child exited: kill its process group while the zombie still holds its id, reap it,
    report its status."""
    pid = children.pop(pidfd)
    poller.unregister(pidfd)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(pidfd)
    with contextlib.suppress(OSError):
        sock.send(json.dumps({"exited": pid, "status": status}).encode())
