"""What starting a model worker costs: forked from the zygote (the default) against a new
interpreter (``SERVING_WORKER_START=spawn``).

For the iris ``LogisticRegression``, published to a local store and pulled once, this starts
``--workers`` model workers one after another with each start mode (alternating), and reports:

- ``start_s``: the median wall time of one start (``WorkerPredictor``: start the process, load
  the version, warm it up), the first fork (which starts the zygote) left out and reported
  apart as ``first_start_s``;
- ``cpu_s``: the CPU time the starts cost every process (this one, its children, the zygote),
  over the workers started (from ``/proc``: user + system of each process, while it lives);
- ``restart_s``: the median time from a ``kill -9`` of a worker to its next answer;
- ``pss_bytes``: the proportional set size of the ``--workers`` workers together, plus the
  zygote's (what a model set's memory budget counts).

Run (nothing else running): ``.venv/bin/python -m bench.worker_start``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import joblib
import numpy as np
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from serving.cache import LoaderCache
from serving.errors import WorkerFailed
from serving.formats.base import LoadPolicy
from serving.isolation.worker import WorkerLimits, WorkerPredictor
from serving.isolation.zygote import close_zygotes, zygote_pids
from serving.publish import publish_path
from serving.repository import Repository
from serving.runtime.memory import pss_bytes
from serving.store.local import LocalStore
from serving.testing.poll import wait_for

ROWS = np.array([[5.1, 3.5, 1.4, 0.2]])


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def run_mode(cached, start: str, workers: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    limits = dataclasses.replace(WorkerLimits(restart_backoff_s=0.05), start=start)  # type: ignore[arg-type]
    close_zygotes()
    started: list[WorkerPredictor] = []
    times: list[float] = []
    cpu_before = _own_cpu_s()
    worker_cpu = 0.0
    try:
        for _ in range(workers + 1):
            t0 = time.perf_counter()
            started.append(WorkerPredictor(cached, LoadPolicy(), limits, model="bench"))
            times.append(time.perf_counter() - t0)
        zygotes = zygote_pids() if start == "fork" else []
        pids = [w.pid for w in started[1:] if w.pid is not None]
        pss = sum(pss_bytes(pid) for pid in pids) + sum(pss_bytes(pid) for pid in zygotes)
        worker_cpu = sum(_cpu_s(pid) for pid in [*pids, *zygotes])
        cpu = _own_cpu_s() - cpu_before + worker_cpu
        name = started[0].inputs[0].name
        restarts = []
        for worker in started[1:6]:
            first = worker.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            killed = time.perf_counter()

            def serving(w: WorkerPredictor = worker, gone: int = first) -> bool:
                try:
                    return w.pid not in (None, gone) and len(w.predict({name: ROWS})) > 0
                except WorkerFailed:
                    return False

            wait_for(serving, timeout=60, interval=0.005, what="the worker back")
            restarts.append(time.perf_counter() - killed)
    finally:
        for worker in started:
            worker.close()
    return {
        "first_start_s": times[0],
        "start_s": statistics.median(times[1:]),
        "cpu_s": cpu / (workers + 1),
        "restart_s": statistics.median(restarts),
        "pss_bytes": pss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/worker_start.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        x, y = load_iris(return_X_y=True)
        joblib.dump(LogisticRegression(max_iter=300).fit(x, y), root / "iris.joblib")
        repo = Repository(LocalStore(str(root / "store")))
        publish_path(repo, root / "iris.joblib", "iris", version="1", format="sklearn", example=ROWS.tolist())
        cached = LoaderCache(root / "cache", max_bytes=10**10).fetch(repo, repo.resolve("iris:1"))
        rounds: dict[str, list[dict[str, float]]] = {"fork": [], "spawn": []}
        for i in range(args.rounds):
            for start in ("fork", "spawn") if i % 2 == 0 else ("spawn", "fork"):
                rounds[start].append(run_mode(cached, start, args.workers))
                print(start, json.dumps(rounds[start][-1]), flush=True)
        close_zygotes()
    result = {
        start: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for start, runs in rounds.items()
    }
    result["fork_over_spawn"] = {key: result["fork"][key] / result["spawn"][key] for key in result["fork"]}
    result["setup"] = {"workers": args.workers, "rounds": args.rounds, "cpus": os.cpu_count()}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
