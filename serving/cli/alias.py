"""``serving alias set|get|promote|abort``, ``serving rollback`` and ``serving rollout``: moving aliases.

Every move is one :meth:`serving.repository.Repository.move_alias` call, signed
when ``--signing-key`` is given (:func:`serving.cli.options.alias_writer`).
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import TYPE_CHECKING, Any

from serving.cli.context import Context, plural
from serving.cli.options import (
    Commands,
    add_alias_signing,
    add_name_alias,
    alias_writer,
    fraction,
    percent,
    positive_float,
    positive_int,
    steps,
)
from serving.errors import InvalidRequest

if TYPE_CHECKING:
    from serving.manifest import Alias
    from serving.repository import AliasMove

log = logging.getLogger(__name__)


def _move(ctx: Context, args: argparse.Namespace, move: AliasMove) -> Alias:
    """Apply ``move`` to ``NAME@ALIAS``, signed as ``--signing-key``/``--expires-in`` say."""
    writer, expires_at = alias_writer(args)
    return ctx.repo.move_alias(args.name, args.alias, move, writer=writer, expires_at=expires_at)


def _split_text(alias: Alias) -> str:
    """`` (canary 2 at 30%, shadow 3 on 0.5 of requests)`` or ``''``."""
    parts = []
    if alias.canary is not None:
        parts.append(f"canary {alias.canary.version} at {alias.canary.weight:g}%")
    if alias.shadow is not None:
        parts.append(f"shadow {alias.shadow.version} on {alias.shadow.fraction:.0%} of requests")
    return f" ({', '.join(parts)})" if parts else ""


# -- alias set | get | promote | abort -----------------------------------------------------
def add_alias(commands: Commands) -> None:
    group = commands.group("alias", "set or show an alias", dest="alias_verb", metavar="ACTION")
    a = group.add("set", alias_set, "point NAME@ALIAS at VERSION")
    add_name_alias(a)
    a.add_argument("version", metavar="VERSION")
    a.add_argument(
        "--canary",
        type=percent,
        metavar="PCT",
        help="keep the target; send PCT percent of requests to VERSION (0-100) beside it",
    )
    a.add_argument(
        "--shadow",
        type=fraction,
        metavar="FRACTION",
        help="keep the target; mirror FRACTION (0-1) of requests to VERSION, compared and never returned",
    )
    a.add_argument(
        "--replace",
        action="store_true",
        help="with --canary/--shadow: replace a canary or shadow of another version (refused without it)",
    )
    add_alias_signing(a)
    a = group.add("get", alias_get, "print the version NAME@ALIAS points at")
    add_name_alias(a)
    a = group.add(
        "repair",
        alias_repair,
        "point NAME@ALIAS at VERSION whatever its object holds, even unreadable bytes (kept aside)",
    )
    add_name_alias(a)
    a.add_argument(
        "--to", required=True, metavar="VERSION", help="the version the alias points at afterwards"
    )
    a.add_argument(
        "--sequence",
        type=int,
        metavar="N",
        help="for an unreadable object: the new sequence (default: the Unix time, above any earlier one)",
    )
    add_alias_signing(a)
    a = group.add("promote", alias_promote, "make NAME@ALIAS's canary its target (history keeps the old one)")
    add_name_alias(a)
    _add_expect(a, "promote only if the canary is VERSION (refused, exit 14, if another writer changed it)")
    add_alias_signing(a)
    a = group.add("abort", alias_abort, "drop NAME@ALIAS's canary and shadow: all requests to the target")
    add_name_alias(a)
    _add_expect(a, "abort only if the canary or shadow is VERSION (refused, exit 14, otherwise)")
    add_alias_signing(a)


def _add_expect(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--expect", metavar="VERSION", help=help)


def alias_set(ctx: Context, args: argparse.Namespace) -> None:
    from serving.repository import SetCanary, SetShadow, SetTarget

    if args.canary is not None or args.shadow is not None:
        if args.canary is not None and args.shadow is not None:
            raise InvalidRequest("--canary and --shadow are two roles: give one per command")
        split: AliasMove = (
            SetCanary(args.version, args.canary, replace=args.replace)
            if args.canary is not None
            else SetShadow(args.version, args.shadow, replace=args.replace)
        )
        alias = _move(ctx, args, split)
        ctx.emit(f"{args.name}@{args.alias} -> {alias.version}{_split_text(alias)}", alias.model_dump())
        return
    alias = _move(ctx, args, SetTarget(args.version))
    was = f" (was {alias.history[-1].version})" if alias.history else ""
    ctx.emit(f"{args.name}@{args.alias} -> {alias.version}{was}", alias.model_dump())


def alias_repair(ctx: Context, args: argparse.Namespace) -> None:
    writer, expires_at = alias_writer(args)
    alias, kept = ctx.repo.repair_alias(
        args.name, args.alias, args.to, writer=writer, expires_at=expires_at, sequence=args.sequence
    )
    where = f"; the old object is kept at {kept}" if kept else ""
    ctx.emit(
        f"{args.name}@{args.alias} -> {alias.version} (repaired, sequence {alias.seq}{where})",
        alias.model_dump(),
    )


def alias_get(ctx: Context, args: argparse.Namespace) -> None:
    alias = ctx.repo.get_alias(args.name, args.alias)
    ctx.emit(alias.version + _split_text(alias), alias.model_dump())


def alias_promote(ctx: Context, args: argparse.Namespace) -> None:
    from serving.repository import Promote

    alias = _move(ctx, args, Promote(expected=args.expect))
    was = alias.history[-1].version
    ctx.emit(
        f"{args.name}@{args.alias} -> {alias.version} (canary promoted, was {was}){_split_text(alias)}",
        alias.model_dump(),
    )


def alias_abort(ctx: Context, args: argparse.Namespace) -> None:
    from serving.repository import Abort

    before = ctx.repo.get_alias(args.name, args.alias)
    alias = _move(ctx, args, Abort(expected=args.expect))
    ctx.emit(
        f"{args.name}@{args.alias} -> {alias.version} (dropped {_split_text(before).removeprefix(' (')}",
        alias.model_dump(),
    )


# -- rollback ------------------------------------------------------------------------------
def add_rollback(commands: Commands) -> None:
    p = commands.add("rollback", rollback, "move an alias back to its previous target")
    add_name_alias(p)
    add_alias_signing(p)


def rollback(ctx: Context, args: argparse.Namespace) -> None:
    from serving.repository import Rollback

    before = ctx.repo.get_alias(args.name, args.alias).version
    alias = _move(ctx, args, Rollback())
    ctx.emit(
        f"{args.name}@{args.alias} -> {alias.version} (rolled back from {before})",
        {**alias.model_dump(), "rolled_back_from": before},
    )


# -- rollout -------------------------------------------------------------------------------
def add_rollout(commands: Commands) -> None:
    # NOTE: no defaults here for what the rollout decides (steps, thresholds, converge
    # timeout): an option left out is None and serving.rollout's default applies.
    p = commands.add(
        "rollout",
        rollout,
        "move a canary's weight step by step, promote it, or abort on a threshold (exit 12)",
    )
    add_name_alias(p)
    p.add_argument("version", metavar="VERSION")
    p.add_argument("--url", help="serving endpoint whose /v2/repository/index gives per-version figures")
    p.add_argument("--prometheus", metavar="URL", help="read the figures from Prometheus instead")
    p.add_argument(
        "--prometheus-prefix",
        default="ray_",
        help="prefix of the metric names in Prometheus (ray_ on Ray; '' for --standalone)",
    )
    p.add_argument(
        "--prometheus-selector", default="", metavar="MATCHERS", help='extra matchers, e.g. namespace="ml"'
    )
    p.add_argument("--steps", type=steps, help="canary weights, in %%")
    p.add_argument("--step-seconds", type=positive_float, default=60.0, help="seconds measured per step")
    p.add_argument(
        "--shadow-seconds",
        type=float,
        help="first mirror traffic to VERSION this long and check --max-disagreement, no client exposed "
        "(default: --step-seconds; 0: no shadow phase)",
    )
    p.add_argument(
        "--allow-schema-change",
        action="store_true",
        help="roll out a version whose declared inputs differ from the live one's (refused without it)",
    )
    p.add_argument("--shadow-fraction", type=fraction, help="share mirrored in the shadow phase")
    p.add_argument(
        "--max-error-ratio",
        type=float,
        help="abort when the canary's non-2xx share exceeds the live version's by more than this",
    )
    p.add_argument(
        "--max-p99-ratio",
        type=positive_float,
        help="abort when canary p99 / live p99 exceeds this",
    )
    p.add_argument(
        "--max-disagreement",
        type=fraction,
        help="shadow phase: abort above this disagreement",
    )
    p.add_argument(
        "--min-requests",
        type=positive_int,
        help="abort a step that saw fewer canary requests",
    )
    p.add_argument(
        "--converge-timeout",
        type=positive_float,
        help="seconds every replica may take to load the version and apply a step",
    )
    add_alias_signing(p)


def rollout(ctx: Context, args: argparse.Namespace) -> None:
    import signal
    from dataclasses import asdict

    from serving.errors import RolloutAborted
    from serving.rollout import DEFAULT_STEPS, IndexSource, PrometheusSource, Rollout, Step, Thresholds

    if not args.url and not args.prometheus:
        raise InvalidRequest("give --url (the serving endpoint's repository index) or --prometheus URL")
    source: IndexSource | PrometheusSource
    if args.prometheus:
        source = PrometheusSource(
            args.prometheus, args.name, prefix=args.prometheus_prefix, selector=args.prometheus_selector
        )
    else:
        source = IndexSource(args.url, args.name)
    writer, expires_at = alias_writer(args)

    def on_step(step: Step) -> None:
        if ctx.as_json:
            print(json.dumps({"step": asdict(step)}), flush=True)
        else:
            print(step.line(args.version, str(job.live_version)), flush=True)

    def terminated(signum: int, frame: Any) -> None:
        # NOTE: a cancelled CI job gets SIGTERM; raising here lets the rollout abort the canary.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    thresholds = _given(
        args,
        max_error_ratio="max_error_ratio",
        max_p99_ratio="max_p99_ratio",
        max_disagreement="max_disagreement",
        min_requests="min_requests",
    )
    job = Rollout(
        ctx.repo,
        args.name,
        args.alias,
        args.version,
        source,
        Thresholds(**thresholds),
        writer=writer,
        expires_at=expires_at,
        on_step=on_step,
        **_given(args, converge_timeout_s="converge_timeout"),
    )
    try:
        # NOTE: safe by default: a shadow phase first (no client exposed), then the canary.
        shadow_seconds = args.step_seconds if args.shadow_seconds is None else args.shadow_seconds
        result = job.run(
            args.steps or DEFAULT_STEPS,
            args.step_seconds,
            shadow_seconds=shadow_seconds,
            allow_schema_change=args.allow_schema_change,
            **_given(args, shadow_fraction="shadow_fraction"),
        )
    except RolloutAborted as exc:
        if ctx.as_json and exc.result is not None:
            print(json.dumps({"result": exc.result.as_dict()}), flush=True)
        raise RolloutAborted(
            f"rollout of {args.name}:{args.version} aborted: {exc.message}; "
            f"{args.name}@{args.alias} stays on {job.live_version}",
            exc.result,
        ) from exc
    finally:
        source.close()
    text = (
        f"{args.name}@{args.alias} -> {args.version} (promoted from {result.from_version} after "
        f"{plural(len(result.steps), 'step')} in {result.seconds:.1f}s)"
    )
    # NOTE: JSON Lines with --json: one object per step as it ends, then the result.
    print(json.dumps({"result": result.as_dict()}) if ctx.as_json else text)


def _given(args: argparse.Namespace, **names: str) -> dict[str, Any]:
    """``{parameter: args.<option>}`` for the options given, so the rollout's defaults apply to the rest."""
    return {
        param: getattr(args, option) for param, option in names.items() if getattr(args, option) is not None
    }
