"""Automated rollout: move a canary's weight step by step, promote it, or abort on a threshold.

The rollout runs where the publisher's credentials are (a laptop, a CI job):
it writes the alias object (compare-and-swap, signed when given a key) and only
*reads* the serving side, so nothing in the serving pods needs write access
to the store::

    shadow phase (optional)      canary steps                        end
    alias.shadow = V, f    ->    alias.canary = V, w1 .. wn    ->    promote (V is the target)
         │ measure S s               │ measure step-seconds each
         └─ disagreement > max ──────┴─ error / p99 threshold crossed ─> abort (alias back on the old target)

Each step waits until every replica reports the new share with the version
loaded, takes the per-version figures (cumulative), waits ``step_seconds`` and
takes them again: the difference is what the canary and the live version did
in that step. Figures come from the server's repository index
(:class:`IndexSource`) or from Prometheus (:class:`PrometheusSource`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import httpx

from serving.errors import InvalidRequest, RolloutAborted, ServingError, StoreUnavailable
from serving.manifest import TensorSpec
from serving.metrics import LATENCY_BUCKETS
from serving.repository import (
    Abort,
    AliasMove,
    AliasWriter,
    Expecting,
    Noted,
    Promote,
    Repository,
    SetCanary,
    SetShadow,
    Withdraw,
)
from serving.runtime.traffic import quantile

log = logging.getLogger(__name__)

Sleep = Callable[[float], None]

DEFAULT_STEPS: tuple[float, ...] = (5.0, 25.0, 50.0, 100.0)
"""The canary weights (percent) of a rollout that names none."""

CONVERGE_TIMEOUT_S = 120.0
"""How long every replica may take, by default, to load the version and apply a step."""


def valid_steps(steps: Sequence[float]) -> bool:
    """Whether ``steps`` are canary weights a rollout can take: strictly increasing, in (0, 100]."""
    return bool(steps) and all(0 < s <= 100 for s in steps) and list(steps) == sorted(set(steps))


@dataclass(frozen=True)
class Thresholds:
    """When a step fails. Ratios compare the canary (or shadow) with the live version in the same step."""

    max_error_ratio: float = 0.05
    """The canary's non-2xx share minus the live version's."""
    max_p99_ratio: float | None = None
    """The canary's p99 latency over the live version's (None: not checked)."""
    max_disagreement: float = 0.05
    """Share of compared requests whose answer differed from the live version's: the shadow's
    mirrored requests, and the canary's requests checked against the live version."""
    min_requests: int = 20
    """Fewer canary (or compared shadow) requests than this in a step cannot show it is healthy."""


@dataclass
class Window:
    """What one version did between two snapshots."""

    requests: int = 0
    errors: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    compared: int = 0
    disagreed: int = 0

    @property
    def error_ratio(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def p99_s(self) -> float | None:
        return quantile(self.buckets, 0.99)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_ratio": round(self.error_ratio, 4),
            "p99_s": self.p99_s,
            "compared": self.compared,
            "disagreed": self.disagreed,
        }


def window(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], version: str) -> Window:
    """The difference of two cumulative snapshots for ``version`` (a restarted replica counts from 0)."""
    a, b = after.get(version, {}), before.get(version, {})

    def diff(key: str) -> int:
        return max(0, int(a.get(key, 0)) - int(b.get(key, 0)))

    out = Window(diff("requests"), diff("errors"), compared=diff("compared"), disagreed=diff("disagreed"))
    ab, bb = a.get("buckets") or [], b.get("buckets") or []
    if len(ab) == len(out.buckets):
        bb = bb if len(bb) == len(ab) else [0] * len(ab)
        out.buckets = [max(0, int(x) - int(y)) for x, y in zip(ab, bb, strict=True)]
    return out


class Source(Protocol):
    """Where a rollout reads what the replicas do."""

    def figures(self) -> dict[str, dict[str, Any]]:
        """Per version, cumulative: requests, errors, buckets, compared, disagreed."""
        ...

    def applied(self, role: str, version: str, share: float) -> tuple[bool, str]:
        """Whether every replica holds ``version`` loaded as ``role`` with ``share``; and why not."""
        ...


