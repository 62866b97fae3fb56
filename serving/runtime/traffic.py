"""Progressive delivery inside one replica: which version answers, and what each one did.

Plain Python, no HTTP or Ray: the routing decision is made here, once, for every
transport (the front end only carries the sticky header to the model).

- :class:`Router` picks the live version or the canary for each request: at
  random with the canary's weight, or, when the request carries the routing
  header (``X-Request-Id`` by default), by a hash of its value, so one caller
  stays on one version while the weight does not change.
- :class:`Figures` counts, per version, requests, non-2xx replies, a latency
  histogram and shadow comparisons: what the repository index shows and
  ``serving rollout`` diffs between steps.
- :func:`disagrees` compares a shadow's outputs with the live version's.
"""

from __future__ import annotations

import hashlib
import random
import threading
from bisect import bisect_left
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.metrics import LATENCY_BUCKETS

ROLES = ("live", "canary", "shadow")
"""The ``role`` label of request metrics: a bounded set."""


def sticky_bucket(key: str) -> float:
    """A header value's fixed place in [0, 100): the same value always lands on the same side."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


class Router:
    """Chooses the canary for ``weight`` percent of requests; a sticky key decides by its hash."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()  # noqa: S311 -- NOTE: traffic split, not cryptography
        self._lock = threading.Lock()

    def to_canary(self, weight: float, key: str | None) -> bool:
        if weight <= 0:
            return False
        if weight >= 100:
            return True
        if key:
            return sticky_bucket(key) < weight
        with self._lock:
            return self._rng.random() * 100 < weight

    def mirror(self, fraction: float) -> bool:
        if fraction <= 0:
            return False
        if fraction >= 1:
            return True
        with self._lock:
            return self._rng.random() < fraction


def _label_output(outputs: dict[str, np.ndarray]) -> str | None:
    """The output that holds the prediction: ``predict`` when present, else the first."""
    if "predict" in outputs:
        return "predict"
    return next(iter(outputs), None)


def disagrees(live: dict[str, np.ndarray], shadow: dict[str, np.ndarray], rel_tolerance: float) -> bool:
    """Whether a shadow's answer differs from the live one's.

    The prediction output (``predict``, else the first one) is compared. Integer,
    boolean and string outputs (classifiers' labels) must be equal; floating
    outputs (regressors) may differ by ``rel_tolerance`` relative to the live
    value. A missing output or another shape is a disagreement.
    """
    name = _label_output(live)
    if name is None or name not in shadow:
        return True
    a, b = np.asarray(live[name]), np.asarray(shadow[name])
    if a.shape != b.shape:
        return True
    if a.dtype.kind in "fc" and b.dtype.kind in "fciu":
        scale = np.maximum(np.abs(a.astype(np.float64)), 1e-12)
        return bool(np.any(np.abs(a.astype(np.float64) - b.astype(np.float64)) / scale > rel_tolerance))
    return not bool(np.array_equal(a, b))


@dataclass
class VersionFigures:
    """What one version did on this replica since it started (cumulative, for diffs)."""

    requests: int = 0
    errors: int = 0
    """Replies with a status outside 2xx."""
    buckets: list[int] | None = None
    """Cumulative latency histogram of answered (< 400) requests: at or under each of
    ``LATENCY_BUCKETS``, then +Inf."""
    compared: int = 0
    """Shadow or canary: requests whose live answer was compared with this version's."""
    disagreed: int = 0
    dropped: int = 0
    """Shadow or canary: comparisons dropped because the mirror queue was full."""

    def __post_init__(self) -> None:
        if self.buckets is None:
            self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "buckets": list(self.buckets or []),
            "compared": self.compared,
            "disagreed": self.disagreed,
            "dropped": self.dropped,
        }


class Figures:
    """Per-version counters of one model on one replica, bounded to the newest versions."""

    MAX_VERSIONS = 16

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_version: OrderedDict[str, VersionFigures] = OrderedDict()

    def _get(self, version: str) -> VersionFigures:
        figures = self._by_version.get(version)
        if figures is None:
            figures = self._by_version[version] = VersionFigures()
            while len(self._by_version) > self.MAX_VERSIONS:
                self._by_version.popitem(last=False)
        else:
            self._by_version.move_to_end(version)
        return figures

    def observe(self, version: str, status: int, seconds: float) -> None:
        with self._lock:
            f = self._get(version)
            f.requests += 1
            if not 200 <= status < 300:
                f.errors += 1
            if status >= 400:
                return
            assert f.buckets is not None
            # NOTE: cumulative like Prometheus, and answered requests only (as the latency
            # histogram in serving.metrics), so a p99 reads the same from either source.
            for i in range(bisect_left(LATENCY_BUCKETS, seconds), len(f.buckets)):
                f.buckets[i] += 1

    def compared(self, version: str, disagreed: bool) -> None:
        with self._lock:
            f = self._get(version)
            f.compared += 1
            f.disagreed += int(disagreed)

    def dropped(self, version: str) -> None:
        with self._lock:
            self._get(version).dropped += 1

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {v: f.as_dict() for v, f in self._by_version.items()}


def merge(figures: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Sum per-version figures of several replicas (the repository index's total)."""
    out: dict[str, dict[str, Any]] = {}
    for replica in figures:
        for version, f in replica.items():
            total = out.setdefault(version, VersionFigures().as_dict())
            for key in ("requests", "errors", "compared", "disagreed", "dropped"):
                total[key] += int(f.get(key, 0))
            buckets = f.get("buckets") or []
            if len(buckets) == len(total["buckets"]):
                total["buckets"] = [a + int(b) for a, b in zip(total["buckets"], buckets, strict=True)]
    return out


def quantile(buckets: list[int], q: float) -> float | None:
    """The ``q`` quantile of a cumulative histogram over ``LATENCY_BUCKETS``, as PromQL computes it.

    Linear interpolation inside the bucket (``histogram_quantile``); the last finite
    bound when it falls in +Inf; None for an empty histogram.
    """
    total = buckets[-1] if buckets else 0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0
    for i, count in enumerate(buckets):
        if count >= rank:
            if i == len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]
            upper = LATENCY_BUCKETS[i]
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else lower, count
    return LATENCY_BUCKETS[-1]
