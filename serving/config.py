"""The serving application's typed config: what ``deploy/serve.yaml`` passes as ``args``.

The same model parses the Helm chart's ``serveConfigV2`` (tests check that),
so a config that validates here deploys the same everywhere.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.formats.table import FORMAT_FACTS
from serving.manifest import check_name

_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,126}$")


class BatchingConfig(BaseModel):
    """Server-side batching with ``@serve.batch``, for models that vectorize."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    max_batch_size: int = Field(default=32, ge=1)
    batch_wait_timeout_s: float = Field(default=0.005, ge=0)


class ModelConfig(BaseModel):
    """One served model: which pointer it follows and how its replicas scale."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    """The model's name in the store. Leave it out and set ``prefix`` for a model set."""
    prefix: str | None = None
    """A model set instead of one model: every model in the store whose name starts with this
    (``""``: every model) and that has ``alias``, loaded on its first request and evicted
    under ``pool.memory_bytes``. A model published after start is served without a redeploy.
    The other fields are each member's settings."""
    alias: str | None = "production"
    """Follow this alias; moving it in the store swaps the served version."""
    version: str | None = None
    """Pin one version instead of following an alias."""
    num_replicas: int | Literal["auto"] | None = 1
    autoscaling_config: dict[str, Any] | None = None
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0.25})
    max_ongoing_requests: int = Field(default=64, ge=1)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    max_resident_versions: int = Field(default=2, ge=1)
    """Explicit-version requests keep at most this many extra versions loaded (LRU)."""
    warmup: bool = True
    """Run the manifest's example input before a version goes live."""
    isolation: Literal["worker", "auto", "always", "never", "none"] = "worker"
    """Where this model's code runs (SECURITY.md, "Isolation").

    ``worker`` (the default): each version loads, warms up and predicts in its own
    model worker, a limited child process; the serving process never runs model
    code, so a crash, hang or memory blow-up costs this model's requests only, and
    the worker is restarted. ``auto`` and ``always``: the first load of a version
    is probed in a child (``auto``: the formats that unpickle or build native
    objects), then the version loads and predicts in the serving process. ``none``
    (or ``never``): everything in the serving process; for trusted,
    latency-critical models only: a crash there takes every model down."""
    workers: Literal["dedicated", "shared"] = "dedicated"
    """Workers only: ``dedicated`` (the default): each version in a worker of its own, so a
    crash, hang or memory blow-up costs this model alone. ``shared``: the version joins one of
    the replica's ``shared_workers``, which each hold several models, for many small models
    whose processes would otherwise cost more than the models. A failure then costs every
    model in that worker a restart (never the serving process or the other workers), a crash
    while a version joins included; a version that failed its shared worker loads alone from
    then on."""
    predict_timeout_s: float = Field(default=30.0, gt=0)
    """Workers only: the most one predict may take. Past it the worker is stopped and
    started again, and the request gets 504. A request may ask for less (the v2
    ``timeout`` parameter in microseconds, or its gRPC deadline), never more."""
    probation_requests: int = Field(default=10, ge=0)
    """Workers only: a version whose worker fails within this many requests is marked
    failed on that replica, and the version served before it goes back live."""

    offload_predict_after_ms: float = Field(default=2.0, ge=0)
    """Predict on the event loop while this model's recent requests take less than this;
    slower ones run in a worker thread so they do not stall other requests (0: always a
    thread). Loads of explicit versions never run on the loop, whatever this says."""

    shadow_tolerance: float = Field(default=0.05, ge=0)
    """A shadow's floating-point prediction disagrees with the live one beyond this relative
    error (regressors); integer and string predictions (classifiers' labels) must be equal."""
    shadow_queue: int = Field(default=64, ge=1)
    """Mirrored requests waiting for the shadow version (or for the canary check); more are
    dropped and counted, so a slow shadow never holds memory or delays a reply."""
    canary_check_fraction: float = Field(default=1.0, ge=0, le=1)
    """Share of the canary's requests also predicted by the live version, off the request path,
    to compare their answers (``serving rollout`` judges a canary step's output agreement on
    it, as ``shadow_tolerance`` says). 0: no check, and no extra load on the live version."""

    @model_validator(mode="after")
    def _one_pointer(self) -> ModelConfig:
        if self.prefix is not None:
            if self.name:
                raise ValueError(f"model set {self.prefix!r}: set a name or a prefix, not both")
            if self.version is not None:
                raise ValueError(f"model set {self.prefix!r} follows an alias; it cannot pin a version")
            if self.prefix and not _PREFIX_RE.fullmatch(self.prefix):
                raise ValueError(f"invalid prefix {self.prefix!r}: use letters, digits, '.', '_' or '-'")
            if self.alias is None:
                raise ValueError(f"model set {self.prefix!r}: set the alias its members follow")
            check_name(self.alias, "alias")
        else:
            check_name(self.name, "model name")
        if self.version is not None:
            check_name(self.version, "version")
            self.alias = None
        elif self.alias is None:
            raise ValueError(f"model {self.name!r}: set an alias or a version")
        else:
            check_name(self.alias, "alias")
        if self.autoscaling_config is not None:
            self.num_replicas = None
        return self

    @property
    def ref(self) -> str:
        if self.prefix is not None:
            return f"{self.prefix}*@{self.alias}"
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}:{self.version}"

    def admits(self, name: str) -> bool:
        """Whether this model set serves the model ``name`` (a plain entry: only its own)."""
        if self.prefix is None:
            return name == self.name
        return name.startswith(self.prefix)

    def member(self, name: str) -> ModelConfig:
        """The config of ``name`` as a member of this set."""
        return self.model_copy(update={"name": name, "prefix": None})


