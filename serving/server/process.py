"""Process helpers for ``serving serve``: own its children, end them, and free their ports.

Ray leaves HAProxy processes and their files behind (:func:`end_haproxy`); a
server that started Ray ends every descendant it has when it stops
(:func:`end_descendants`), after making itself their reaper (:func:`become_subreaper`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

_PR_SET_CHILD_SUBREAPER = 36
_STOP_TIMEOUT_S = 8.0


def end_haproxy(node_ids: Iterable[str], grace_s: float = 2.0) -> None:
    """End every HAProxy Ray started for these nodes, then remove its files.

    Ray's HAProxy manager starts HAProxy in a session of its own, and each reload starts
    a new one, so HAProxy outlives ``ray.shutdown()`` and a kill of the node's process
    group (tests and benches left them running for hours). Ray also leaves its config,
    sockets and logs in a folder per node id. Call this after Ray has stopped.
    """
    # NOTE: private module; where Ray 2.60 puts each file (env or default), per node.
    from ray.serve._private import constants as rc

    ids = [n for n in node_ids if n]
    files = (
        rc.RAY_SERVE_HAPROXY_CONFIG_FILE_LOC,
        rc.RAY_SERVE_HAPROXY_SOCKET_PATH,
        rc.RAY_SERVE_HAPROXY_SERVER_STATE_FILE,
        rc.RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH,
    )
    bases = {Path(f).parent for f in files} | {Path(rc.RAY_SERVE_HAPROXY_SERVER_STATE_BASE)}
    folders = [str(base / node_id) + "/" for base in bases for node_id in ids]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [pid for pid, cmd in _processes() if "haproxy" in cmd and any(f in cmd for f in folders)]
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        # NOTE: no reaping here: in a test or bench they are not our children, and waiting on
        # any child would steal other subprocesses' exit statuses. A zombie has ended.
        while left and time.monotonic() < deadline:
            left = [pid for pid in left if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
            time.sleep(0.05)
        if not left:
            break
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _processes() -> Iterator[tuple[int, str]]:
    """(pid, command line) of every process this one can see."""
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        yield int(entry.name), cmd


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


PORTS_FROM = 20000
"""The lowest port :func:`free_port` hands out."""
_given: set[int] = set()
_given_lock = threading.Lock()


def _ephemeral_floor() -> int:
    """The first port of the kernel's ephemeral range (Linux's default: 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now, below the kernel's ephemeral range.

    NOTE: a port from ``bind(0)`` is an ephemeral one, from the range the kernel also takes
    the local port of every outgoing connection from: before the server binds it, any
    process's client socket (a Ray worker's, a test's) may hold it, and the bind fails (CI saw
    HAProxy refuse to start on such a port). Below that range only explicit binds compete,
    and this process never hands out the same port twice.
    """
    floor = _ephemeral_floor()
    for _ in range(200 if floor - PORTS_FROM >= 1000 else 0):
        port = random.randrange(PORTS_FROM, floor)  # noqa: S311 -- NOTE: a port, not a secret
        with _given_lock:
            if port in _given:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            if len(_given) >= 4096:
                _given.clear()
            _given.add(port)
            return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        bound: int = sock.getsockname()[1]
        return bound


@contextlib.contextmanager
def ignoring(signum: signal.Signals) -> Iterator[None]:
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def become_subreaper() -> None:
    """Make orphaned descendants (HAProxy when Ray kills its parent actor) our children (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def stop_ray(ray: Any) -> None:
    """Shut Ray down, bounded in time, then end whatever descendant is left."""
    # NOTE: no serve.shutdown(): it drains replicas for tens of seconds; ray.shutdown
    # stops the local cluster this process started.
    done = threading.Event()

    def shutdown() -> None:
        with contextlib.suppress(Exception):
            ray.shutdown()
        done.set()

    threading.Thread(target=shutdown, name="ray-shutdown", daemon=True).start()
    done.wait(_STOP_TIMEOUT_S)
    end_descendants(os.getpid())


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # NOTE: the command name (field 2) is in parentheses and may hold spaces.
        fields = stat[stat.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def end_descendants(pid: int, grace_s: float = 2.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = descendants(pid)
        if not left:
            return
        for child in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _reap_all():
            time.sleep(0.05)


def _reap_all() -> bool:
    """Reap exited children; True while any is still running."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True
