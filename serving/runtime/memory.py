"""What a loaded model costs in memory, measured rather than guessed from its files.

- A model worker (:mod:`serving.isolation.worker`) is a process of its own: its
  proportional set size (PSS, ``/proc/PID/smaps_rollup``) counts its private pages
  and its share of the pages it shares with other processes (the interpreter's
  libraries), so the PSS of many workers adds up to what they really hold.
- A model that loads in the serving process cannot be told apart from the rest of
  the heap later, so its cost is taken once, at load: the growth of the process's
  resident set across the load, and never less than its files' size (loads that run
  at the same time may share one growth; files are the floor). A load that imported
  modules counts its files alone: the first model of a framework in a process would
  otherwise carry the framework's memory, which stays after it is unloaded.
"""

from __future__ import annotations

import os
import resource
import threading
import time

_PAGE = os.sysconf("SC_PAGE_SIZE")

_READ: dict[int, tuple[int, float]] = {}
"""The last PSS read of each process: bytes and when."""
_READ_LOCK = threading.Lock()


def rss_bytes(pid: int | None = None) -> int:
    """The resident set of a process (this one by default); 0 if it is gone."""
    try:
        with open(f"/proc/{pid or 'self'}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def pss_bytes(pid: int, max_age_s: float = 0.0) -> int:
    """The proportional set size of a process; its RSS where the kernel has no smaps_rollup; 0 if gone.

    ``max_age_s``: a read of the same process at most that old will do. The kernel walks the
    whole memory map for each read (milliseconds for a worker of a few hundred MB), and the
    hundreds of versions of one shared worker would each read it. (A read from before a
    version joined undercounts that version by about its bytes squared over the worker's:
    under a MB for a 20 MB version in a 500 MB worker. Keying reads on the worker's versions
    made every read under churn a fresh one.)
    """
    now = time.monotonic()
    if max_age_s > 0:
        with _READ_LOCK:
            last = _READ.get(pid)
        if last is not None and now - last[1] <= max_age_s:
            return last[0]
    value = _read_pss(pid)
    if max_age_s > 0:
        with _READ_LOCK:
            for old in [p for p, (_, at) in _READ.items() if now - at > max_age_s]:
                del _READ[old]
            _READ[pid] = (value, now)
    return value


def _read_pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss_bytes(pid)


def peak_rss_bytes() -> int:
    """The most this process has held resident (ru_maxrss)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
