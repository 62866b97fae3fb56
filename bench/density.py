"""Many models, one memory budget: a model set on a real standalone server, under Zipf traffic.

Setup: ``--small`` small scikit-learn models (LogisticRegression on iris, each with its own
bytes) and ``--large`` models of about ``--large-mb`` MB (a KNeighborsClassifier over that
many bytes of training rows), published to a local store, all with alias ``production``.
A real ``serving serve --standalone`` serves them as one model set (``m-*@production``)
with ``--budget`` of memory for the members, at the isolation given (``worker``, the
default, or ``auto``/``none``: in the serving process) and, for workers, ``--workers``:
``dedicated`` (a worker per member) or ``shared`` (``--shared-workers`` workers hold them all).

Traffic: ``--clients`` keep-alive clients send 1-row requests, each for a model drawn
from a Zipf(``--zipf``) law over the models (rank 1 is the hottest; the large models are
spread over the ranks), until ``--requests`` replies. A cold request says so in the
response (``parameters.load_wait_ms``), so warm and cold latencies are split exactly.

A sampler reads, twice a second, the proportional set size (PSS) of the server and
every process under it (the model workers). Reported: hit ratio, p50 and p99 of warm and
cold requests, loads per second, failed requests, and the peak PSS of the tree over its
idle PSS (the members' memory) against the budget.

Then the hot set: ``--clients`` clients send requests for the ``--hot`` hottest models as fast
as they are answered, for ``--seconds``: alone, before and after the phases below (their
throughput without churn is the mean of the two), then beside cold requests for models that
are not loaded when the phase starts (the budget is full by then, so each load evicts; each
phase reports ``evictions``), in an order that repeats none for a long while:
- at fixed rates: the loads per second that the Zipf phase caused, then each of
  ``--churn-rates``; sent on schedule whether or not the earlier ones were answered
  (``late_sends``: sent over 100 ms late). Reported for each: the ratio of the hot set's
  throughput to its throughput alone (the issue's bar: at least 0.8; ``ratio`` is the one at
  the Zipf phase's rate);
- from two more clients, each sending its next request when its last is answered. The
  faster loads are, the more of them these clients make, so on a machine with few cores
  this measures how the CPU is shared as much as how loads disturb the hot set.
  Reported as ``unbounded_ratio``.
Only answers within the window are counted.

Run on a quiet machine (nothing else running)::

    .venv/bin/python -m bench.density                          # 1,000 + 50 models, 1 GiB, workers
    .venv/bin/python -m bench.density --isolation auto --out bench/results/density-auto.json
    .venv/bin/python -m bench.density --workers shared --out bench/results/density-shared.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import yaml
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from bench.soak import standalone_server, tree
from serving.manifest import TensorSpec
from serving.publish import publish_path
from serving.repository import Repository, SetTarget
from serving.runtime.memory import pss_bytes
from serving.server.launch import parse_bytes
from serving.store.local import LocalStore

ROW = [5.1, 3.5, 1.4, 0.2]
INPUTS = [TensorSpec(name="input-0", datatype="FP64", shape=[-1, 4])]


def publish(store: Path, work: Path, small: int, large: int, large_mb: float, seed: int) -> list[str]:
    """Publish the models; returns their names, hottest rank first (large ones spread out)."""
    repo = Repository(LocalStore(str(store)))
    rng = np.random.default_rng(seed)
    x, y = load_iris(return_X_y=True)
    base = LogisticRegression(max_iter=300).fit(x, y)
    names: list[str] = []
    for i in range(small):
        model = copy.deepcopy(base)
        model.coef_ = model.coef_ + rng.normal(0, 1e-3, model.coef_.shape)  # NOTE: own bytes each
        names.append(_publish(repo, work, f"m-s{i}", model))
    rows = max(1, int(large_mb * 1e6 / 40))  # NOTE: 4 float64 features + an int64 label per row
    for i in range(large):
        data = rng.normal(size=(rows, 4))
        model = KNeighborsClassifier(n_neighbors=3).fit(data, rng.integers(0, 3, rows))
        names.append(_publish(repo, work, f"m-l{i}", model))
    order = rng.permutation(len(names))
    return [names[i] for i in order]


def _publish(repo: Repository, work: Path, name: str, model: Any) -> str:
    path = work / f"{name}.joblib"
    joblib.dump(model, path)
    publish_path(repo, path, name, version="1", format="sklearn", inputs=INPUTS, example=[ROW])
    repo.move_alias(name, "production", SetTarget("1"))
    path.unlink()
    return name


def zipf_draws(count: int, models: int, exponent: float, seed: int) -> list[int]:
    weights = 1.0 / np.arange(1, models + 1) ** exponent
    return list(np.random.default_rng(seed + 1).choice(models, size=count, p=weights / weights.sum()))


def tree_pss(pid: int) -> int:
    return sum(pss_bytes(p) for p in tree(pid))


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.samples = pid, 0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.peak = max(self.peak, tree_pss(self.pid))
            self.samples += 1


def send(client: httpx.Client, url: str, name: str) -> tuple[int, float, float | None]:
    body = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [ROW]}]}
    body["outputs"] = [{"name": "predict"}]
    started = time.perf_counter()
    try:
        reply = client.post(f"{url}/v2/models/{name}/infer", json=body)
    except httpx.HTTPError:
        return 0, time.perf_counter() - started, None
    elapsed = time.perf_counter() - started
    if reply.status_code != 200:
        return reply.status_code, elapsed, None
    return 200, elapsed, reply.json().get("parameters", {}).get("load_wait_ms")


def zipf_phase(url: str, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """``args.requests`` requests over the Zipf draws from ``args.clients`` clients, each sending
    its next as soon as its last is answered; with ``args.rate`` (requests/s, 0: none) the i-th
    is not sent before ``i / rate`` s, so systems of different speeds face the same load."""
    draws = zipf_draws(args.requests, len(names), args.zipf, args.seed)
    rate = float(getattr(args, "rate", 0.0) or 0.0)
    lock = threading.Lock()
    results: list[tuple[int, float, float | None]] = []
    position = [0]

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while True:
                with lock:
                    if position[0] >= len(draws):
                        return
                    index = position[0]
                    rank = draws[index]
                    position[0] += 1
                if rate > 0:
                    time.sleep(max(0.0, started + index / rate - time.perf_counter()))
                outcome = send(http, url, names[rank])
                with lock:
                    results.append(outcome)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    ok = [r for r in results if r[0] == 200]
    warm = sorted(r[1] for r in ok if r[2] is None)
    cold = sorted(r[1] for r in ok if r[2] is not None)
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r[0])] = statuses.get(str(r[0]), 0) + 1
    return {
        "requests": len(results),
        "statuses": statuses,
        "failed": len(results) - len(ok),
        "hit_ratio": len(warm) / len(ok) if ok else 0.0,
        "warm_p50_ms": _pct(warm, 50),
        "warm_p99_ms": _pct(warm, 99),
        "cold_p50_ms": _pct(cold, 50),
        "cold_p99_ms": _pct(cold, 99),
        "loads_per_s": len(cold) / elapsed,
        "seconds": elapsed,
        "distinct_models_requested": len(set(draws)),
    }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(1000 * values[min(len(values) - 1, int(len(values) * q / 100))], 2)


def loaded_members(url: str) -> set[str]:
    index = httpx.get(f"{url}/v2/repository/index", timeout=30).json()
    return {r["name"] for r in index if r.get("set") and r.get("replicas")}


def hot_phase(
    url: str, names: list[str], args: argparse.Namespace, log: Path, churn: str | None, rate: float = 0.0
) -> dict[str, Any]:
    """The hot set's throughput for ``--seconds``, with no churn (``None``), with ``rate`` cold
    requests a second (``"rate"``), or with two clients that request cold models as fast as
    they are answered (``"unbounded"``). Cold requests go to models not loaded when the phase
    starts, in an order that repeats none for a long while; the budget is full by then, so
    each load evicts (``evictions`` counts the pool's unloads in the phase)."""
    hot = names[: args.hot]
    stop = threading.Event()
    counts = {"hot": 0, "hot_failed": 0, "churn": 0, "churn_cold": 0, "churn_failed": 0, "late_sends": 0}
    lock = threading.Lock()
    local = threading.local()

    def hot_client(i: int) -> None:
        rng = np.random.default_rng(args.seed + 10 + i)
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                status, _, _ = send(http, url, hot[int(rng.integers(len(hot)))])
                with lock:
                    if not stop.is_set():
                        counts["hot" if status == 200 else "hot_failed"] += 1

    # NOTE: the hot set loaded before the clock starts, in every phase.
    with httpx.Client(timeout=120) as http:
        for name in hot:
            send(http, url, name)
    loaded = loaded_members(url)
    cold = [n for n in names[args.hot :] if n not in loaded]
    order = [cold[i] for i in np.random.default_rng(args.seed + 100).permutation(len(cold))]
    position = [0]

    def one_cold(scheduled: float | None = None) -> None:
        if scheduled is not None and time.monotonic() - scheduled > 0.1:
            with lock:
                counts["late_sends"] += 1
        if not hasattr(local, "http"):
            local.http = httpx.Client(timeout=120)
        with lock:
            name = order[position[0] % len(order)]
            position[0] += 1
        status, _, waited = send(local.http, url, name)
        with lock:
            if not stop.is_set():  # NOTE: answers after the window are not counted
                counts["churn"] += 1
                counts["churn_cold"] += waited is not None
                counts["churn_failed"] += status != 200

    def churn_client() -> None:
        while not stop.is_set():
            one_cold()

    def churn_at_rate(pool: ThreadPoolExecutor) -> None:
        started = time.monotonic()
        for k in itertools.count():
            scheduled = started + k / rate
            # NOTE: an open-loop schedule (request k at k / rate), not a wait for a condition.
            if stop.wait(max(0.0, scheduled - time.monotonic())):
                return
            pool.submit(one_cold, scheduled)

    unloads_before = _unloads(log)
    threads = [threading.Thread(target=hot_client, args=(i,)) for i in range(args.clients)]
    # NOTE: enough threads that a slow answer does not hold back the next send (late_sends says).
    pool = ThreadPoolExecutor(max_workers=max(32, int(rate * 5)))
    if churn == "unbounded":
        threads += [threading.Thread(target=churn_client) for _ in range(2)]
    elif churn == "rate":
        threads.append(threading.Thread(target=churn_at_rate, args=(pool,)))
    for t in threads:
        t.start()
    time.sleep(args.seconds)  # NOTE: the measurement window itself, not a wait for a condition
    with lock:
        stop.set()
    evictions = _unloads(log) - unloads_before
    for t in threads:
        t.join()
    pool.shutdown(wait=True)
    return {
        **counts,
        "evictions": evictions,
        "cold_models_at_start": len(cold),
        "hot_per_s": counts["hot"] / args.seconds,
        "churn_cold_per_s": counts["churn_cold"] / args.seconds,
    }


def _unloads(log: Path) -> int:
    return log.read_text(errors="replace").count('"event": "pool_unload"')


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The models, budget and Zipf traffic: the same options and defaults here and in
    ``bench/multiplexed.py``, which runs this workload on Ray Serve's multiplexing too."""
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=50)
    parser.add_argument("--large-mb", type=float, default=20.0)
    parser.add_argument("--budget", default="1GiB")
    parser.add_argument("--shared-workers", type=int, default=2)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser)
    parser.add_argument("--isolation", default="worker", choices=("worker", "auto", "none"))
    parser.add_argument(
        "--workers",
        default="dedicated",
        choices=("dedicated", "shared"),
        help="with --isolation worker: a worker per member, or --shared-workers workers for all",
    )
    parser.add_argument("--hot", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--churn-rates",
        default="5,10",
        help="more rates of cold requests per second beside the hot set (after the Zipf phase's loads/s)",
    )
    parser.add_argument("--max-concurrent-loads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/density.json")
    args = parser.parse_args()
    budget = parse_bytes(args.budget)
    with tempfile.TemporaryDirectory(prefix="bench-density-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        names = publish(work / "store", work, args.small, args.large, args.large_mb, args.seed)
        print(f"published {len(names)} models in {time.perf_counter() - started:.0f} s", flush=True)
        member = {"prefix": "m-", "alias": "production", "isolation": args.isolation, "workers": args.workers}
        config = {
            "models": [member],
            "pool": {"memory_bytes": budget, "max_concurrent_loads": args.max_concurrent_loads},
            "shared_workers": {"count": args.shared_workers},
        }
        (work / "config.yaml").write_text(yaml.safe_dump(config))
        with standalone_server(work, ["--config", str(work / "config.yaml")], work / "server.log") as running:
            result = run(*running, names, budget, args, work / "server.log")
        result["server_log_tail"] = (work / "server.log").read_text(errors="replace").splitlines()[-5:]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "server_log_tail"}, indent=2))


