"""Benchmark results: records, ratios (ours / each peer), targets, JSON, Markdown and plots.

Pure functions over plain dicts, so a unit test can drive them with synthetic
records (tests/unit/test_bench_report.py).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

OURS = "ours"
FIELDS = ("workload", "system", "requests_per_s", "rows_per_s", "p50_ms", "p99_ms", "errors", "notes")


def record(
    workload: str,
    system: str,
    *,
    requests_per_s: float | None,
    rows_per_s: float | None,
    p50_ms: float | None,
    p99_ms: float | None,
    errors: int = 0,
    notes: str = "",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "workload": workload,
        "system": system,
        "requests_per_s": requests_per_s,
        "rows_per_s": rows_per_s,
        "p50_ms": p50_ms,
        "p99_ms": p99_ms,
        "errors": errors,
        "notes": notes,
        **extra,
    }


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from the same (workload, system) measured in several rounds: medians, summed errors."""
    first = rounds[0]
    out = dict(first)
    for key in ("requests_per_s", "rows_per_s", "p50_ms", "p99_ms"):
        values = [r[key] for r in rounds if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    out["errors"] = sum(r.get("errors", 0) for r in rounds)
    out["rounds"] = len(rounds)
    out["per_round_requests_per_s"] = [r.get("requests_per_s") for r in rounds]
    return out


def ratios(records: Iterable[dict[str, Any]], ours: str = OURS) -> list[dict[str, Any]]:
    """For each workload with a record of ``ours``: ours / each other system, on throughput and p99."""
    by_workload: dict[str, dict[str, dict[str, Any]]] = {}
    for r in records:
        by_workload.setdefault(r["workload"], {})[r["system"]] = r
    out = []
    for workload, systems in by_workload.items():
        mine = systems.get(ours)
        if mine is None:
            continue
        for name, other in systems.items():
            if name == ours:
                continue
            metric = "rows_per_s" if mine.get("rows_per_s") and other.get("rows_per_s") else "requests_per_s"
            out.append(
                {
                    "workload": workload,
                    "ours": ours,
                    "peer": name,
                    "metric": metric,
                    "ratio": _div(mine.get(metric), other.get(metric)),
                    "p99_ratio": _div(mine.get("p99_ms"), other.get("p99_ms")),
                }
            )
    return out


ANCHORS = ("mlserver", "kserve", "pytriton")
"""The peers the per-core target names: the Ray path must match the best of them."""


def equal_cpu(records: Iterable[dict[str, Any]], peers: Iterable[str]) -> list[dict[str, Any]]:
    """N of our Ray replicas (``ours-xN``) against N of each peer's processes, per workload.

    A peer at N = 1 is its plain name; at N > 1 it is ``NAME-xN`` (its own scaling knob).
    Each row carries ours / the peer on req/s and on p99, whether the peer is an anchor, and
    the errors of both (a server that fails fast is not fast: the targets skip such rows).
    """
    names = list(peers)
    by_workload: dict[str, dict[str, dict[str, Any]]] = {}
    for r in records:
        by_workload.setdefault(r["workload"], {})[r["system"]] = r
    out = []
    for workload, systems in by_workload.items():
        for n in (1, 2):
            mine = systems.get(f"ours-x{n}")
            if mine is None:
                continue
            for peer in names:
                other = systems.get(peer if n == 1 else f"{peer}-x{n}")
                if other is None:
                    continue
                out.append(
                    {
                        "workload": workload,
                        "n": n,
                        "peer": peer,
                        "ours_requests_per_s": mine["requests_per_s"],
                        "peer_requests_per_s": other["requests_per_s"],
                        "ours_p99_ms": mine["p99_ms"],
                        "peer_p99_ms": other["p99_ms"],
                        "ratio": _div(mine["requests_per_s"], other["requests_per_s"]),
                        "p99_ratio": _div(mine["p99_ms"], other["p99_ms"]),
                        "anchor": peer in ANCHORS,
                        "errors": int(mine.get("errors") or 0) + int(other.get("errors") or 0),
                    }
                )
    return out


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def target(
    name: str, value: float | None, goal: float, *, higher_is_better: bool, why: str = ""
) -> dict[str, Any]:
    """One target from the issue: met or not, and by how much it is missed."""
    if value is None:
        return {"target": name, "value": None, "goal": goal, "met": None, "miss": None, "why": why}
    met = value >= goal if higher_is_better else value <= goal
    if met:
        miss = None
    elif higher_is_better:
        miss = goal / value - 1 if value else None
    else:
        # NOTE: a goal of 0 (errors) is missed by the value itself, not by a ratio.
        miss = value / goal - 1 if goal else value
    return {"target": name, "value": value, "goal": goal, "met": met, "miss": miss, "why": "" if met else why}


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:,.{digits}f}"
    return str(v)


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Benchmark results ({result.get('mode', 'full')} run, {result.get('when', '')})", ""]
    env = result.get("environment", {})
    if env:
        lines += ["Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    all_ratios = result.get("ratios", [])
    # NOTE: one table per system compared ("ours", "ours-standalone"), in first-seen order.
    for mine in dict.fromkeys(r.get("ours", OURS) for r in all_ratios) or [OURS]:
        lines += [
            f"## Ratios: {mine} / each peer",
            "",
            "| workload | peer | metric | ratio | p99 ratio |",
            "|---|---|---|---|---|",
        ]
        for r in all_ratios:
            if r.get("ours", OURS) != mine:
                continue
            lines.append(
                f"| {r['workload']} | {r['peer']} | {r['metric']} | {_fmt(r['ratio'], 2)} "
                f"| {_fmt(r['p99_ratio'], 2)} |"
            )
        lines.append("")
    lines.pop()
    rows = result.get("equal_cpu") or []
    if rows:
        lines += [
            "",
            "## Equal CPU: N Ray replicas (ours-xN) against N processes of each peer",
            "",
            "| workload | N | peer | ours req/s | peer req/s | ratio "
            "| ours p99 ms | peer p99 ms | p99 ratio |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            peer = f"**{r['peer']}**" if r["anchor"] else r["peer"]
            lines.append(
                f"| {r['workload']} | {r['n']} | {peer} | {_fmt(r['ours_requests_per_s'], 0)} "
                f"| {_fmt(r['peer_requests_per_s'], 0)} | {_fmt(r['ratio'], 2)} "
                f"| {_fmt(r['ours_p99_ms'], 1)} | {_fmt(r['peer_p99_ms'], 1)} | {_fmt(r['p99_ratio'], 2)} |"
            )
    lines += [
        "",
        "## Targets",
        "",
        "| target | value | goal | met | missed by | what holds it back |",
        "|---|---|---|---|---|---|",
    ]
    for t in result.get("targets", []):
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        miss = f"{t['miss']:.0%}" if t.get("miss") is not None else ""
        lines.append(
            f"| {t['target']} | {_fmt(t['value'], 2)} | {t['goal']} | {met} | {miss} | {t.get('why', '')} |"
        )
    lines += [
        "",
        "## Records",
        "",
        "| workload | system | req/s | rows/s | p50 ms | p99 ms | errors | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result.get("records", []):
        lines.append(
            f"| {r['workload']} | {r['system']} | {_fmt(r['requests_per_s'], 0)} "
            f"| {_fmt(r['rows_per_s'], 0)} | "
            f"{_fmt(r['p50_ms'], 2)} | {_fmt(r['p99_ms'], 2)} | {r['errors']} | {r.get('notes', '')} |"
        )
    for title, key in (("Tuning (before / after)", "tuning"), ("Notes", "notes")):
        items = result.get(key) or []
        if items:
            lines += ["", f"## {title}", ""]
            for item in items:
                lines.append(
                    f"- {item if isinstance(item, str) else json.dumps(item, default=_json_default)}"
                )
    plots = result.get("plots") or []
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], folder: Path) -> list[str]:
    """Throughput and p99 by system per workload, and latency over time during a swap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    records = [r for r in result.get("records", []) if r.get("requests_per_s")]
    workloads = list(dict.fromkeys(r["workload"] for r in records))
    if workloads:
        fig, axes = plt.subplots(len(workloads), 2, figsize=(11, 2.4 * len(workloads)), squeeze=False)
        for row, wl in enumerate(workloads):
            rs = [r for r in records if r["workload"] == wl]
            names = [r["system"] for r in rs]
            colors = ["tab:green" if n.startswith(OURS) else "tab:gray" for n in names]
            metric = "rows_per_s" if all(r.get("rows_per_s") for r in rs) else "requests_per_s"
            axes[row][0].barh(names, [r[metric] for r in rs], color=colors)
            axes[row][0].set_title(f"{wl}: {metric.replace('_', '/')}", fontsize=9)
            axes[row][1].barh(names, [r["p99_ms"] or 0 for r in rs], color=colors)
            axes[row][1].set_title(f"{wl}: p99 ms (lower is better)", fontsize=9)
            for ax in axes[row]:
                ax.tick_params(labelsize=8)
        fig.tight_layout()
        path = folder / "throughput_latency.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(str(path))
    swap = result.get("swap_timeline")
    if swap and swap.get("samples"):
        fig, ax = plt.subplots(figsize=(10, 3.5))
        ok = [(t, lat * 1000) for t, lat, status, _v in swap["samples"] if status == 200]
        bad = [t for t, _lat, status, _v in swap["samples"] if status != 200]
        ax.scatter([t for t, _ in ok], [v for _, v in ok], s=2, alpha=0.5, label="latency (200)")
        if bad:
            ax.scatter(bad, [0] * len(bad), s=12, color="red", label="errors")
        for i, t in enumerate(swap.get("moves", [])):
            ax.axvline(t, color="orange", linestyle="--", label="alias moved" if i == 0 else None)
        ax.set_xlabel("seconds")
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.set_title("1-row v2 latency while the alias moves")
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        path = folder / "swap_latency.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(str(path))
    return written
