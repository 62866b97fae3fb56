"""One model's serving logic, free of Ray and HTTP: decode, predict, encode, follow the alias.

The Ray deployment in :mod:`serving.app` holds one ModelService per replica
and only adapts calls to it.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import numpy as np

from serving import api, metrics
from serving.cache import LoaderCache
from serving.config import AppConfig, ModelConfig
from serving.errors import InvalidInput, ServingError
from serving.formats.base import LoadPolicy
from serving.isolation import IsolationLimits, Prober
from serving.repository import Repository, Resolved
from serving.settings import Settings
from serving.slot import Live, ModelSlot, ResidentVersions
from serving.store import open_store
from serving.trust import check_trust
from serving.watcher import AliasWatcher

_CLIENT_ERRNOS = frozenset(
    {errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EINVAL, errno.EACCES, errno.ELOOP}
)


def build_cache(app: AppConfig, settings: Settings) -> LoaderCache:
    return LoaderCache(
        app.cache_dir or settings.cache_dir,
        app.cache_max_bytes if app.cache_max_bytes is not None else settings.cache_max_bytes,
        max_artifact_bytes=settings.max_artifact_bytes,
        max_artifact_files=settings.max_artifact_files,
        reverify_s=settings.cache_reverify_s,
    )


def build_prober(model: ModelConfig, settings: Settings, cache: LoaderCache) -> Prober | None:
    """The isolation of first loads for ``model`` (None when its config says ``never``)."""
    if model.isolation == "never":
        return None
    limits = IsolationLimits(
        memory_bytes=settings.isolation_memory_bytes,
        cpu_seconds=settings.isolation_cpu_seconds,
        timeout_s=settings.isolation_timeout_s,
    )
    return Prober(limits, mode=model.isolation, memo_dir=cache.root / "isolation")


def policy_from(settings: Settings) -> LoadPolicy:
    return LoadPolicy(
        trusted_globals=frozenset(settings.trusted_globals),
        max_artifact_bytes=settings.max_artifact_bytes,
        max_expansion_ratio=settings.max_expansion_ratio,
    )


class ModelService:
    """Serves one model: the live version (following an alias or pinned) plus explicit versions."""

    def __init__(self, model: ModelConfig, app: AppConfig, settings: Settings) -> None:
        self.config = model
        self.app = app
        repo = Repository(open_store(app.store or settings.store, settings))
        cache = build_cache(app, settings)

        def trust_check(repo: Repository, resolved: Resolved) -> LoadPolicy:
            # NOTE: signature and load policy, checked before any artifact byte is read.
            return check_trust(repo, resolved, settings, cache_root=cache.root).policy

        self.slot = ModelSlot(
            model.name,
            repo,
            cache,
            policy_from(settings),
            trust_check=trust_check,
            warmup=model.warmup,
            prober=build_prober(model, settings, cache),
        )
        self.watcher = (
            AliasWatcher(
                self.slot,
                model.alias,
                interval_s=app.poll_interval_s,
                jitter=app.poll_jitter,
                backoff_max_s=app.retry_backoff_max_s,
            )
            if model.alias
            else None
        )
        self.resident = ResidentVersions(
            self.slot,
            model.max_resident_versions,
            max_loading=settings.max_concurrent_version_loads,
            miss_ttl_s=settings.version_miss_ttl_s,
        )

    def start(self) -> None:
        """Load the first version. Raises if nothing can be loaded (the replica is not ready)."""
        if self.watcher is not None:
            self.watcher.start()
        else:
            assert self.config.version is not None
            resolved, from_cache = self.slot.cache.resolve(
                self.slot.repo, f"{self.config.name}:{self.config.version}"
            )
            self.slot.swap_to(resolved, reason="start", source="cache" if from_cache else "store")

    # -- requests ------------------------------------------------------------------
    def infer_v2(
        self, body: bytes, version: str | None = None, headers: Mapping[str, str] | None = None
    ) -> api.Reply:
        """Answer an OIP v2 infer request: JSON, or the binary tensor extension.

        Args:
            body: the request body; ``app.max_body_bytes`` applies to all of it.
            version: an explicit version, or None for the live one.
            headers: the request's HTTP headers (any mapping; names match
                ignoring case). ``Inference-Header-Content-Length`` selects the
                binary extension; other headers are ignored.

        Returns:
            The reply; binary outputs set ``reply.headers`` and ``content_type``.
        """
        started = time.perf_counter()
        # NOTE: a client-chosen version becomes a label only once it has loaded (then it
        # exists and is one of a bounded set); misses and refusals count as "other".
        served = "other" if version else self.slot.version or "none"
        try:
            with self._lease(version) as live:
                served = live.version
                payload, binary = api.parse_infer_body(body, self.app.max_body_bytes, headers)
                req = api.parse_v2(payload, live.predictor.inputs, binary)
                outputs = self._predict(live, req.inputs, req.outputs)
                reply = api.infer_reply(self.config.name, live.version, req, outputs)
        except Exception as exc:  # noqa: BLE001 -- NOTE: the one error handler maps every error
            reply = api.error_reply(exc)
        self.observe(served, reply.status, started)
        return reply

    def predict_v1(self, body: bytes) -> api.Reply:
        started = time.perf_counter()
        served = self.slot.version or "none"
        try:
            with self._lease(None) as live:
                served = live.version
                inputs = api.parse_v1(api.parse_json(body, self.app.max_body_bytes), live.predictor.inputs)
                primary = live.predictor.primary_output
                outputs = self._predict(live, inputs, [primary])
                first = outputs[primary] if primary in outputs else next(iter(outputs.values()))
                reply = api.ok({"predictions": first, "model_version": live.version})
        except Exception as exc:  # noqa: BLE001 -- NOTE: the one error handler maps every error
            reply = api.error_reply(exc)
        self.observe(served, reply.status, started)
        return reply

    def predict_arrays(self, inputs: dict[str, np.ndarray]) -> tuple[str, dict[str, np.ndarray]]:
        """Predict on decoded inputs with the live version (the batching path uses this)."""
        with self.slot.lease() as live:
            return live.version, self._predict(live, inputs)

    def _lease(self, version: str | None) -> Any:
        return self.resident.lease(version) if version else self.slot.lease()

    @staticmethod
    def _predict(
        live: Live, inputs: dict[str, np.ndarray], names: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """The predictor's outputs: every one, or at least ``names`` (a request's ``outputs``)."""
        try:
            if names is not None:
                return live.predictor.predict_only(inputs, names)
            return live.predictor.predict(inputs)
        except ServingError:
            raise
        except (ValueError, TypeError) as exc:
            # NOTE: frameworks raise these for inputs that passed the schema check
            # but that the model still cannot take (e.g. wrong feature count).
            raise InvalidInput(f"the model rejected the input: {exc}") from exc
        except OSError as exc:
            # NOTE: a path or name taken from the request (no such file, a directory,
            # too long) is the caller's mistake; any other OSError is the server's.
            if exc.errno not in _CLIENT_ERRNOS:
                raise
            raise InvalidInput(f"the model could not use the input: {exc.strerror or exc}") from exc

    def observe(self, version: str, status: int, started: float) -> None:
        """Count one answered request and, when it succeeded, its latency."""
        metrics.REQUESTS.inc(model=self.config.name, version=version, status=str(status))
        if status < 400:
            metrics.REQUEST_SECONDS.observe(
                time.perf_counter() - started, model=self.config.name, version=version
            )

    # -- metadata ------------------------------------------------------------------------
    def metadata(self, version: str | None = None) -> api.Reply:
        try:
            with self._lease(version) as live:
                return api.ok(
                    {
                        "name": self.config.name,
                        "versions": [live.version],
                        "platform": live.manifest.format,
                        "inputs": api.tensor_metadata(live.predictor.inputs),
                        "outputs": api.tensor_metadata(live.predictor.outputs),
                        "parameters": {
                            "framework": live.manifest.framework,
                            "framework_version": live.manifest.framework_version,
                            "alias": self.config.alias,
                            "created_at": live.manifest.created_at,
                        },
                    }
                )
        except Exception as exc:  # noqa: BLE001 -- NOTE: the one error handler maps every error
            return api.error_reply(exc)

    def ready(self, version: str | None = None) -> bool:
        if version is None or version == self.slot.version:
            return self.slot.live is not None
        return version in self.resident.versions()

    def status(self) -> dict[str, Any]:
        if self.watcher is not None:
            return asdict(self.watcher.status())
        live = self.slot.live
        return {
            "model": self.config.name,
            "alias": None,
            "target_version": self.config.version,
            "live_version": live.version if live else None,
            "last_check_age_s": None,
            "last_error": None,
            "failed_version": None,
            "source": live.source if live else None,
        }


def index_entry(config: ModelConfig, replicas: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One model's row of ``/v2/repository/index`` from what each replica reported.

    ``replicas`` maps a replica id to its :meth:`ModelService.status` (plus what the
    server adds). Converged means every replica serves the alias's target.
    """
    live = {r["live_version"] for r in replicas.values() if r["live_version"]}
    targets = [r["target_version"] for r in replicas.values() if r["target_version"]]
    target = targets[0] if targets else config.version
    converged = bool(replicas) and live == {target}
    return {
        "name": config.name,
        "version": target,
        "alias": config.alias,
        "target_version": target,
        "state": "READY" if live else "UNAVAILABLE",
        "reason": "" if converged else "converging",
        "converged": converged,
        "replicas": [{"replica": rid, **state} for rid, state in sorted(replicas.items())],
    }
