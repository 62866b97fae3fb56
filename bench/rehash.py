"""What re-hashing a cached version at every load costs, against the load itself.

``SERVING_CACHE_HASH_ON_LOAD`` (on by default) re-hashes every cached file each time a
version is loaded into a process, so bit rot with the stat put back never reaches a
model. For sklearn models of several sizes (a ``LinearRegression`` over many features:
one float64 coefficient each, so the file is almost all array bytes), published to a local
store and pulled once, this times, warm in the page cache as a swap finds them:

- ``stamp_s``: ``LoaderCache.fetch`` trusting the stat stamp (the old default);
- ``rehash_s``: ``LoaderCache.fetch`` re-hashing every file (the new default);
- ``load_s``: loading the version in this process (``load_predictor``: the restricted
  unpickler and the estimator checks), the cheapest load there is (``isolation: none``);
- ``worker_s``: starting a model worker that loads it (the default, ``isolation: worker``),
  without warm-up.

Each figure is the median of ``--repeats`` runs, alternating. The ratio reported is
``(rehash_s - stamp_s)`` over each load: what the re-hash adds to a load.

Run (nothing else running): ``.venv/bin/python -m bench.rehash``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import joblib
import numpy as np
from sklearn.linear_model import LinearRegression

from serving.cache import LoaderCache
from serving.formats import load_predictor
from serving.formats.base import LoadPolicy
from serving.isolation.worker import WorkerLimits, WorkerPredictor
from serving.manifest import TensorSpec
from serving.publish import publish_path
from serving.repository import Repository
from serving.store.local import LocalStore

MiB = 1024**2


def measure(size_mib: int, repeats: int, work: Path) -> dict[str, float]:
    features = size_mib * MiB // 8
    model = LinearRegression()
    # NOTE: fitted by hand: one float64 coefficient per feature, so the file is the array.
    model.coef_ = np.random.default_rng(0).random(features)
    model.intercept_ = 0.0
    model.n_features_in_ = features
    path = work / f"linear-{size_mib}.joblib"
    joblib.dump(model, path)
    repo = Repository(LocalStore(str(work / f"store-{size_mib}")))
    publish_path(
        repo,
        path,
        "linear",
        version="1",
        format="sklearn",
        inputs=[TensorSpec(name="input-0", datatype="FP64", shape=[-1, features])],
    )
    resolved = repo.resolve("linear:1")
    stamp = LoaderCache(work / f"cache-{size_mib}", hash_on_load=False)
    rehash = LoaderCache(work / f"cache-{size_mib}", hash_on_load=True)
    cached = stamp.fetch(repo, resolved)
    policy = LoadPolicy(max_artifact_bytes=4 * 1024**3)
    limits = WorkerLimits(memory_bytes=4 * 1024**3)
    times: dict[str, list[float]] = {"stamp_s": [], "rehash_s": [], "load_s": [], "worker_s": []}
    for _ in range(repeats):
        for name, run in (
            ("stamp_s", lambda: stamp.fetch(repo, resolved)),
            ("rehash_s", lambda: rehash.fetch(repo, resolved)),
            ("load_s", lambda: load_predictor(cached.path, cached.manifest, policy).close()),
            ("worker_s", lambda: WorkerPredictor(cached, policy, limits, model="linear").close()),
        ):
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    out = {name: statistics.median(values) for name, values in times.items()}
    out["bytes"] = float(path.stat().st_size)
    out["added_over_load"] = (out["rehash_s"] - out["stamp_s"]) / out["load_s"]
    out["added_over_worker_load"] = (out["rehash_s"] - out["stamp_s"]) / out["worker_s"]
    out["rehash_mib_per_s"] = out["bytes"] / MiB / (out["rehash_s"] - out["stamp_s"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,400", help="model sizes in MiB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/rehash.json")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-rehash-") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            results[f"{size} MiB"] = measure(size, args.repeats, Path(tmp))
            r = results[f"{size} MiB"]
            print(
                f"{size:>5} MiB: stamp {r['stamp_s'] * 1e3:8.1f} ms, rehash {r['rehash_s'] * 1e3:8.1f} ms, "
                f"load {r['load_s'] * 1e3:8.1f} ms, worker load {r['worker_s'] * 1e3:8.1f} ms; re-hash adds "
                f"{r['added_over_load']:.2f}x the in-process load, {r['added_over_worker_load']:.2f}x the "
                f"worker's ({r['rehash_mib_per_s']:.0f} MiB/s)"
            )
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
