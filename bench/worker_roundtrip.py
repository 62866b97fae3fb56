"""Where a model worker's 1-row cost goes: one call in process against one through the worker.

The seed's iris LogisticRegression is published to a local store and loaded twice: in
this process (``load_predictor``) and in a model worker (``WorkerPredictor``). Each is
called ``--calls`` times in turn (after 200 warm-up calls), twice, alternating; the
figures are microseconds per call of wall time and of this process's CPU. The worker's
own work is timed in this process too (``_predict`` over a memory file, as the worker
runs it), so what remains of the wall time is the two processes waking each other.

Run (nothing else running): ``.venv/bin/python -m bench.worker_roundtrip``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import joblib
import numpy as np
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from serving.cache import LoaderCache
from serving.formats import load_predictor
from serving.formats.base import LoadPolicy
from serving.isolation.shm import Arena, pack
from serving.isolation.worker import WorkerLimits, WorkerPredictor, _predict
from serving.publish import publish_path
from serving.repository import Repository
from serving.store.local import LocalStore

ROW = [[5.1, 3.5, 1.4, 0.2]]


def per_call(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    for _ in range(200):
        fn()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - wall) / calls * 1e6, (time.process_time() - cpu) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="worker-roundtrip-"))
    x, y = load_iris(return_X_y=True)
    joblib.dump(LogisticRegression(max_iter=300).fit(x, y), work / "iris.joblib")
    repo = Repository(LocalStore(str(work / "store")))
    publish_path(repo, work / "iris.joblib", "iris", version="1", format="sklearn", example=ROW)
    cached = LoaderCache(work / "cache", max_bytes=10**9).fetch(repo, repo.resolve("iris:1"))
    local = load_predictor(cached.path, cached.manifest, LoadPolicy())
    worker = WorkerPredictor(cached, LoadPolicy(), WorkerLimits(), model="iris")
    row = {local.inputs[0].name: np.array(ROW)}
    arena_in, arena_out = Arena("bench-in"), Arena("bench-out")
    headers, _ = pack(row, arena_in)
    view = mmap.mmap(arena_in.fd, arena_in.size, prot=mmap.PROT_READ)
    request = {"inputs": headers, "seconds": 30, "limit": 10**8, "names": None}
    results: dict[str, list[tuple[float, float]]] = {"in_process": [], "worker": [], "worker_side": []}
    try:
        for _ in range(2):
            results["in_process"].append(per_call(lambda: local.predict(row), args.calls))
            results["worker"].append(per_call(lambda: worker.predict(row), args.calls))
            side = per_call(lambda: _predict(local, request, view, arena_out), args.calls)
            results["worker_side"].append(side)
    finally:
        worker.close()
    report = {k: [{"wall_us": round(w), "cpu_us": round(c)} for w, c in v] for k, v in results.items()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
