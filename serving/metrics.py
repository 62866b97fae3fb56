"""Every metric, in one module.

Metrics go to ``prometheus_client``'s default registry in a plain process (CLI,
tests) and to ``ray.util.metrics`` inside Ray Serve replicas, where Ray's
per-node exporter serves every replica's series on the node's metrics port
(KubeRay scrapes 8080). Ray prefixes exported names with ``ray_``; the names
below are the ones seen in-process, the README lists both.

Labels are bounded: model, version, outcome, status code, and the version's role
(``live``, ``canary`` or ``shadow``, see :mod:`serving.runtime.traffic`). Never request ids.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

_backend = "prometheus"
_lock = threading.Lock()
_gauges: dict[tuple[Metric, tuple[tuple[str, str], ...]], float] = {}
"""Ray backend: the last value of every gauge series, re-set by :func:`_keep_gauges`."""
_keeper: threading.Thread | None = None


def use_ray_backend() -> None:
    """Export through ``ray.util.metrics`` (call once, in each Ray replica).

    Also starts a daemon thread that re-sets every gauge's last value each half
    export interval. NOTE: Ray 2.60's node exporter drops a gauge series that was not
    set again within two export intervals (20 s by default); a gauge set once, as
    ``serving_live_version_info`` is at a swap, vanished from the node's metrics port
    20 s after the swap (seen on a multi-node cluster, tests/cluster).
    """
    global _backend, _keeper
    with _lock:
        _backend = "ray"
        if _keeper is None:
            _keeper = threading.Thread(target=_keep_gauges, name="metrics-gauges", daemon=True)
            _keeper.start()


def _export_interval_s() -> float:
    """Ray's metrics export interval in this process (``metrics_report_interval_ms``, at least 1 s)."""
    try:
        import ray

        interval_ms = float(getattr(ray, "_config").metrics_report_interval_ms())  # noqa: B009
    except Exception:  # noqa: BLE001 -- NOTE: outside a Ray worker: Ray's default
        interval_ms = 10_000.0
    return max(interval_ms, 1000.0) / 1000.0


def _keep_gauges(stop: threading.Event | None = None) -> None:
    period = _export_interval_s() / 2
    stop = stop or threading.Event()
    while not stop.wait(period):
        refresh_gauges()


def refresh_gauges() -> None:
    """Set every gauge series again to its last value (Ray backend; a no-op otherwise)."""
    with _lock:
        series = list(_gauges.items())
    for (metric, labels), value in series:
        metric._get().set(value, tags=dict(labels) or None)


class Metric:
    """A counter, gauge or histogram whose backend is chosen at first use."""

    def __init__(
        self,
        kind: str,
        name: str,
        doc: str,
        labels: tuple[str, ...] = (),
        buckets: tuple[float, ...] | None = None,
    ) -> None:
        self.kind, self.name, self.doc, self.labels, self.buckets = kind, name, doc, labels, buckets
        self._impl: Any = None
        self._impl_backend: str | None = None

    def _get(self) -> Any:
        if self._impl is not None and self._impl_backend == _backend:
            return self._impl
        with _lock:
            if _backend == "ray":
                from ray.util import metrics as rm

                if self.kind == "counter":
                    impl: Any = rm.Counter(self.name, self.doc, tag_keys=self.labels)
                elif self.kind == "gauge":
                    impl = rm.Gauge(self.name, self.doc, tag_keys=self.labels)
                else:
                    impl = rm.Histogram(
                        self.name, self.doc, boundaries=list(self.buckets or ()), tag_keys=self.labels
                    )
            else:
                import prometheus_client as pc

                name = self.name.removesuffix("_total") if self.kind == "counter" else self.name
                if self.kind == "counter":
                    impl = pc.Counter(name, self.doc, self.labels)
                elif self.kind == "gauge":
                    impl = pc.Gauge(name, self.doc, self.labels)
                else:
                    impl = pc.Histogram(
                        name, self.doc, self.labels, buckets=self.buckets or pc.Histogram.DEFAULT_BUCKETS
                    )
            self._impl, self._impl_backend = impl, _backend
            return impl

    def _labelled(self, labels: dict[str, str]) -> Any:
        impl = self._get()
        if _backend == "ray":
            return impl
        return impl.labels(**labels) if self.labels else impl

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        target = self._labelled(labels)
        if _backend == "ray":
            target.inc(amount, tags=labels or None)
        else:
            target.inc(amount)

    def set(self, value: float, **labels: str) -> None:
        target = self._labelled(labels)
        if _backend == "ray":
            with _lock:
                _gauges[(self, tuple(sorted(labels.items())))] = value
            target.set(value, tags=labels or None)
        else:
            target.set(value)

    def observe(self, value: float, **labels: str) -> None:
        target = self._labelled(labels)
        if _backend == "ray":
            target.observe(value, tags=labels or None)
        else:
            target.observe(value)


