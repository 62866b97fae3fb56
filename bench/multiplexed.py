"""Many models, one budget: ours against Ray Serve's ``@serve.multiplexed``, on the same traffic.

The setup and traffic of ``bench/density.py`` (its ``publish`` and ``zipf_phase``): ``--small``
small and ``--large`` models of about ``--large-mb`` MB in one local store, all ``production``,
and ``--requests`` 1-row requests from ``--clients`` clients over a Zipf(``--zipf``) law.
Each system gets the same draws, one after the other, on the same machine:

- **ours**: ``serving serve --standalone`` with the models as one model set under a ``--budget``
  memory budget (bytes measured after each load), in ``--shared-workers`` shared model workers;
- **ray-multiplexed**: Ray Serve's documented multiplexing (``bench/baselines/multiplexed_serve.py``),
  an ingress and one downstream replica whose ``@serve.multiplexed`` loader keeps at most
  ``max_num_models_per_replica`` models. Ray bounds the count, not the bytes, so an operator who
  must stay within the same budget sets it to the budget over the largest model's size
  (``--max-models`` overrides it). Ray's own proxy (this app is not our chart's path).

Both start their model processes before the first request: ours its shared workers with
scikit-learn imported (``shared_workers.prestart``; the bench waits for their memory to settle),
Ray its replica before it reports ready. Each system then gets ``--warmup`` unmeasured requests
on other draws, and the measured phase begins with loaded models in both. Memory is sampled from
before the warm-up, so neither side's figure holds its model processes' interpreters (ours'
budget still counts its workers).

Ours runs twice: first on an empty node cache, so a model's first cold load also pulls it (hash
and copy into the verified cache), then again on a node cache that holds every model (pulled
ahead, as on a node that served them before; each load still re-hashes its files). Ray reads
the store's files in place and checks nothing, so the second run is the like-for-like one.

The measured phase is closed-loop: ``--clients`` clients each send their next request when the
last is answered, so the faster system also serves more warm requests beside its cold loads. A
second, paced phase sends ``--paced-requests`` other draws at ``--paced-rate`` requests/s from
``--paced-clients`` clients, the same load for both: it compares the cold tails at equal work.

Reported for each: hit ratio, warm and cold p50 and p99, loads per second, failed requests, and
the peak proportional set size (PSS) of the system's process tree over its idle PSS against
the budget. The ratios: ours over Ray's hit ratio, and Ray's cold p99 over ours (above 1: ours
is ahead on both).

Run on a quiet machine::

    .venv/bin/python -m bench.multiplexed --out bench/results/multiplexed.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.density import Sampler, add_workload_arguments, publish, tree_pss, zipf_phase
from bench.soak import standalone_server, tree
from bench.systems import Processes, start_ray_host
from serving.cache import LoaderCache
from serving.repository import Repository
from serving.server.launch import parse_bytes
from serving.store.local import LocalStore
from serving.testing.poll import wait_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser)
    parser.add_argument(
        "--max-models", type=int, default=0, help="Ray's max_num_models_per_replica (0: sized)"
    )
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured requests first (other draws)")
    parser.add_argument(
        "--paced-rate",
        type=float,
        default=50.0,
        help="requests/s of the paced phase, the same for both (0: no paced phase)",
    )
    parser.add_argument("--paced-clients", type=int, default=16)
    parser.add_argument("--paced-requests", type=int, default=1500)
    parser.add_argument("--out", default="bench/results/multiplexed.json")
    args = parser.parse_args()
    budget = parse_bytes(args.budget)
    with tempfile.TemporaryDirectory(prefix="bench-multiplexed-") as tmp:
        work = Path(tmp)
        names = publish(work / "store", work, args.small, args.large, args.large_mb, args.seed)
        largest = max((work / "store").glob("*/versions/1/*.joblib"), key=lambda p: p.stat().st_size)
        largest_bytes = largest.stat().st_size
        max_models = args.max_models or max(1, budget // largest_bytes)
        config = {
            "models": [{"prefix": "m-", "alias": "production", "isolation": "worker", "workers": "shared"}],
            "pool": {"memory_bytes": budget},
            "shared_workers": {"count": args.shared_workers, "prestart": ["sklearn"]},
        }
        (work / "config.yaml").write_text(yaml.safe_dump(config))

        def run_ours() -> dict[str, Any]:
            with standalone_server(work, ["--config", str(work / "config.yaml")], work / "server.log") as (
                server,
                port,
            ):
                settle(server.pid, 1 + args.shared_workers)
                return measure(server.pid, f"http://127.0.0.1:{port}", names, budget, args)

        ours = run_ours()
        # NOTE: the same again on a node whose cache already holds every model (as one that
        # served them before): a cold load then re-hashes its files but pulls nothing.
        warm_seconds = pull_all(work, names)
        ours_cached = run_ours()
        procs = Processes(work)
        try:
            app = {
                "kind": "multiplexed",
                "route_prefix": "/",
                "args": {"root": str(work / "store"), "max_models": max_models},
            }
            base = start_ray_host(procs, "ray-multiplexed", [app], work, "/ready", b"")
            ray = measure(procs.procs[0][1].pid, base, names, budget, args)
        finally:
            procs.stop_all()
    result = {
        "setup": {
            "small": args.small,
            "large": args.large,
            "large_mb": args.large_mb,
            "budget_bytes": budget,
            "largest_model_bytes": largest_bytes,
            "ray_max_num_models_per_replica": max_models,
            "shared_workers": args.shared_workers,
            "zipf": args.zipf,
            "requests": args.requests,
            "clients": args.clients,
            "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "ours": ours,
        "ours_node_cache_warm": {**ours_cached, "pull_all_seconds": round(warm_seconds, 1)},
        "ray_multiplexed": ray,
        "hit_ratio_ours_over_ray": _ratio(ours["zipf"]["hit_ratio"], ray["zipf"]["hit_ratio"]),
        "cold_p99_ray_over_ours": _ratio(ray["zipf"]["cold_p99_ms"], ours["zipf"]["cold_p99_ms"]),
        "cold_p99_ray_over_ours_node_cache_warm": _ratio(
            ray["zipf"]["cold_p99_ms"], ours_cached["zipf"]["cold_p99_ms"]
        ),
        "paced_cold_p99_ray_over_ours_node_cache_warm": _ratio(
            (ray["paced"] or {}).get("cold_p99_ms"), (ours_cached["paced"] or {}).get("cold_p99_ms")
        ),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def measure(pid: int, url: str, names: list[str], budget: int, args: argparse.Namespace) -> dict[str, Any]:
    idle = tree_pss(pid)
    sampler = Sampler(pid)
    sampler.start()
    try:
        # NOTE: unmeasured first, on other draws; both started their model processes before it.
        # Memory counts from before it: what the models added.
        warm = zipf_phase(
            url, names, argparse.Namespace(**{**vars(args), "requests": args.warmup, "seed": args.seed + 100})
        )
        zipf = zipf_phase(url, names, args)
        paced = (
            zipf_phase(
                url,
                names,
                argparse.Namespace(
                    **{
                        **vars(args),
                        "requests": args.paced_requests,
                        "clients": args.paced_clients,
                        "rate": args.paced_rate,
                        "seed": args.seed + 200,
                    }
                ),
            )
            if args.paced_rate > 0
            else None
        )
    finally:
        sampler.stop.set()
        sampler.join()
    return {
        "warmup_statuses": warm["statuses"],
        "zipf": zipf,
        "paced": paced,
        "memory": {
            "idle_tree_pss_bytes": idle,
            "peak_tree_pss_bytes": sampler.peak,
            "peak_members_bytes": sampler.peak - idle,
            "peak_over_budget": (sampler.peak - idle) / budget,
        },
    }


def pull_all(work: Path, names: list[str]) -> float:
    """Pull every model's ``production`` version into the server's node cache (``work/cache``),
    as ``serving pull`` does; the seconds it took."""
    started = time.monotonic()
    repo = Repository(LocalStore(str(work / "store")))
    cache = LoaderCache(work / "cache")
    for name in names:
        cache.fetch(repo, repo.resolve(f"{name}@production"), prefetch=True)
    return time.monotonic() - started


def settle(pid: int, processes: int, timeout_s: float = 60.0) -> None:
    """Wait until ``pid``'s tree has ``processes`` processes and its PSS stopped growing (the
    shared workers started ahead have imported their frameworks)."""
    last = [-1]

    def settled() -> bool:
        now, before = tree_pss(pid), last[0]
        last[0] = now
        return len(tree(pid)) >= processes and abs(now - before) < 0.01 * now

    wait_for(settled, timeout=timeout_s, interval=1.0, what=f"the server's {processes} processes to settle")


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return round(top / bottom, 2) if top is not None and bottom else None


if __name__ == "__main__":
    main()
