"""Routing by model on the Ray path: 2 replicas with a budget each, routed against unrouted.

The workload of ``bench/density.py`` (its ``publish`` and ``zipf_phase``): ``--small`` small
and ``--large`` models of about ``--large-mb`` MB in one local store, all ``production``, and
``--requests`` 1-row requests from ``--clients`` clients over a Zipf(``--zipf``) law, sent to
``serving serve`` on the chart's path (Ray Serve behind HAProxy, single-hop replicas) with
``--replicas`` replicas, the models as one model set under a ``--budget`` budget per replica.

Run twice on the same draws, each on an empty node cache:

- **routed** (``pool.route_by_model: true``, the default): a replica that lacks a member sends
  the request to the member's owner (rendezvous hashing over the live replicas);
- **unrouted** (``false``): every replica loads whatever HAProxy sends it.

Every replica also serves one named model, ``iris``; the bench waits until each reports it.

Reported for each: hit ratio, warm and cold p50 and p99, requests per second, failed requests,
and what the replicas hold at the end: distinct members and copies (a member on two replicas
is two copies). The claim under test: routed, R replicas hold about R budgets' worth of
distinct members, so the hit ratio is higher; the price is one more hop (a Ray handle call)
for the requests that land on a replica that does not own their member.

Run on a quiet machine::

    .venv/bin/python -m bench.routing --out bench/results/routing.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from bench.cpu_split import cpu_by_process
from bench.density import _publish, add_workload_arguments, hot_phase, publish, zipf_phase
from bench.systems import Processes
from serving.repository import Repository
from serving.server.launch import parse_bytes
from serving.server.process import free_port
from serving.store.local import LocalStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser)
    parser.set_defaults(small=1000, large=0, budget="4MiB")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--owner-rps", type=float, default=None, help="pool.owner_rps (unset: the default)")
    parser.add_argument("--isolation", default="none", help="the members' isolation (none: in process)")
    parser.add_argument(
        "--workers",
        choices=("dedicated", "shared"),
        default="dedicated",
        help="with --isolation worker: a worker per member, or the replica's shared workers",
    )
    parser.add_argument("--warmup", type=int, default=500, help="unmeasured requests first (other draws)")
    parser.add_argument(
        "--hot",
        type=int,
        default=0,
        help="after the Zipf phase, the hottest HOT members' throughput alone, then while cold "
        "requests churn at the Zipf phase's loads/s, then alone again (0: skip)",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="each hot phase's length")
    parser.add_argument(
        "--churn-rate",
        type=float,
        default=None,
        help="cold requests a second in the churn phase (default: the Zipf phase's loads/s)",
    )
    parser.add_argument(
        "--only", choices=("routed", "unrouted"), default=None, help="run one of the two (default: both)"
    )
    parser.add_argument(
        "--profile",
        default=None,
        help="a folder: the cores each kind of process used in each hot phase (where the hot "
        "set's time goes under churn)",
    )
    parser.add_argument(
        "--py-spy",
        default=None,
        metavar="PATTERN",
        help="with --profile: py-spy records the processes pgrep -f PATTERN finds in each hot phase",
    )
    parser.add_argument("--out", default="bench/results/routing.json")
    args = parser.parse_args()
    budget = parse_bytes(args.budget)
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        work = Path(tmp)
        names = publish(work / "store", work, args.small, args.large, args.large_mb, args.seed)
        publish_iris(work / "store", work)
        runs = {
            label: run(work, names, budget, routed, args)
            for label, routed in (("routed", True), ("unrouted", False))
            if args.only in (None, label)
        }
    routed, unrouted = runs.get("routed"), runs.get("unrouted")
    result: dict[str, Any] = {
        "setup": {
            "small": args.small,
            "large": args.large,
            "large_mb": args.large_mb,
            "budget_bytes_per_replica": budget,
            "replicas": args.replicas,
            "isolation": args.isolation,
            "workers": args.workers,
            "owner_rps": args.owner_rps,
            "zipf": args.zipf,
            "requests": args.requests,
            "clients": args.clients,
            "warmup": args.warmup,
            "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        **runs,
    }
    if routed is not None and unrouted is not None:
        result["hit_ratio_routed_over_unrouted"] = _ratio(
            routed["zipf"]["hit_ratio"], unrouted["zipf"]["hit_ratio"]
        )
        result["distinct_held_routed_over_unrouted"] = _ratio(
            routed["distinct_held"], unrouted["distinct_held"]
        )
        result["throughput_routed_over_unrouted"] = _ratio(
            routed["requests_per_s"], unrouted["requests_per_s"]
        )
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def run(work: Path, names: list[str], budget: int, routed: bool, args: argparse.Namespace) -> dict[str, Any]:
    label = "routed" if routed else "unrouted"
    app = {
        "store": str(work / "store"),
        "cache_dir": str(work / f"cache-{label}"),
        "models": [
            {"name": "iris", "alias": "production", "isolation": args.isolation},
            {"prefix": "m-", "alias": "production", "isolation": args.isolation, "workers": args.workers},
        ],
        "pool": {
            "memory_bytes": budget,
            "route_by_model": routed,
            **({"owner_rps": args.owner_rps} if args.owner_rps else {}),
        },
        "ingress": {"num_replicas": args.replicas, "ray_actor_options": {"num_cpus": 0.5}},
    }
    config = work / f"{label}.json"
    config.write_text(json.dumps(app))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--config", str(config), "--num-cpus", "2"]
    cmd += ["--port", str(port), "--metrics-port", str(free_port()), "--grpc-port", str(free_port())]
    procs = Processes(work)
    try:
        procs.start(label, cmd, (base + "/v2/health/ready", None))
        _replicas_up(base, args.replicas)
        zipf_phase(
            base,
            names,
            argparse.Namespace(**{**vars(args), "requests": args.warmup, "seed": args.seed + 100}),
        )
        zipf = zipf_phase(base, names, args)
        held = _held(base)
        hot = (
            _hot_phases(
                base, names, args, work / f"{label}.log", args.churn_rate or zipf["loads_per_s"], label
            )
            if args.hot
            else None
        )
    finally:
        procs.stop_all()
    return {
        "zipf": zipf,
        "hot_set_under_churn": hot,
        "requests_per_s": round(zipf["requests"] / zipf["seconds"], 1),
        "distinct_held": len(held),
        "copies_held": sum(len(h) for h in held.values()),
        "members_on_more_than_one_replica": sum(1 for h in held.values() if len(h) > 1),
        "members_per_replica": dict(Counter(r for h in held.values() for r in h)),
    }


def _hot_phases(
    base: str, names: list[str], args: argparse.Namespace, log: Path, rate: float, label: str
) -> dict[str, Any]:
    """The hot set's throughput alone, with cold requests at ``rate`` a second, and alone again
    (``bench/density.py``'s phases, on the routed or unrouted Ray path)."""
    if args.profile:
        # NOTE: what the replicas cost with their members loaded and no request at all.
        with _profiled(args, f"{label}-idle"):
            threading.Event().wait(args.seconds)
    with _profiled(args, f"{label}-alone"):
        before = hot_phase(base, names, args, log, churn=None)
    with _profiled(args, f"{label}-churn"):
        churned = hot_phase(base, names, args, log, churn="rate", rate=rate)
    after = hot_phase(base, names, args, log, churn=None)
    alone = (before["hot_per_s"] + after["hot_per_s"]) / 2
    return {
        "churn_rate_per_s": rate,
        "hot_per_s_alone": round(alone, 1),
        "hot_per_s_with_churn": round(churned["hot_per_s"], 1),
        "ratio": round(churned["hot_per_s"] / alone, 2) if alone else None,
        "before": before,
        "with_churn": churned,
        "after": after,
    }


@contextlib.contextmanager
def _profiled(args: argparse.Namespace, phase: str) -> Iterator[None]:
    """With ``--profile``: the cores each kind of process used in the phase
    (``<phase>-cpu.json``); with ``--py-spy PATTERN`` too, py-spy's record of every process
    ``pgrep -f PATTERN`` finds (``<phase>-<pid>.txt``, collapsed stacks; it costs about a
    core on these replicas, so the figures with it are not the bench's)."""
    if not args.profile:
        yield
        return
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    pids = (
        subprocess.run(["pgrep", "-f", args.py_spy], capture_output=True, text=True).stdout.split()
        if args.py_spy
        else []
    )
    spy = str(Path(sys.executable).with_name("py-spy"))
    seconds = str(max(1, int(args.seconds)))
    recorders = [
        subprocess.Popen(
            [
                spy,
                "record",
                "-r",
                "50",
                "-d",
                seconds,
                "-f",
                "raw",
                "-o",
                str(out / f"{phase}-{pid}.txt"),
                "-p",
                pid,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid in pids
    ]
    before, idle_before, started = cpu_by_process(), _idle_s(), time.monotonic()
    try:
        yield
    finally:
        seconds_ = time.monotonic() - started
        used = _cores_by_kind(before, cpu_by_process(), seconds_)
        used["idle"] = round((_idle_s() - idle_before) / seconds_, 3)
        (out / f"{phase}-cpu.json").write_text(
            json.dumps({"seconds": seconds_, "cores_used": used}, indent=1)
        )
        for recorder in recorders:
            try:
                recorder.wait(timeout=60)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait()


def _kind(cmd: str) -> str:
    """A process's kind: a Ray worker's class (its title also names the method it runs now,
    which changes), else its command's first three words."""
    words = cmd.split()
    if words and words[0].startswith("ray::"):
        return words[0].split(".")[0]
    return " ".join(Path(w).name for w in words[:3])[:60]


def _idle_s() -> float:
    """The machine's idle seconds so far, all cores together."""
    return int(Path("/proc/stat").read_text().split("\n", 1)[0].split()[4]) / os.sysconf("SC_CLK_TCK")


def _cores_by_kind(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], seconds: float
) -> dict[str, float]:
    """Cores each kind of process used between two :func:`bench.cpu_split.cpu_by_process`
    readings (a process is matched by pid, so its title may change in between)."""
    used: dict[str, float] = {}
    for pid, (cmd, cpu) in after.items():
        kind = _kind(cmd)
        used[kind] = used.get(kind, 0.0) + (cpu - before.get(pid, (cmd, 0.0))[1]) / seconds
    return {k: round(v, 3) for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v >= 0.005}


def _replicas_up(base: str, replicas: int, timeout_s: float = 180.0) -> None:
    """Wait until every replica reports the named model ``iris`` (HAProxy only sends to
    replicas that are ready, and the router only ranks live ones)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            rows = httpx.get(base + "/v2/repository/index", timeout=5).json()
            if any(r["name"] == "iris" and len(r["replicas"]) >= replicas for r in rows):
                return
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{replicas} replicas of {base} never reported")


def publish_iris(store: Path, work: Path) -> None:
    """The named model every replica loads at start: how the bench sees that all are up."""
    x, y = load_iris(return_X_y=True)
    _publish(Repository(LocalStore(str(store))), work, "iris", LogisticRegression(max_iter=300).fit(x, y))


def _held(base: str) -> dict[str, list[str]]:
    """Per member in the index: the replicas that hold it."""
    rows = httpx.get(base + "/v2/repository/index", timeout=60).json()
    return {
        r["name"]: [x["replica"] for x in r["replicas"]] for r in rows if r.get("set") and r.get("replicas")
    }


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return round(top / bottom, 2) if top and bottom else None


if __name__ == "__main__":
    main()