class IndexSource:
    """Figures and replica state from ``GET /v2/repository/index`` of a serving endpoint."""

    def __init__(self, url: str, name: str, *, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.name = name
        self._client = httpx.Client(timeout=timeout_s)

    def entry(self) -> dict[str, Any]:
        try:
            reply = self._client.get(f"{self.url}/v2/repository/index")
        except httpx.HTTPError as exc:
            raise StoreUnavailable(f"cannot read {self.url}/v2/repository/index: {exc}") from exc
        if reply.status_code != 200:
            raise StoreUnavailable(f"{self.url}/v2/repository/index answered {reply.status_code}")
        for entry in reply.json():
            if entry.get("name") == self.name:
                return dict(entry)
        raise InvalidRequest(f"{self.url} does not serve model {self.name!r}")

    def figures(self) -> dict[str, dict[str, Any]]:
        return dict(self.entry().get("figures") or {})

    def applied(self, role: str, version: str, share: float) -> tuple[bool, str]:
        entry = self.entry()
        replicas = entry.get("replicas") or []
        key = "weight" if role == "canary" else "fraction"
        pending = []
        for replica in replicas:
            state = replica.get(role) or {}
            if state.get("version") != version or not math.isclose(float(state.get(key, -1)), share):
                pending.append(f"{replica['replica']}: not seen yet")
            elif not state.get("loaded"):
                pending.append(f"{replica['replica']}: {state.get('error') or 'loading'}")
        if not replicas:
            return False, "no replica reports"
        return not pending, "; ".join(pending)

    def close(self) -> None:
        self._client.close()


class PrometheusSource:
    """Figures and replica state from Prometheus' HTTP API (instant queries of the counters).

    ``prefix`` is what the exporter puts before the names of :mod:`serving.metrics`
    (``ray_`` for Ray's node exporter, empty for ``serving serve --standalone``);
    ``selector`` narrows every query further (``namespace="ml"``).
    """

    def __init__(
        self, url: str, name: str, *, prefix: str = "ray_", selector: str = "", timeout_s: float = 10.0
    ) -> None:
        self.url = url.rstrip("/")
        self.name = name
        self.prefix = prefix
        self._match = f'model="{name}"' + (f",{selector}" if selector else "")
        self._client = httpx.Client(timeout=timeout_s)

    def query(self, expr: str) -> list[dict[str, Any]]:
        try:
            reply = self._client.get(f"{self.url}/api/v1/query", params={"query": expr})
            body = reply.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise StoreUnavailable(f"cannot query Prometheus at {self.url}: {exc}") from exc
        if body.get("status") != "success":
            raise StoreUnavailable(f"Prometheus refused {expr!r}: {body.get('error', body)}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def figures(self) -> dict[str, dict[str, Any]]:
        p, m = self.prefix, self._match
        out: dict[str, dict[str, Any]] = {}

        def row(version: str) -> dict[str, Any]:
            return out.setdefault(
                version,
                {"requests": 0, "errors": 0, "buckets": [0] * (len(LATENCY_BUCKETS) + 1)}
                | {"compared": 0, "disagreed": 0},
            )

        roles = 'role=~"live|canary|shadow"'
        for s in self.query(f"sum by (version, status) ({p}serving_requests_total{{{m},{roles}}})"):
            f, n = row(s["metric"]["version"]), round(float(s["value"][1]))
            f["requests"] += n
            if not s["metric"].get("status", "").startswith("2"):
                f["errors"] += n
        bounds = [*LATENCY_BUCKETS, math.inf]
        for s in self.query(
            f"sum by (version, le) ({p}serving_request_duration_seconds_bucket{{{m},{roles}}})"
        ):
            le = float(s["metric"]["le"])
            if le in bounds:
                row(s["metric"]["version"])["buckets"][bounds.index(le)] = round(float(s["value"][1]))
        for counter in ("shadow", "canary"):
            for s in self.query(f"sum by (version, outcome) ({p}serving_{counter}_comparisons_total{{{m}}})"):
                f, n = row(s["metric"]["version"]), round(float(s["value"][1]))
                if s["metric"].get("outcome") in ("agree", "disagree"):
                    f["compared"] += n
                if s["metric"].get("outcome") == "disagree":
                    f["disagreed"] += n
        return out

    def applied(self, role: str, version: str, share: float) -> tuple[bool, str]:
        p, m = self.prefix, self._match
        held = self.query(f'min({p}serving_version_role_info{{{m},role="{role}",version="{version}"}})')
        if not held or float(held[0]["value"][1]) < 1:
            return False, f"not every replica holds {version} as {role} yet (per Prometheus)"
        if role == "canary":
            weights = self.query(f"{p}serving_canary_weight_percent{{{m}}}")
            if not weights or any(not math.isclose(float(w["value"][1]), share) for w in weights):
                return False, f"not every replica sends {share:g}% to the canary yet (per Prometheus)"
        return True, ""

    def close(self) -> None:
        self._client.close()


@dataclass
class Step:
    """One measured step, as printed (and as a ``--json`` line)."""

    phase: str
    """``shadow`` or ``canary``."""
    share: float
    """The canary's weight (percent) or the shadow's fraction."""
    seconds: float
    candidate: dict[str, Any]
    live: dict[str, Any]
    ok: bool
    reason: str = ""

    def line(self, version: str, live_version: str) -> str:
        c, lv = self.candidate, self.live

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1000:.1f} ms"

        share = f"{self.share:g}%" if self.phase == "canary" else f"{self.share:.0%} of requests"
        text = (
            f"{self.phase} {version} at {share} for {self.seconds:.0f}s: "
            f"{c['requests']} req, {c['error_ratio']:.1%} errors, p99 {ms(c['p99_s'])}"
        )
        if self.phase == "shadow" or c.get("compared"):
            ratio = c["disagreed"] / c["compared"] if c["compared"] else 0.0
            text += f", {c['disagreed']}/{c['compared']} disagree ({ratio:.1%})"
        text += (
            f" | live {live_version}: {lv['requests']} req, {lv['error_ratio']:.1%} errors, "
            f"p99 {ms(lv['p99_s'])} -> {'ok' if self.ok else 'ABORT: ' + self.reason}"
        )
        return text


@dataclass
class Result:
    name: str
    alias: str
    version: str
    from_version: str
    outcome: str
    """``promoted``, ``aborted``, or ``refused`` (before any traffic: the input schema changed)."""
    steps: list[Step]
    seconds: float
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "steps": [asdict(s) for s in self.steps]}


