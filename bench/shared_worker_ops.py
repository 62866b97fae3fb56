"""What joining and leaving a shared model worker costs, and what a cold load costs in CPU.

Two measurements, each on a quiet machine (nothing else running):

- ``ops``: ``--versions`` scikit-learn versions (iris LogisticRegressions, each its own
  bytes) join one shared worker (:class:`serving.isolation.worker.WorkerPool` of one),
  then one of them answers ``--requests`` 1-row requests, then ``--leave`` of them leave.
  Reported: the median time of a join (its load), of a request, and of a leave (its
  unload and the worker's garbage collection), in ms. A leave holds the worker's lock, so
  it is what every other version in that worker waits for at an eviction.
- ``cold``: a real ``serving serve --standalone`` serving ``--versions`` such models as a
  model set in 2 shared workers; each is requested once, one after another, for
  ``--seconds``. Reported: the CPU time of the server and its workers per cold load (a
  pull into the cache, the alias check, the load, its first answer), in ms.

::

    .venv/bin/python -m bench.shared_worker_ops ops --versions 300
    .venv/bin/python -m bench.shared_worker_ops cold --versions 600
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import joblib
import numpy as np
import yaml
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from bench.density import publish, send
from bench.soak import standalone_server, tree
from serving.cache import LoaderCache
from serving.formats.base import LoadPolicy
from serving.isolation.worker import WorkerLimits, WorkerPool, WorkerPredictor
from serving.publish import publish_path
from serving.repository import Repository
from serving.store.local import LocalStore

LIMITS = WorkerLimits(memory_bytes=1536 * 1024**2, predict_timeout_s=20.0)


def ops(args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-shared-ops-") as tmp:
        work = Path(tmp)
        repo = Repository(LocalStore(str(work / "store")))
        cache = LoaderCache(work / "cache", max_bytes=10**10)
        x, y = load_iris(return_X_y=True)
        base = LogisticRegression(max_iter=300).fit(x, y)
        rng = np.random.default_rng(0)
        cached = []
        for i in range(args.versions):
            model = copy.deepcopy(base)
            model.coef_ = model.coef_ + rng.normal(0, 1e-3, model.coef_.shape)
            path = work / f"m{i}.joblib"
            joblib.dump(model, path)
            publish_path(repo, path, f"m{i}", version="1", format="sklearn", example=x[:1].tolist())
            cached.append(cache.fetch(repo, repo.resolve(f"m{i}:1")))
        pool = WorkerPool(1, LIMITS, memory_bytes=3 * 1024**3)
        joined, joins = [], []
        try:
            for version in cached:
                started = time.perf_counter()
                joined.append(WorkerPredictor(version, LoadPolicy(), LIMITS, model="m", pool=pool))
                joins.append(time.perf_counter() - started)
            first = joined[0]
            requests = []
            for _ in range(args.requests):
                started = time.perf_counter()
                first.predict({first.inputs[0].name: x[:1]})
                requests.append(time.perf_counter() - started)
            leaves = []
            for version in joined[-args.leave :]:
                started = time.perf_counter()
                version.close()
                leaves.append(time.perf_counter() - started)
        finally:
            for version in joined:
                version.close()
        # NOTE: the first join starts the worker and imports scikit-learn; it is left out.
        return {
            "versions": args.versions,
            "join_ms_p50": 1000 * statistics.median(joins[1:]),
            "request_ms_p50": 1000 * statistics.median(requests),
            "leave_ms_p50": 1000 * statistics.median(leaves),
        }


def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def cold(args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-shared-cold-") as tmp:
        work = Path(tmp)
        names = publish(work / "store", work, args.versions, 0, 0.0, 0)
        member = {"prefix": "m-", "alias": "production", "isolation": "worker", "workers": "shared"}
        config = {"models": [member], "pool": {"memory_bytes": 2**30}, "shared_workers": {"count": 2}}
        (work / "config.yaml").write_text(yaml.safe_dump(config))
        with standalone_server(work, ["--config", str(work / "config.yaml")], work / "server.log") as running:
            server, port = running
            url = f"http://127.0.0.1:{port}"
            with httpx.Client(timeout=60) as http:
                # NOTE: the workers started and scikit-learn imported before the clock starts.
                for name in names[:20]:
                    send(http, url, name)
                pids = tree(server.pid)
                cpu, started, loads = _cpu_s(pids), time.perf_counter(), 0
                for name in names[20:]:
                    _, _, waited = send(http, url, name)
                    loads += waited is not None
                    if time.perf_counter() - started > args.seconds:
                        break
                elapsed = time.perf_counter() - started
                spent = _cpu_s(tree(server.pid)) - cpu
        return {
            "versions": args.versions,
            "cold_loads": loads,
            "cpu_ms_per_cold_load": 1000 * spent / max(1, loads),
            "wall_ms_per_cold_load": 1000 * elapsed / max(1, loads),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("ops", "cold"))
    parser.add_argument("--versions", type=int, default=300)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--leave", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    print(json.dumps(ops(args) if args.what == "ops" else cold(args), indent=2))


if __name__ == "__main__":
    main()