def _counter(name: str, doc: str, *labels: str) -> Metric:
    return Metric("counter", name, doc, labels)


def _gauge(name: str, doc: str, *labels: str) -> Metric:
    return Metric("gauge", name, doc, labels)


def _histogram(name: str, doc: str, buckets: tuple[float, ...], *labels: str) -> Metric:
    return Metric("histogram", name, doc, labels, buckets)


# -- requests ---------------------------------------------------------------
REQUESTS = _counter(
    "serving_requests_total",
    "Inference requests by model, version, HTTP status and role (live, canary, shadow).",
    "model",
    "version",
    "status",
    "role",
)
REQUEST_SECONDS = _histogram(
    "serving_request_duration_seconds",
    "Inference latency in the model replica, by role (live, canary, shadow).",
    LATENCY_BUCKETS,
    "model",
    "version",
    "role",
)
# -- progressive delivery ------------------------------------------------------
ROLE_VERSION = _gauge(
    "serving_version_role_info",
    "1 for a version a replica holds as canary or shadow beside the live one, 0 once dropped.",
    "model",
    "version",
    "role",
)
CANARY_WEIGHT = _gauge(
    "serving_canary_weight_percent",
    "Percent of requests a replica sends to the canary (0 when there is none or it is not loaded).",
    "model",
)
SHADOW_COMPARISONS = _counter(
    "serving_shadow_comparisons_total",
    "Mirrored requests whose shadow answer was compared with the live one (agree, disagree, error).",
    "model",
    "version",
    "outcome",
)
CANARY_COMPARISONS = _counter(
    "serving_canary_comparisons_total",
    "Canary answers compared with the live version's on the same inputs (agree, disagree, error).",
    "model",
    "version",
    "outcome",
)
SHADOW_DROPPED = _counter(
    "serving_shadow_dropped_total",
    "Mirrors dropped because the shadow queue was full (the client is never delayed).",
    "model",
)
# -- model lifecycle ---------------------------------------------------------
LOADS = _counter("serving_model_loads_total", "Model loads by outcome.", "model", "outcome")
LOAD_SECONDS = _histogram(
    "serving_model_load_duration_seconds",
    "Pull, load and warm-up time of one version.",
    DURATION_BUCKETS,
    "model",
)
SWAPS = _counter("serving_swaps_total", "Successful swaps to a new version.", "model")
SWAP_FAILURES = _counter(
    "serving_swap_failures_total",
    "Swaps refused or failed; the old version kept serving.",
    "model",
    "reason",
)
LIVE_VERSION = _gauge(
    "serving_live_version_info",
    "1 for the version a replica serves, 0 for ones it served.",
    "model",
    "version",
)
WORKER_FAILURES = _counter(
    "serving_worker_failures_total",
    "Model workers that crashed, ran out of memory or time, or broke protocol while serving.",
    "model",
    "reason",
)
WORKER_RESTARTS = _counter(
    "serving_worker_restarts_total", "Model workers started again after a failure.", "model"
)
# -- cache and downloads -------------------------------------------------------
CACHE_HITS = _counter("serving_cache_hits_total", "Versions found complete in the loader cache.", "model")
CACHE_MISSES = _counter("serving_cache_misses_total", "Versions that had to be pulled.", "model")
CACHE_BYTES = _gauge("serving_cache_bytes", "Bytes held by the loader cache.")
CACHE_CORRUPT = _counter(
    "serving_cache_corrupt_total",
    "Cached versions whose bytes changed on disk; evicted and pulled again, never loaded.",
    "model",
)
CACHE_EVICTIONS = _counter("serving_cache_evictions_total", "Versions evicted from the loader cache.")
DOWNLOAD_BYTES = _counter("serving_download_bytes_total", "Bytes downloaded from the store.", "model")
DOWNLOAD_SECONDS = _histogram(
    "serving_download_duration_seconds",
    "Time to pull one version into the cache.",
    DURATION_BUCKETS,
    "model",
)
# -- trust ---------------------------------------------------------------------
TRUST_CHECKS = _counter(
    "serving_trust_checks_total",
    "Signature and load-policy checks before a load, by outcome (signed, unsigned, refused).",
    "model",
    "outcome",
)
# -- alias watching ----------------------------------------------------------
ALIAS_CHECKS = _counter(
    "serving_alias_checks_total",
    "Alias checks by outcome (unchanged, changed, error).",
    "model",
    "outcome",
)
ALIAS_CHECK_AGE = _gauge(
    "serving_alias_check_age_seconds",
    "Seconds since the last successful alias check.",
    "model",
)
ALIAS_EVENTS = _counter(
    "serving_alias_events_total",
    "Rollout events (shadow and canary steps, promotions, aborts) each replica saw in its alias.",
    "model",
    "event",
)