def schema_change(live: Sequence[TensorSpec], candidate: Sequence[TensorSpec]) -> str:
    """Why a request the live version accepts could fail on the candidate ('' when none could).

    The inputs must have the same names and datatypes, and each dimension the live version
    leaves free (-1) must stay free: a fixed size where the live version takes any is a
    request the candidate refuses. A dimension the live version fixes may become free.
    """
    live_by, cand_by = {s.name: s for s in live}, {s.name: s for s in candidate}
    if set(live_by) != set(cand_by):
        return f"its inputs are {sorted(cand_by)}, the live version's {sorted(live_by)}"
    for name, spec in live_by.items():
        other = cand_by[name]
        if other.datatype != spec.datatype:
            return f"input {name!r} is {other.datatype}, the live version's {spec.datatype}"
        if len(other.shape) != len(spec.shape) or any(
            c != -1 and c != d for c, d in zip(other.shape, spec.shape, strict=True)
        ):
            return f"input {name!r} has shape {other.shape}, the live version's {spec.shape}"
    return ""


def judge_canary(candidate: Window, live: Window, t: Thresholds) -> str:
    """Why a canary step fails ('' when it passes).

    Errors and output agreement are judged on whatever the step saw, so a canary that
    fails every request, or answers them differently, is stopped at once; passing needs
    at least ``min_requests`` canary requests. Agreement is judged where the replicas
    checked the canary against the live version (``canary_check_fraction``, on by default).
    """
    why = _disagreement(candidate, t, "canary")
    if why:
        return why
    excess = candidate.error_ratio - live.error_ratio
    if candidate.requests and excess > t.max_error_ratio:
        return (
            f"canary error ratio {candidate.error_ratio:.1%} ({candidate.errors}/{candidate.requests}) "
            f"is {excess:.1%} over the live version's {live.error_ratio:.1%} "
            f"(--max-error-ratio {t.max_error_ratio:g})"
        )
    if candidate.requests < t.min_requests:
        return (
            f"the canary answered {candidate.requests} requests, fewer than --min-requests {t.min_requests}"
        )
    if t.max_p99_ratio is not None:
        c99, l99 = candidate.p99_s, live.p99_s
        if c99 is not None and l99 is not None and l99 > 0 and c99 / l99 > t.max_p99_ratio:
            return (
                f"canary p99 {c99 * 1000:.1f} ms is {c99 / l99:.2f}x the live version's "
                f"{l99 * 1000:.1f} ms (--max-p99-ratio {t.max_p99_ratio:g})"
            )
    return ""


def _disagreement(candidate: Window, t: Thresholds, phase: str) -> str:
    """Past ``max_disagreement`` once ``min_requests`` were compared; before that, only when the
    disagreements already seen are more than ``min_requests`` comparisons would allow (so one
    disagreement in the first three does not stop a step, and one that disagrees on every
    request is stopped at once)."""
    ratio = candidate.disagreed / candidate.compared if candidate.compared else 0.0
    if candidate.disagreed > t.max_disagreement * max(candidate.compared, t.min_requests):
        return (
            f"{phase} disagreement {ratio:.1%} ({candidate.disagreed}/{candidate.compared}) "
            f"with the live version is over --max-disagreement {t.max_disagreement:g}"
        )
    return ""