def run(
    server: subprocess.Popen[bytes],
    port: int,
    names: list[str],
    budget: int,
    args: argparse.Namespace,
    log: Path,
) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}"
    idle = tree_pss(server.pid)
    sampler = Sampler(server.pid)
    sampler.start()
    zipf = zipf_phase(url, names, args)
    sampler.stop.set()
    sampler.join()
    before = hot_phase(url, names, args, log, churn=None)
    rates = [zipf["loads_per_s"], *(float(r) for r in args.churn_rates.split(",") if r)]
    phases = [(rate, hot_phase(url, names, args, log, churn="rate", rate=rate)) for rate in rates if rate > 0]
    unbounded = hot_phase(url, names, args, log, churn="unbounded")
    after = hot_phase(url, names, args, log, churn=None)
    # NOTE: alone before and after the churn phases, in the same state (the budget full).
    alone = (before["hot_per_s"] + after["hot_per_s"]) / 2
    quiet = {"before": before, "after": after, "hot_per_s": alone}
    churned = [
        {"churn_rate_per_s": rate, **phase, "ratio": phase["hot_per_s"] / alone if alone else None}
        for rate, phase in phases
    ]
    members = httpx.get(f"{url}/v2/repository/index", timeout=30).json()
    sizes = sorted(
        r["replicas"][0].get("memory_bytes", 0) for r in members if r.get("set") and r.get("replicas")
    )
    return {
        "setup": {
            "small": args.small,
            "large": args.large,
            "large_mb": args.large_mb,
            "budget_bytes": budget,
            "isolation": args.isolation,
            "workers": args.workers,
            "shared_workers": args.shared_workers if args.workers == "shared" else None,
            "zipf": args.zipf,
            "clients": args.clients,
            "cpus": os.cpu_count(),
        },
        "zipf": zipf,
        "memory": {
            "idle_tree_pss_bytes": idle,
            "peak_tree_pss_bytes": sampler.peak,
            "peak_members_bytes": sampler.peak - idle,
            "peak_over_budget": (sampler.peak - idle) / budget,
            "samples": sampler.samples,
            "member_bytes_median": statistics.median(sizes) if sizes else None,
            "members_loaded_at_end": len(sizes),
        },
        "hot_set": {
            "models": args.hot,
            "without_churn": quiet,
            "with_churn": churned,
            "ratio": churned[0]["ratio"] if churned else None,
            "with_unbounded_churn": unbounded,
            "unbounded_ratio": unbounded["hot_per_s"] / quiet["hot_per_s"] if quiet["hot_per_s"] else None,
        },
    }


if __name__ == "__main__":
    main()
