"""Cost of isolating a version's first load: swap time with and without the probe child.

The two ~100 MB models of ``bench/cache_load.py`` (an sklearn LinearRegression
in joblib, a torch ``nn.Linear(5000, 5000)`` state dict) are published to a
local store and pulled into a ``LoaderCache`` once. Then, in alternating
rounds, ``ModelSlot.swap_to`` swaps to the version again in two slots:

- ``in_process``: no prober, the serving process loads directly (as before);
- ``isolated``: a :class:`serving.isolation.prober.Prober` with nothing remembered,
  so every swap pays the probe child's load as a version's first swap on a
  node does (helper already started, as it is after the first swap);
- ``remembered``: the same, with the node's pass remembered (what a replica
  restart or a second replica on the node pays).

A new version's first swap on a node is also its first pull, so the
``first_swap_*`` variants swap into an empty cache each round (copy from the
local store + sha256 of every byte + load), in process and isolated.

Ratios are medians over medians of ``in_process``. Run:
``.venv/bin/python -m bench.isolation`` (writes bench/results/isolation.json).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cache_load import LINEAR, make_sklearn, make_torch

ROUNDS = 9
RESULTS = Path(__file__).parent / "results" / "isolation.json"


def run_case(case: str, repo: Any, cache: Any, ref: str, work: Path) -> dict[str, Any]:
    import shutil

    from serving.cache import LoaderCache
    from serving.formats.base import LoadPolicy
    from serving.isolation.prober import IsolationLimits, Prober
    from serving.runtime.slot import ModelSlot

    resolved = repo.resolve(ref)
    cache.fetch(repo, resolved)
    limits = IsolationLimits()
    fresh = Prober(limits, mode="always")
    memo = Prober(limits, mode="always", memo_dir=work / f"memo-{case}")
    slots = {
        "in_process": ModelSlot(resolved.name, repo, cache, LoadPolicy()),
        "isolated": ModelSlot(resolved.name, repo, cache, LoadPolicy(), prober=fresh),
        "remembered": ModelSlot(resolved.name, repo, cache, LoadPolicy(), prober=memo),
    }
    try:

        def swap(name: str) -> float:
            gc.collect()
            started = time.perf_counter()
            slots[name].swap_to(resolved, reason="bench")
            return time.perf_counter() - started

        def first_swap(name: str, prober: Prober | None, i: int) -> float:
            root = work / f"cold-{case}-{name}-{i}"
            slot = ModelSlot(resolved.name, repo, LoaderCache(root), LoadPolicy(), prober=prober)
            gc.collect()
            started = time.perf_counter()
            slot.swap_to(resolved, reason="bench")
            elapsed = time.perf_counter() - started
            live = slot.live
            assert live is not None
            live.retire()  # NOTE: not slot.close(), which would also stop the shared helper
            shutil.rmtree(root)
            return elapsed

        for name in slots:  # start the helpers, warm imports and the page cache
            swap(name)
        times: dict[str, list[float]] = {
            k: [] for k in (*slots, "first_swap_in_process", "first_swap_isolated")
        }
        names = list(slots)
        for i in range(ROUNDS):
            for name in names if i % 2 == 0 else names[::-1]:
                times[name].append(swap(name))
            cold = [("first_swap_in_process", None), ("first_swap_isolated", fresh)]
            for name, prober in cold if i % 2 == 0 else cold[::-1]:
                times[name].append(first_swap(name, prober, i))
    finally:
        for slot in slots.values():
            slot.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "case": case,
        "bytes": resolved.manifest.total_bytes,
        "median_seconds": med,
        "all_seconds": times,
        "ratio_isolated_over_in_process": med["isolated"] / med["in_process"],
        "ratio_remembered_over_in_process": med["remembered"] / med["in_process"],
        "ratio_first_swap_isolated_over_in_process": med["first_swap_isolated"]
        / med["first_swap_in_process"],
        "probe_overhead_seconds": med["isolated"] - med["in_process"],
    }


def main() -> dict[str, Any]:
    import torch

    from serving.cache import LoaderCache
    from serving.publish import publish_path
    from serving.repository import Repository
    from serving.store.local import LocalStore

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        repo = Repository(LocalStore(str(work / "store")))
        cache = LoaderCache(work / "cache", max_bytes=2 * 1024**3)
        (work / "sk").mkdir()
        make_sklearn(work / "sk" / "model.joblib")
        publish_path(repo, work / "sk" / "model.joblib", "sk", version="1", format="sklearn")
        (work / "pt").mkdir()
        make_torch(work / "pt" / "model.pt")
        publish_path(
            repo,
            work / "pt" / "model.pt",
            "pt",
            version="1",
            format="torch-state-dict",
            options={"class_path": "torch.nn:Linear", "init_kwargs": LINEAR},
        )
        rows = [
            run_case("sklearn joblib", repo, cache, "sk:1", work),
            run_case("torch state_dict", repo, cache, "pt:1", work),
        ]
    result = {
        "what": "ModelSlot.swap_to of a cached ~100 MB version: isolated first load vs in-process load",
        "rounds": ROUNDS,
        "statistic": "median of alternating rounds, after one warm-up swap of each variant",
        "store": "local folder; the version is already in the cache (a cache hit)",
        "notes": [
            "isolated = probe child (fork of the warm helper, rlimits, load) + the same in-process load",
            "no manifest example, so warm-up is a no-op in both paths",
            "first_swap_*: an empty cache each round, so the swap also copies and hashes 100 MB from a "
            "local folder store; from S3 the download is slower and the ratio closer to 1",
            "files are in the page cache; on a cold disk the child's read warms it for the parent",
            "2 cores shared with other work: see all_seconds for the spread",
        ],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def print_table(result: dict[str, Any]) -> None:
    head = (
        f"{'case':18} {'MB':>5} {'in-process s':>12} {'isolated s':>10} {'ratio':>6} {'remembered':>10}"
        f" {'first swap s':>12} {'isolated':>8} {'ratio':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        m = r["median_seconds"]
        print(
            f"{r['case']:18} {r['bytes'] / 1e6:5.0f} {m['in_process']:12.3f} {m['isolated']:10.3f} "
            f"{r['ratio_isolated_over_in_process']:6.2f} {r['ratio_remembered_over_in_process']:10.2f}"
            f" {m['first_swap_in_process']:12.3f} {m['first_swap_isolated']:8.3f}"
            f" {r['ratio_first_swap_isolated_over_in_process']:6.2f}"
        )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    print_table(main())