class PoolConfig(BaseModel):
    """Models loaded on demand (the members of model sets) share one memory budget per replica.

    The budget counts memory measured after each load: a model worker's proportional set
    size (its private pages and its share of the ones it shares), or, for a model that
    loads in the serving process, its growth of the process's RSS during the load (never
    less than its files' size); and, when every model set uses model workers, what the
    serving process grew by since its first member started loading (each member's
    bookkeeping there). The least recently used idle model is unloaded to make room; a
    request that cannot fit gets 503 with ``Retry-After``."""

    model_config = ConfigDict(extra="forbid")

    memory_bytes: int | None = Field(default=None, ge=1)
    """The budget; None: unbounded (models still load on demand)."""
    max_concurrent_loads: int = Field(default=4, ge=1)
    """Loads of different models at once; more wait. One model's loads are single-flight."""
    pinned: list[str] = Field(default_factory=list)
    """Members loaded at start and never evicted."""
    prefetch: list[str] = Field(default_factory=list)
    """Members loaded at start, evicted like any other."""
    retry_after_s: int = Field(default=5, ge=1)
    """``Retry-After`` of a 503 when a model cannot fit the budget now."""
    load_wait_s: float = Field(default=60.0, gt=0)
    """How long a request waits for its model to load (and for a free load) before a 503."""
    full_check_interval_s: float = Field(default=300.0, gt=0)
    """Seconds between each member's own alias reads. Moves are seen within
    ``poll_interval_s`` through the alias feed (one list request per interval for every
    member, :mod:`serving.runtime.feed`); this is the safety net for a move whose feed
    marker was not written."""
    route_by_model: bool = True
    """On Ray, with more than one single-hop replica: a request for a member that this
    replica neither holds nor is loading goes to the member's owners, the replicas ranked
    first for it by rendezvous hashing over the live replicas, so R replicas hold about R
    budgets' worth of distinct members instead of each loading whatever it is sent.
    False: every replica serves every member it is sent (the standalone server always does)."""
    owner_rps: float = Field(default=200.0, gt=0)
    """Requests per second of one member that one owner takes before the member gets one
    more owner (a hot member spreads over more replicas as its load grows, up to all of
    them). Each replica estimates the member's rate from the requests it forwards."""


class SharedWorkersConfig(BaseModel):
    """The shared model workers of a replica, for models with ``workers: shared``."""

    model_config = ConfigDict(extra="forbid")

    count: int = Field(default=2, ge=1)
    """Worker processes; each version goes to the one that holds the fewest bytes."""
    memory_bytes: int = Field(default=4 * 1024**3, ge=64 * 1024**2)
    """Address space each may use on top of the interpreter's, for all its versions."""
    keep_idle_s: float = Field(default=300.0, ge=0)
    """How long a worker whose last version left keeps running, so the next load into it
    does not pay a new interpreter and its frameworks' import (2 to 3 s for scikit-learn).
    A memory budget (``pool.memory_bytes``) counts an idle worker. 0: it stops at once."""
    prestart: list[str] = Field(default_factory=list)
    """Formats (``sklearn``, ``pickle``, ``skops``, ``torch-state-dict``, ...) whose frameworks every
    worker imports when the replica starts, before any request: a model set's first loads
    then skip the worker's start. Empty (the default): workers start on their first load."""

    @field_validator("prestart")
    @classmethod
    def _known_formats(cls, formats: list[str]) -> list[str]:
        unknown = sorted(set(formats) - set(FORMAT_FACTS))
        if unknown:
            raise ValueError(f"unknown formats {unknown}: use {sorted(FORMAT_FACTS)}")
        return formats

    @model_validator(mode="after")
    def _prestart_kept(self) -> SharedWorkersConfig:
        if self.prestart and self.keep_idle_s <= 0:
            raise ValueError(
                "shared_workers.prestart needs keep_idle_s above 0: an idle worker stops at once"
            )
        return self


