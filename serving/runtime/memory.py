"""What a loaded model costs in memory, measured rather than guessed from its files.

- A model worker (:mod:`serving.isolation.worker`) is a process of its own: its
  proportional set size (PSS, ``/proc/PID/smaps_rollup``) counts its private pages
  and its share of the pages it shares with other processes (the interpreter's
  libraries), so the PSS of many workers adds up to what they really hold.
- A model that loads in the serving process cannot be told apart from the rest of
  the heap later, so its cost is taken once, at load: the growth of the process's
  resident set across the load, and never less than its files' size (loads that run
  at the same time may share one growth; files are the floor).
"""

from __future__ import annotations

import os
import resource

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int | None = None) -> int:
    """The resident set of a process (this one by default); 0 if it is gone."""
    try:
        with open(f"/proc/{pid or 'self'}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def pss_bytes(pid: int) -> int:
    """The proportional set size of a process; its RSS where the kernel has no smaps_rollup; 0 if gone."""
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