def judge_shadow(shadow: Window, live: Window, t: Thresholds) -> str:
    """Why a shadow phase fails ('' when it passes); like :func:`judge_canary`, on disagreement."""
    why = _disagreement(shadow, t, "shadow")
    if why:
        return why
    excess = shadow.error_ratio - live.error_ratio
    if shadow.requests and excess > t.max_error_ratio:
        return (
            f"shadow error ratio {shadow.error_ratio:.1%} is {excess:.1%} over the live version's "
            f"(--max-error-ratio {t.max_error_ratio:g})"
        )
    if shadow.compared < t.min_requests:
        return f"the shadow compared {shadow.compared} requests, fewer than --min-requests {t.min_requests}"
    return ""


class Rollout:
    """One rollout of ``version`` on ``name@alias``; :meth:`run` promotes or raises RolloutAborted.

    Example::

        rollout = Rollout(repo, "iris", "production", "8", IndexSource("http://serving:8000", "iris"))
        result = rollout.run([5, 25, 50, 100], step_seconds=60)

    Args:
        writer, expires_at: how each alias write is signed (as ``serving alias set``).
        on_step: called with each measured step (the CLI prints it, with :attr:`live_version`).
        converge_timeout_s: how long every replica may take to load the version and
            apply a new share; past it the rollout aborts.
    """

    def __init__(
        self,
        repo: Repository,
        name: str,
        alias: str,
        version: str,
        source: Source,
        thresholds: Thresholds | None = None,
        *,
        writer: AliasWriter | None = None,
        expires_at: str | None = None,
        on_step: Callable[[Step], None] | None = None,
        converge_timeout_s: float = CONVERGE_TIMEOUT_S,
        poll_s: float = 0.25,
        sleep: Sleep = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.repo, self.name, self.alias, self.version = repo, name, alias, version
        self.source = source
        self.thresholds = thresholds or Thresholds()
        self._writer, self._expires_at = writer, expires_at
        self._on_step = on_step or (lambda _: None)
        self._converge_timeout_s = converge_timeout_s
        self._poll_s = poll_s
        self._sleep, self._clock = sleep, clock
        self._sequence: int | None = None
        self.live_version: str | None = None
        """The alias's target when :meth:`run` began (None before): what the canary is measured against."""

    def run(
        self,
        steps: Sequence[float],
        step_seconds: float,
        *,
        shadow_seconds: float = 0.0,
        shadow_fraction: float = 1.0,
        allow_schema_change: bool = False,
    ) -> Result:
        """Schema gate, shadow phase (if ``shadow_seconds``), each canary weight in ``steps``, promote.

        Before any traffic, the candidate's declared inputs are compared with the live
        version's (:func:`schema_change`); a change is refused unless ``allow_schema_change``.

        Raises:
            InvalidRequest: bad steps, or the alias already has a canary/shadow of another version.
            RolloutAborted: a step crossed a threshold, or the version did not load everywhere;
                the alias has its old target and no canary or shadow any more.
        """
        if not valid_steps(steps):
            raise InvalidRequest("--steps must be increasing weights in (0, 100], e.g. 5,25,50,100")
        current = self.repo.get_alias(self.name, self.alias)
        if current.version == self.version:
            raise InvalidRequest(f"{self.name}@{self.alias} already points at {self.version}")
        for other in (current.canary, current.shadow):
            if other is not None and other.version != self.version:
                raise InvalidRequest(
                    f"{self.name}@{self.alias} already has {other.version} as canary or shadow: "
                    f"'serving alias abort {self.name} {self.alias}' first"
                )
        live_version = self.live_version = current.version
        if not allow_schema_change:
            self._schema_gate(live_version)
        # NOTE: each move of this rollout expects the alias exactly as it last wrote (or read)
        # it: another writer's change of any kind stops the rollout (AliasChanged).
        self._sequence = current.seq
        started = self._clock()
        done: list[Step] = []
        # NOTE: each write records what it does and what was judged before it (an AliasEvent).
        judged = ""
        try:
            if shadow_seconds > 0:
                self._move(
                    Noted(
                        SetShadow(self.version, shadow_fraction, live=live_version),
                        "shadow",
                        self.version,
                        f"shadow {shadow_fraction:.0%} of requests for {shadow_seconds:g}s",
                    )
                )
                step = self._measure("shadow", shadow_fraction, shadow_seconds, live_version)
                done.append(step)
                if not step.ok:
                    raise RolloutAborted(step.reason)
                judged = step.line(self.version, live_version)
                self._drop_shadow(f"shadow passed: {judged}")
            for weight in steps:
                after = f"; after {judged}" if judged else ""
                self._move(
                    Noted(
                        SetCanary(self.version, weight, live=live_version),
                        "canary",
                        self.version,
                        f"canary {weight:g}% for {step_seconds:g}s{after}",
                    )
                )
                step = self._measure("canary", weight, step_seconds, live_version)
                done.append(step)
                if not step.ok:
                    raise RolloutAborted(step.reason)
                judged = step.line(self.version, live_version)
            # NOTE: only the canary this rollout judged; another writer's is refused (AliasChanged).
            self._move(
                Noted(Promote(expected=self.version, live=live_version), "promoted", self.version, judged)
            )
        except BaseException as exc:
            # NOTE: whatever stopped us (a threshold, Ctrl-C, a lost server), the alias must
            # not be left half-way: back to the old target, no canary, no shadow.
            reason = exc.message if isinstance(exc, ServingError) else f"{type(exc).__name__}: {exc}"
            self._abort_quietly(reason)
            if isinstance(exc, RolloutAborted) and exc.result is None:
                took = round(self._clock() - started, 3)
                exc.result = Result(
                    self.name, self.alias, self.version, live_version, "aborted", done, took, exc.message
                )
            raise
        return Result(
            self.name,
            self.alias,
            self.version,
            live_version,
            "promoted",
            done,
            round(self._clock() - started, 3),
        )

    def _schema_gate(self, live_version: str) -> None:
        live, _ = self.repo.manifest(self.name, live_version)
        candidate, _ = self.repo.manifest(self.name, self.version)
        if not live.inputs or not candidate.inputs:
            log.info("%s: no declared input schema to compare; the shadow phase judges it", self.name)
            return
        why = schema_change(live.inputs, candidate.inputs)
        if why:
            reason = (
                f"{self.name}:{self.version} refused before any traffic: {why}, so requests that "
                f"{live_version} answers would fail on it (--allow-schema-change to roll it out anyway)"
            )
            result = Result(self.name, self.alias, self.version, live_version, "refused", [], 0.0, reason)
            raise RolloutAborted(reason, result)

    def _move(self, move: AliasMove) -> None:
        if self._sequence is not None:
            move = Expecting(move, self._sequence)
        moved = self.repo.move_alias(
            self.name, self.alias, move, writer=self._writer, expires_at=self._expires_at
        )
        self._sequence = moved.seq

    def _drop_shadow(self, detail: str) -> None:
        current = self.repo.get_alias(self.name, self.alias)
        if current.shadow is not None:
            self._move(Noted(Abort(expected=self.version), "shadow", self.version, detail))

    def _abort_quietly(self, reason: str) -> None:
        # NOTE: the original error is what the caller must see, not a failure to clean up.
        # NOTE: whatever else changed (another writer, a write whose answer was lost), this
        # rollout's own version stops taking traffic; another writer's canary or shadow stays.
        with contextlib.suppress(ServingError):
            current = self.repo.get_alias(self.name, self.alias)
            mine = [
                s for s in (current.canary, current.shadow) if s is not None and s.version == self.version
            ]
            if mine:
                self.repo.move_alias(
                    self.name,
                    self.alias,
                    Noted(Withdraw(self.version), "aborted", self.version, reason),
                    writer=self._writer,
                    expires_at=self._expires_at,
                )

    def _wait_applied(self, role: str, share: float) -> None:
        deadline = self._clock() + self._converge_timeout_s
        why = ""
        while self._clock() < deadline:
            ok, why = self.source.applied(role, self.version, share)
            if ok:
                return
            self._sleep(self._poll_s)
        raise RolloutAborted(
            f"{role} {self.version} at {share:g} not applied on every replica within "
            f"{self._converge_timeout_s:g}s: {why}"
        )

    def _measure(self, phase: str, share: float, seconds: float, live_version: str) -> Step:
        self._wait_applied(phase, share)
        before = self.source.figures()
        began = self._clock()
        self._sleep(seconds)
        after = self.source.figures()
        took = self._clock() - began
        candidate, live = window(before, after, self.version), window(before, after, live_version)
        judge = judge_shadow if phase == "shadow" else judge_canary
        reason = judge(candidate, live, self.thresholds)
        step = Step(phase, share, round(took, 3), candidate.summary(), live.summary(), not reason, reason)
        self._on_step(step)
        return step