class IngressConfig(BaseModel):
    """The HTTP-facing replicas: with ``layout: single-hop`` these serve every model too."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | Literal["auto"] | None = 1
    autoscaling_config: dict[str, Any] | None = None
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0.25})
    max_ongoing_requests: int = Field(default=256, ge=1)
    max_replicas_per_node: int | None = Field(default=None, ge=1)
    """At most this many replicas on one Ray node (``1`` spreads them, one per node)."""

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> IngressConfig:
        if self.autoscaling_config is not None:
            self.num_replicas = None
        return self


class AppConfig(BaseModel):
    """Everything the app builder needs; unknown keys are refused."""

    @property
    def reply_limit(self) -> int:
        """The most bytes of tensors one answer may carry (``max_reply_bytes``, or twice the body limit)."""
        return self.max_reply_bytes if self.max_reply_bytes is not None else 2 * self.max_body_bytes

    model_config = ConfigDict(extra="forbid")

    store: str | None = None
    """Store URI; defaults to ``SERVING_STORE`` (``./model-store``)."""
    models: list[ModelConfig] = Field(min_length=1)
    """Named models, loaded at start and never evicted, and model sets (``prefix``), whose
    members load on their first request under ``pool``."""
    pool: PoolConfig = Field(default_factory=PoolConfig)
    shared_workers: SharedWorkersConfig = Field(default_factory=SharedWorkersConfig)
    poll_interval_s: float = Field(default=5.0, gt=0)
    """Seconds between alias checks (with jitter)."""
    poll_jitter: float = Field(default=0.2, ge=0, le=1)
    """Fraction of the interval added or removed at random, so replicas spread out."""
    retry_backoff_max_s: float = Field(default=60.0, gt=0)
    """Upper bound of the backoff after a failed swap of the same target."""
    cache_dir: str | None = None
    """Loader cache; defaults to ``SERVING_CACHE_DIR``."""
    cache_max_bytes: int | None = Field(default=None, ge=0)
    max_body_bytes: int = Field(default=32 * 1024**2, ge=1024)
    """Requests with larger bodies get 413 (checked while the body is read)."""
    body_timeout_s: float = Field(default=30.0, gt=0)
    """A request body that has not fully arrived this long after its headers gets 408."""
    max_reply_bytes: int | None = Field(default=None, ge=1024)
    """An answer whose tensors hold more bytes than this is refused with 413 before it is
    encoded; None: twice ``max_body_bytes``."""
    layout: Literal["single-hop", "two-hop"] = "single-hop"
    """``single-hop``: each replica holds the routes and every model (one hop per request;
    sized by ``ingress``). ``two-hop``: an ingress deployment in front of one deployment
    per model (per-model replicas and autoscaling, one more hop per request)."""
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    access_log: bool = False
    """Ray Serve's access log line per request in every replica. Off by default, as in
    the standalone server: ``serving_requests_total`` counts every request by model,
    version and status either way, and the line costs about 5% of a 1-row request."""
    routing_header: str = Field(default="x-request-id", pattern=r"^[A-Za-z0-9-]{1,64}$")
    """Requests carrying this header are routed by its value's hash during a canary, so one
    caller stays on one version; requests without it are split at random."""

    @model_validator(mode="after")
    def _unique_names(self) -> AppConfig:
        names = [m.name for m in self.named]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"model names must be unique: {sorted(dupes)}")
        prefixes = [m.prefix or "" for m in self.model_sets]
        dupes = {p for p in prefixes if prefixes.count(p) > 1}
        if dupes:
            raise ValueError(f"model set prefixes must be unique: {sorted(dupes)}")
        for name in [*self.pool.pinned, *self.pool.prefetch]:
            check_name(name, "model name")
            if self.set_for(name) is None:
                raise ValueError(f"pool: {name!r} is not a member of any model set")
        if self.model_sets and self.layout == "two-hop":
            raise ValueError("model sets (prefix) need layout: single-hop")
        return self

    @property
    def named(self) -> list[ModelConfig]:
        """The models named one by one: loaded at start, never evicted."""
        return [m for m in self.models if m.prefix is None]

    @property
    def model_sets(self) -> list[ModelConfig]:
        """The model sets (``prefix``): members load on demand."""
        return [m for m in self.models if m.prefix is not None]

    def set_for(self, name: str) -> ModelConfig | None:
        """The model set that serves ``name`` (the longest matching prefix), if any.

        A named model is never a member of a set, whatever its name."""
        if any(m.name == name for m in self.named):
            return None
        matches = [m for m in self.model_sets if m.admits(name)]
        return max(matches, key=lambda m: len(m.prefix or "")) if matches else None