# -- the pool of models loaded on demand (model sets) ----------------------------------
POOL_MODELS = _gauge("serving_pool_models", "Models of model sets loaded in this replica now.")
POOL_BYTES = _gauge("serving_pool_bytes", "Memory those models hold, measured after each load.")
POOL_BUDGET_BYTES = _gauge("serving_pool_budget_bytes", "The replica's memory budget for them (0: none).")
POOL_LOOKUPS = _counter(
    "serving_pool_lookups_total",
    "Requests for members of model sets: found loaded (warm), loaded for them (cold), refused, "
    "or sent on to the member's owner (forwarded: counted again there).",
    "result",
)
POOL_LOAD_SECONDS = _histogram(
    "serving_pool_load_duration_seconds",
    "Time from a cold request to its model being loaded (pull, isolation, load, warm-up).",
    DURATION_BUCKETS,
)
POOL_EVICTIONS = _counter(
    "serving_pool_evictions_total",
    "Models unloaded from the pool: to make room (budget), on an unload request, or at stop.",
    "reason",
)

ALL = [
    REQUESTS,
    REQUEST_SECONDS,
    ROLE_VERSION,
    CANARY_WEIGHT,
    SHADOW_COMPARISONS,
    CANARY_COMPARISONS,
    SHADOW_DROPPED,
    LOADS,
    LOAD_SECONDS,
    SWAPS,
    SWAP_FAILURES,
    LIVE_VERSION,
    WORKER_FAILURES,
    WORKER_RESTARTS,
    CACHE_HITS,
    CACHE_MISSES,
    CACHE_BYTES,
    CACHE_EVICTIONS,
    CACHE_CORRUPT,
    DOWNLOAD_BYTES,
    DOWNLOAD_SECONDS,
    TRUST_CHECKS,
    ALIAS_CHECKS,
    ALIAS_CHECK_AGE,
    ALIAS_EVENTS,
    POOL_MODELS,
    POOL_BYTES,
    POOL_BUDGET_BYTES,
    POOL_LOOKUPS,
    POOL_LOAD_SECONDS,
    POOL_EVICTIONS,
]
"""Every metric this project exports; the dashboard and alert tests check against it."""


def forget_model(name: str) -> None:
    """Drop every series labelled ``model=name`` (a model unloaded from the pool).

    So the ``model`` label holds the models loaded now, not every model a replica ever
    loaded. NOTE: Ray's exporter keeps counters it was given; there, the series of
    unloaded models stop changing and gauges vanish (they are no longer re-set).
    """
    with _lock:
        for key in [k for k in _gauges if ("model", name) in k[1]]:
            del _gauges[key]
    for metric in ALL:
        if "model" not in metric.labels or metric._impl is None or metric._impl_backend != "prometheus":
            continue
        impl, at = metric._impl, metric.labels.index("model")
        with impl._lock:
            keys = [k for k in impl._metrics if k[at] == name]
        for key in keys:
            with contextlib.suppress(KeyError):
                impl.remove(*key)


RAY_PREFIX = "ray_"
"""Ray's node exporter prefixes every application metric with this."""


def exported_names(prefix: str = RAY_PREFIX) -> set[str]:
    """Series names as Prometheus scrapes them from a Ray node (8080).

    Histograms add ``_bucket``, ``_sum`` and ``_count``. In a plain process (CLI,
    tests without Ray) pass ``prefix=""``.
    """
    names: set[str] = set()
    for m in ALL:
        names.add(prefix + m.name)
        if m.kind == "histogram":
            names.update({f"{prefix}{m.name}_{s}" for s in ("bucket", "sum", "count")})
    return names
