"""Progress bars for the CLI's transfers: tqdm on stderr, only where a person watches."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from serving.store.base import Progress

ProgressFactory = Callable[[str, int], Progress | None]
"""``(label, total_bytes) -> callback | None``, what publish and the cache accept."""

MIN_BYTES = 4 * 1024 * 1024
"""Transfers smaller than this finish before a bar is worth drawing."""


class _Bar:
    """A byte counter that draws one tqdm bar and closes it when the total is reached.

    Callbacks may arrive from several transfer threads (multipart), hence the lock.
    """

    def __init__(self, label: str, total: int, stream: TextIO) -> None:
        from tqdm import tqdm

        self._lock = threading.Lock()
        self._seen = 0
        self._total = total
        self._bar: Any = tqdm(
            total=total,
            desc=label,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=stream,
            leave=False,
            dynamic_ncols=True,
        )

    def __call__(self, n: int) -> None:
        with self._lock:
            self._seen += n
            self._bar.update(n)
            if self._seen >= self._total:
                self._bar.close()


def progress_factory(
    enabled: bool, stream: TextIO | None = None, min_bytes: int = MIN_BYTES
) -> ProgressFactory | None:
    """A ``(label, total_bytes) -> callback | None`` factory, or None when bars are off.

    Bars are drawn only when ``enabled`` (``Settings.progress``) and ``stream``
    (stderr by default) is a terminal, and only for transfers of ``min_bytes`` or more.
    """
    out = stream if stream is not None else sys.stderr
    if not enabled or not out.isatty():
        return None

    def make(label: str, total: int) -> Progress | None:
        if total < min_bytes:
            return None
        return _Bar(label, total, out)

    return make
