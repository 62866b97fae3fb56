"""``make bench``: every workload against every peer, side by side in one run.

Systems (all on 127.0.0.1; one group of them up at a time, see ``GROUPS``):

- ``ours``: ``serving serve``, the default Ray path as the chart deploys it: Ray Serve
  behind HAProxy (direct ingress), single-hop replicas (routes and models in one),
  replicas reporting to the autoscaler (serving.server.launch.FAST_PATH_ENV), replicas and
  autoscaling from the chart's ``serve.ingress`` values, measured once the autoscaler
  has settled under 16 clients;
- ``ours-2hop``: the same app with ``layout: two-hop`` behind Ray's Python proxy, as it
  ran before (proxy -> Ingress -> model replica), on the peers' Ray instance;
- ``naive-serve``: the seed-style Ray Serve deployment (bench/baselines/naive_serve.py);
- ``mlserver``: Seldon MLServer with its sklearn runtime, from PyPI in bench/.venvs/mlserver;
- ``starlette``: a bare Starlette + uvicorn app calling predict (the Python HTTP ceiling);
- ``serve-noop``: a Ray Serve deployment that answers a constant (the engine's ceiling);
- ``ours-standalone``: this project's models in one uvicorn process without Ray
  (``serving serve --standalone``, serving.server.standalone);
- ``ours-inproc`` and ``ours-standalone-inproc``: the same two with model workers off
  (``isolation: none``), so the report shows what predicting in a worker costs;
- ``ours-x1`` and ``ours-x2``: the chart's Ray path at a fixed 1 and 2 replicas, against
  ``kserve``, ``litserve``, ``bentoml``, ``pytriton`` (bench/peers.py, each in its own venv)
  and ``mlserver`` at 1 process and ``NAME-x2`` at 2 (each peer's own scaling knob): the
  equal-CPU table of the report.

Each round starts one group of systems, runs every workload on it and stops it
before the next group starts, so nothing idle (a second Ray instance, MLServer's
workers) takes CPU from what is measured; the order flips every round, and each
(workload, system) is the median of its rounds. Writes bench/results/latest.json, latest.md and PNG plots.

Run: ``.venv/bin/python -m bench.run [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from bench import load, peers, report
from bench.codec import rest_infer
from bench.systems import (
    ROOT,
    Processes,
    System,
    install_mlserver,
    start_mlserver,
    start_ray_host,
    start_serve,
    start_standalone,
    start_starlette,
)

RESULTS = Path(__file__).parent / "results"
ROW = [5.1, 3.5, 1.4, 0.2]
MLP_IN = 64
WARMUP_S = 1.0
"""Seconds of unmeasured load before each measured run (every system and workload alike)."""


def v2_body(
    rows: np.ndarray, name: str = "input-0", datatype: str = "FP64", outputs: list[str] | None = None
) -> bytes:
    doc: dict[str, Any] = {
        "inputs": [
            {"name": name, "shape": list(rows.shape), "datatype": datatype, "data": rows.reshape(-1).tolist()}
        ]
    }
    if outputs is not None:
        doc["outputs"] = [{"name": o} for o in outputs]
    return json.dumps(doc).encode()


def iris_rows(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    return np.round(rng.uniform([4.3, 2.0, 1.0, 0.1], [7.9, 4.4, 6.9, 2.5], size=(n, 4)), 1)


# -- setup ----------------------------------------------------------------------------
def publish_models(work: Path) -> dict[str, Any]:
    import joblib
    import torch

    import serving
    from serving import demo

    store = str(work / "store")
    demo.publish(store, version="1", alias="production", c=1.0)
    demo.publish(store, version="2", c=0.01)
    joblib.dump(demo.train(), work / "iris.joblib")
    from bench.baselines.mlp import MLP

    torch.manual_seed(0)
    mlp = MLP(MLP_IN).eval()
    example = np.zeros((1, MLP_IN), dtype=np.float32)
    for name in ("mlp", "mlpb"):
        serving.save(mlp, name, version="1", store=store, alias="production", example=example)
    return {"store": store, "iris_joblib": work / "iris.joblib"}


def ours_args(
    store: str, work: Path, *, mlp: bool, layout: str = "single-hop", isolation: str = "worker"
) -> dict[str, Any]:
    """``isolation``: ``worker`` (the default: predict in model workers) or ``none`` (in process)."""
    cpus = {"num_cpus": 0.25}
    models: list[dict[str, Any]] = [{"name": "iris", "alias": "production", "ray_actor_options": cpus}]
    if mlp:
        models += [
            {"name": "mlp", "alias": "production", "ray_actor_options": cpus},
            {
                "name": "mlpb",
                "alias": "production",
                "ray_actor_options": cpus,
                "batching": {"enabled": True, "max_batch_size": 32, "batch_wait_timeout_s": 0.002},
            },
        ]
    for model in models:
        model["isolation"] = isolation
    return {
        "store": store,
        "cache_dir": str(work / "cache"),
        "poll_interval_s": 1.0,
        "models": models,
        "layout": layout,
        # NOTE: single-hop: the chart's replicas (autoscaled, each holding every model); the
        # two-hop "before" keeps its one small ingress replica.
        "ingress": chart_ingress() if layout == "single-hop" else {"ray_actor_options": {"num_cpus": 0.25}},
    }


def chart_ingress() -> dict[str, Any]:
    """The chart's default ``serve.ingress`` block: replicas, autoscaling, resources."""
    values = yaml.safe_load((ROOT / "charts" / "serving" / "values.yaml").read_text())
    ingress: dict[str, Any] = values["serve"]["ingress"]
    return ingress


def settle(ours: System) -> int:
    """Run 1-row load until Serve's autoscaler has settled; returns the replica count.

    Serve decides on its ``look_back_period_s`` (30 s) of figures and scales up after
    ``upscale_delay_s`` (30 s) above the target, then a new replica takes seconds to
    start and is listed only once it reports; so the load runs at least 75 s, then until
    the count holds for three checks (15 s).
    """
    url = ours.url("v2")
    assert url is not None
    body = v2_body(np.array([ROW]), outputs=["predict"])
    started, counts = time.monotonic(), []
    floor_s, limit_s = 75.0, 150.0
    while time.monotonic() - started < limit_s:
        load.run_load(url, body, connections=16, seconds=5)
        counts.append(replica_count(ours))
        if time.monotonic() - started >= floor_s and len(counts) >= 3 and len(set(counts[-3:])) == 1:
            break
    print(f"  ours: {counts[-1]} replicas after {time.monotonic() - started:.0f} s of 16 clients", flush=True)
    return counts[-1]


def replica_count(ours: System) -> int:
    """How many replicas serve iris now, as the repository index lists them."""
    index = httpx.get(ours.base + "/v2/repository/index", timeout=10).json()
    return len(next(e for e in index if e["name"] == "iris")["replicas"])


STANDALONE = "ours-standalone"
STANDALONE_IN_PROCESS = "ours-standalone-inproc"
OURS_IN_PROCESS = "ours-inproc"
IRIS_V2 = "/v2/models/iris/infer"
IRIS_V1 = "/v1/models/iris:predict"


Group = Callable[[Processes, Path, dict[str, Any], list[str]], dict[str, System]]


def _ours(procs: Processes, work: Path, pub: dict[str, Any], notes: list[str]) -> dict[str, System]:
    one = v2_body(np.array([ROW]))
    ours = start_serve(procs, ours_args(pub["store"], work / "serve", mlp=True), work, one)
    replicas = settle(ours)
    ours.note += f"; {replicas} replica(s): the chart's autoscaling settled under 16 clients"
    batch = System("ours+batch", ours.base, {"mlp": "/v2/models/mlpb/infer"}, "@serve.batch(32, 2 ms)")
    return {"ours": ours, "ours+batch": batch}


def _ours_in_process(
    procs: Processes, work: Path, pub: dict[str, Any], notes: list[str]
) -> dict[str, System]:
    """The default Ray path with model workers off (``isolation: none``): what workers cost."""
    args = ours_args(pub["store"], work / "serve-inproc", mlp=True, isolation="none")
    ours = start_serve(procs, args, work, v2_body(np.array([ROW])), name=OURS_IN_PROCESS)
    replicas = settle(ours)
    ours.note = f"workers off (isolation: none); {replicas} replica(s) after settling under 16 clients"
    return {OURS_IN_PROCESS: ours}


def _ray_peers(procs: Processes, work: Path, pub: dict[str, Any], notes: list[str]) -> dict[str, System]:
    base = start_ray_host(
        procs,
        "ray-peers",
        [
            {
                "kind": "naive",
                "name": "naive",
                "route_prefix": "/naive",
                "args": {"path": str(pub["iris_joblib"])},
            },
            {"kind": "noop", "name": "noop", "route_prefix": "/noop"},
            {
                "kind": "ours",
                "name": "ours-2hop",
                "route_prefix": "/",
                "args": ours_args(pub["store"], work / "two", mlp=False, layout="two-hop"),
            },
        ],
        work,
        IRIS_V2,
        v2_body(np.array([ROW])),
        env={"RAY_SERVE_ENABLE_HA_PROXY": "0"},
    )
    return {
        "ours-2hop": System(
            "ours-2hop",
            base,
            {"v2": IRIS_V2, "v1": IRIS_V1, "v2bin": IRIS_V2},
            "before: layout two-hop behind Ray's Python proxy (proxy -> Ingress -> model replica)",
        ),
        "naive-serve": System(
            "naive-serve",
            base,
            {"v2": "/naive" + IRIS_V2, "v1": "/naive" + IRIS_V1},
            "seed-style FastAPI ingress, Ray's Python proxy",
        ),
        "serve-noop": System(
            "serve-noop", base, {"v2": "/noop", "v1": "/noop"}, "Ray Serve deployment answering a constant"
        ),
    }


def _starlette(procs: Processes, work: Path, pub: dict[str, Any], notes: list[str]) -> dict[str, System]:
    return {"starlette": start_starlette(procs, pub["iris_joblib"], v2_body(np.array([ROW])))}


def _standalone_args(pub: dict[str, Any], work: Path, isolation: str) -> dict[str, Any]:
    standalone = ours_args(pub["store"], work, mlp=False, isolation=isolation)
    for model in standalone["models"]:
        model.pop("ray_actor_options")
    standalone.pop("ingress")
    return standalone


def _standalone(procs: Processes, work: Path, pub: dict[str, Any], notes: list[str]) -> dict[str, System]:
    args = _standalone_args(pub, work / "standalone", "worker")
    return {STANDALONE: start_standalone(procs, args, work, v2_body(np.array([ROW])))}


def _standalone_in_process(
    procs: Processes, work: Path, pub: dict[str, Any], notes: list[str]
) -> dict[str, System]:
    args = _standalone_args(pub, work / "standalone-inproc", "none")
    system = start_standalone(procs, args, work, v2_body(np.array([ROW])), name=STANDALONE_IN_PROCESS)
    system.note = "workers off (isolation: none): predict in the uvicorn process"
    return {STANDALONE_IN_PROCESS: system}


def _mlserver(procs: Processes, work: Path, pub: dict[str, Any], notes: list[str]) -> dict[str, System]:
    why = install_mlserver()
    if why is not None:
        if not any(n.startswith("MLServer") for n in notes):
            notes.append(f"MLServer not measured: {why}")
        return {}
    try:
        return {"mlserver": start_mlserver(procs, work, v2_body(np.array([ROW])))}
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        notes.append(f"MLServer installed but did not run: {exc}")
        return {}


def _ours_fixed(replicas: int) -> Group:
    """The Ray path as the chart configures it, at a fixed replica count (equal CPU rounds)."""

    def start(procs: Processes, work: Path, pub: dict[str, Any], notes: list[str]) -> dict[str, System]:
        args = ours_args(pub["store"], work / "serve", mlp=False)
        ingress = {k: v for k, v in args["ingress"].items() if k != "autoscaling_config"}
        args["ingress"] = {**ingress, "num_replicas": replicas}
        name = f"ours-x{replicas}"
        ours = start_serve(procs, args, work, v2_body(np.array([ROW])), name=name)
        del ours.paths["mlp"]  # NOTE: iris only, as every peer serves
        ours.note = (
            f"the chart's Ray path (HAProxy, single-hop, 1 CPU per replica), {replicas} replica(s), fixed"
        )
        return {name: ours}

    return start


def _peer(peer: str, workers: int) -> Group:
    def start(procs: Processes, work: Path, pub: dict[str, Any], notes: list[str]) -> dict[str, System]:
        return peers.start_peer(procs, peers.PEERS[peer], workers, v2_body(np.array([ROW])), notes)

    return start


GROUPS: dict[str, Group] = {
    "ours": _ours,
    "ours-x1": _ours_fixed(1),
    "ours-x2": _ours_fixed(2),
    **{peer if n == 1 else f"{peer}-x{n}": _peer(peer, n) for n in (1, 2) for peer in peers.PEERS},
    OURS_IN_PROCESS: _ours_in_process,
    "ray-peers": _ray_peers,
    "starlette": _starlette,
    "ours-standalone": _standalone,
    STANDALONE_IN_PROCESS: _standalone_in_process,
    "mlserver": _mlserver,
}
"""The systems, in groups that share processes. Only one group runs at a time: an idle
Ray instance (GCS, raylet, controller, pollers) takes CPU from whatever is measured."""


def binary_body(rows: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A binary tensor extension request (binary in and out) and its header."""
    raw = rows.astype("<f8").tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input-0",
                    "shape": list(rows.shape),
                    "datatype": "FP64",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


# -- throughput workloads ---------------------------------------------------------------------
def throughput(
    procs: Processes,
    work: Path,
    pub: dict[str, Any],
    notes: list[str],
    rounds: int,
    seconds: float,
    with_ours: Callable[[System], None] | None = None,
    only_groups: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Every workload on every group of systems, one group up at a time; ``with_ours`` runs
    in every round while ``ours`` is up (the swap-under-load workload)."""
    mlp_body = v2_body(
        np.random.default_rng(0).standard_normal((1, MLP_IN)).astype(np.float32), datatype="FP32"
    )
    bulk, bulk_headers = binary_body(iris_rows(10_000))
    plan: list[tuple[str, str, bytes, int, int, dict[str, str] | None]] = [
        # NOTE: the same request to every system, naming the one output MLServer's sklearn
        # runtime returns by default; ours would otherwise compute all three it declares.
        ("a: 1-row v2", "v2", v2_body(np.array([ROW]), outputs=["predict"]), 16, 1, None),
        ("a: 1-row v2, every output", "v2all", v2_body(np.array([ROW])), 16, 1, None),
        ("a: 1-row v1", "v1", json.dumps({"instances": [ROW]}).encode(), 16, 1, None),
        ("b: 1,000 rows v2", "v2", v2_body(iris_rows(1000)), 4, 1000, None),
        ("b: 10,000 rows v2", "v2", v2_body(iris_rows(10_000)), 4, 10_000, None),
        ("b: 10,000 rows v2 binary", "v2bin", bulk, 4, 10_000, bulk_headers),
        ("c: torch MLP 1-row, 32 clients", "mlp", mlp_body, 32, 1, None),
    ]
    raw: dict[tuple[str, str], list[dict[str, Any]]] = {}
    groups = [(name, start) for name, start in GROUPS.items() if only_groups is None or name in only_groups]
    for rnd in range(rounds):
        # NOTE: the order flips every round, so a drift of the machine spreads over every system.
        for group, start in groups if rnd % 2 == 0 else groups[::-1]:
            print(f"  [{rnd + 1}/{rounds}] starting {group}...", flush=True)
            where = work / f"{group}-{rnd}"
            where.mkdir()
            systems = start(procs, where, pub, notes)
            try:
                for workload, kind, body, conns, rows, headers in plan:
                    for name, system in systems.items():
                        url = system.url(kind)
                        if url is None or (name == "serve-noop" and rows > 1):
                            continue
                        # NOTE: the binary extension's body is not JSON; KServe refuses it as JSON.
                        kind_of_body = "application/octet-stream" if headers else "application/json"
                        # NOTE: a second of the same load first, not measured, for every system alike:
                        # a fresh server's first requests (connections opened, first-use costs of
                        # a request shape) are not its steady state.
                        load.run_load(
                            url,
                            body,
                            connections=conns,
                            seconds=WARMUP_S,
                            headers=headers,
                            content_type=kind_of_body,
                        )
                        res = load.run_load(
                            url,
                            body,
                            connections=conns,
                            seconds=seconds,
                            headers=headers,
                            content_type=kind_of_body,
                        )
                        # NOTE: the autoscaler can still add a replica after settling; say so.
                        after = f"; {replica_count(system)} replica(s) after it" if name == "ours" else ""
                        print(
                            f"  [{rnd + 1}/{rounds}] {workload:32} {name:12} {res.requests_per_s:9.0f} req/s"
                            f"  p99 {res.p99_ms:7.1f} ms  errors {res.errors} {res.error_kinds or ''}{after}",
                            flush=True,
                        )
                        raw.setdefault((workload, name), []).append(
                            report.record(
                                workload,
                                name,
                                requests_per_s=res.requests_per_s,
                                rows_per_s=res.requests_per_s * rows if rows > 1 else None,
                                p50_ms=res.p50_ms,
                                p99_ms=res.p99_ms,
                                errors=res.errors,
                                notes=f"{system.note}; {res.tool} -c{conns}{after}"
                                + (f"; errors {res.error_kinds}" if res.error_kinds else ""),
                            )
                        )
                if group == "ours" and with_ours is not None:
                    with_ours(systems["ours"])
            finally:
                procs.stop_all()
    return [report.merge_rounds(v) for v in raw.values()]


def in_process(store: str, work: Path, iris_joblib: Path) -> list[dict[str, Any]]:
    """Rows/s of plain ``predict`` and of the REST path in process (decode, predict, encode), no HTTP."""
    import joblib

    from serving.config import AppConfig
    from serving.runtime.service import ModelService
    from serving.settings import get_settings

    model = joblib.load(iris_joblib)
    app = AppConfig.model_validate(
        {"store": store, "cache_dir": str(work / "cache-inproc"), "models": [{"name": "iris"}]}
    )
    service = ModelService(app.models[0], app, get_settings())
    service.start()
    live = service.slot.live
    assert live is not None
    predictor = live.predictor
    out = []
    for n in (1000, 10_000):
        x = iris_rows(n)
        body = v2_body(x)
        for system, fn in (
            ("in-process predict", lambda x=x: model.predict(x)),
            ("in-process Predictor.predict", lambda x=x: predictor.predict({"input-0": x})),
            ("in-process ModelService", lambda body=body: rest_infer(service, body)),
        ):
            times = []
            for _ in range(max(5, 30_000 // n)):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            out.append(
                report.record(
                    f"b: {n:,} rows v2",
                    system,
                    requests_per_s=1 / med,
                    rows_per_s=n / med,
                    p50_ms=med * 1000,
                    p99_ms=load.percentile(times, 99) * 1000,
                    notes={
                        "in-process predict": "model.predict on a numpy array",
                        "in-process Predictor.predict": "every declared output (predict, predict_proba, "
                        "decision_function), no codec",
                    }.get(system, "no HTTP; ModelService = JSON decode + predict + JSON encode"),
                )
            )
    service.slot.close()
    return out


# -- d: swap under load -------------------------------------------------------------------------
def swap_under_load(ours: System, store: str, seconds: float, every: float) -> dict[str, Any]:
    from serving.repository import Repository, SetTarget
    from serving.settings import Settings
    from serving.store import open_store

    repo = Repository(open_store(store, Settings(store=store)))
    url = ours.url("v2")
    assert url is not None
    moves: list[tuple[float, str]] = []
    t0 = time.perf_counter()

    def mover() -> None:
        version = "2"
        t = every
        while t < seconds - every / 2:
            time.sleep(max(0.0, t0 + t - time.perf_counter()))
            repo.move_alias("iris", "production", SetTarget(version), by="bench")
            moves.append((time.perf_counter() - t0, version))
            version = "1" if version == "2" else "2"
            t += every

    thread = threading.Thread(target=mover, daemon=True)
    thread.start()
    res = load.run_async(url, v2_body(np.array([ROW])), connections=8, seconds=seconds, keep_samples=True)
    thread.join()
    samples = res.samples
    if moves and moves[-1][1] != "1":
        repo.move_alias("iris", "production", SetTarget("1"), by="bench")
    ok = [s for s in samples if s[2] == 200]
    convergence = []
    windows = []
    for i, (t_move, version) in enumerate(moves):
        t_next = moves[i + 1][0] if i + 1 < len(moves) else float("inf")
        stale = [s[0] + s[1] for s in ok if t_move <= s[0] < t_next and s[3] != version]
        done = max(stale) if stale else t_move
        convergence.append(done - t_move)
        windows.append((t_move, done))
    # NOTE: the first second is the clients connecting, not the server's steady state.
    warm = [s for s in ok if s[0] >= 1.0]
    steady = [s[1] for s in warm if not moves or s[0] + s[1] < moves[0][0]]
    during = [s[1] for s in ok if any(a <= s[0] <= b for a, b in windows)]
    outside = [s[1] for s in warm if not any(a <= s[0] <= b for a, b in windows)]
    after_t = windows[-1][1] if windows else 0.0
    after = [s[1] for s in ok if s[0] > after_t]
    p99 = lambda v: load.percentile(v, 99) * 1000  # noqa: E731
    p50 = lambda v: load.percentile(v, 50) * 1000  # noqa: E731
    return {
        "requests": len(samples),
        "errors": sum(1 for s in samples if s[2] != 200),
        "error_kinds": res.error_kinds,
        "moves": [t for t, _ in moves],
        "convergence_s": convergence,
        "p50_ms": {"steady": p50(steady), "during": p50(during), "after": p50(after)},
        "p99_ms": {
            "steady": p99(steady),
            "during": p99(during),
            "after": p99(after),
            "outside": p99(outside),
        },
        "samples_during": len(during),
        "ratio_p99_during_over_steady": (p99(during) / p99(steady)) if steady and during else None,
        "ratio_p99_during_over_outside": (p99(during) / p99(outside)) if outside and during else None,
        "samples": samples,
        "requests_per_s": res.requests_per_s,
    }


def merge_swaps(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One swap-under-load result from a run per round: the median ratios, every error, and
    the timeline and figures of the round with the highest p99 ratio (the one plotted)."""
    if not runs:
        return {}
    ratios = [
        r["ratio_p99_during_over_steady"] for r in runs if r["ratio_p99_during_over_steady"] is not None
    ]
    worst = max(runs, key=lambda r: r["ratio_p99_during_over_steady"] or 0.0)
    outside = [
        r["ratio_p99_during_over_outside"] for r in runs if r["ratio_p99_during_over_outside"] is not None
    ]
    return {
        **worst,
        "errors": sum(r["errors"] for r in runs),
        "ratio_p99_during_over_steady": statistics.median(ratios) if ratios else None,
        "ratio_p99_during_over_outside": statistics.median(outside) if outside else None,
        "per_round": [
            {
                k: r[k]
                for k in ("errors", "ratio_p99_during_over_steady", "ratio_p99_during_over_outside", "p99_ms")
            }
            for r in runs
        ],
    }


# -- e, f, g --------------------------------------------------------------------------------------
def cache_hit(quick: bool) -> dict[str, Any]:
    from bench import cache_load

    if quick:
        cache_load.ROUNDS = 1
    return cache_load.main()


def alias_check() -> dict[str, Any]:
    from bench import alias_check as ac

    return ac.main()


def swap_rss(work: Path, megabytes: int) -> dict[str, Any]:
    from bench.coldstart import make_model
    from serving.publish import publish_path
    from serving.repository import Repository
    from serving.settings import Settings
    from serving.store import open_store

    store = str(work / "rss-store")
    repo = Repository(open_store(store, Settings(store=store)))
    for v in ("1", "2"):
        path = work / f"rss-{v}" / "model.joblib"
        path.parent.mkdir()
        make_model(path, megabytes)
        publish_path(repo, path, "big", version=v, format="sklearn")
    out = subprocess.run(
        [sys.executable, "-m", "bench.swap_rss", store, str(work / "rss-cache")],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# -- main -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s, small models (about 4 min)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None, help="seconds per throughput run")
    parser.add_argument("--only", default="abcdefg", help="workload letters to run (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--groups", default="", help=f"comma-separated groups of systems to run (default: {','.join(GROUPS)})"
    )
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 2)
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    notes: list[str] = []
    if not load.ensure_wrk():
        notes.append(
            "wrk is not installed (apt-get install wrk): load came from a bounded asyncio HTTP/1.1 "
            "client, which itself takes CPU"
        )
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    procs = Processes(work)
    result: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "environment": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_tool": "wrk" if load.have_wrk() else "asyncio",
            "rounds": rounds,
            "seconds_per_run": seconds,
        },
        "notes": notes,
        "tuning": [],
    }
    records: list[dict[str, Any]] = []
    try:
        print("publishing models...", flush=True)
        pub = {**publish_models(work), "quick": args.quick}
        if set(args.only) & set("abcd"):
            swaps: list[dict[str, Any]] = []

            def with_ours(ours: System) -> None:
                if "d" in args.only:
                    print("d: swap under load...", flush=True)
                    swaps.append(
                        swap_under_load(
                            ours, pub["store"], 16.0 if args.quick else 30.0, 4.0 if args.quick else 6.0
                        )
                    )
                    ratio = swaps[-1]["ratio_p99_during_over_steady"]
                    print(
                        f"  d: p99 during / steady {'n/a' if ratio is None else f'{ratio:.2f}'}", flush=True
                    )

            if set(args.only) & set("abc"):
                print("a, b, c: throughput, one group of systems at a time...", flush=True)
                groups = set(args.groups.split(",")) if args.groups else None
                records += throughput(procs, work, pub, notes, rounds, seconds, with_ours, groups)
                records += in_process(pub["store"], work, pub["iris_joblib"])
                records += [
                    {**r, "workload": "b: 10,000 rows v2 binary"}
                    for r in records
                    if r["workload"] == "b: 10,000 rows v2" and r["system"] == "in-process Predictor.predict"
                ]
            else:
                try:
                    (work / "ours-d").mkdir()
                    with_ours(_ours(procs, work / "ours-d", pub, notes)["ours"])
                finally:
                    procs.stop_all()
            swap = merge_swaps(swaps)
            if swap:
                result["swap"] = {k: v for k, v in swap.items() if k != "samples"}
                result["swap_timeline"] = {"moves": swap["moves"], "samples": swap["samples"]}
                records.append(
                    report.record(
                        "d: swap under load (1-row v2, 8 clients)",
                        "ours",
                        requests_per_s=swap["requests_per_s"],
                        rows_per_s=None,
                        p50_ms=swap["p50_ms"]["during"],
                        p99_ms=swap["p99_ms"]["during"],
                        errors=swap["errors"],
                        notes=f"alias moved {len(swap['moves'])}x; p50/p99 during swaps; "
                        f"convergence {max(swap['convergence_s'] or [0]):.2f} s max"
                        + (f"; errors {swap['error_kinds']}" if swap["error_kinds"] else ""),
                    )
                )
        if "e" in args.only:
            print("e: cold start (cache miss vs boto3) and cache hit (bench.cache_load)...", flush=True)
            from bench import coldstart

            result["cold_start"] = coldstart.main(
                megabytes=50 if args.quick else 200, rounds=1 if args.quick else 3
            )
            result["cache_hit"] = cache_hit(args.quick)
        if "f" in args.only:
            print("f: unchanged-alias check (bench.alias_check)...", flush=True)
            result["alias_check"] = alias_check()
        if "g" in args.only:
            print("g: peak RSS during a swap...", flush=True)
            result["swap_rss"] = swap_rss(work, 50 if args.quick else 100)
    except BaseException:
        procs.stop_all()
        print(f"bench failed; server logs kept in {work}", file=sys.stderr)
        raise
    procs.stop_all()
    shutil.rmtree(work, ignore_errors=True)
    result["records"] = records
    result["ratios"] = report.ratios(records) + report.ratios(records, ours=STANDALONE)
    result["equal_cpu"] = report.equal_cpu(records, ["mlserver", *peers.PEERS, STANDALONE, "starlette"])
    result["targets"] = targets(result)
    result["tuning"] += tuning(records)
    result["runtime_s"] = round(time.time() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    result["plots"] = report.plot(result, args.out)
    report.write_json(args.out / "latest.json", {k: v for k, v in result.items() if k != "swap_timeline"})
    (args.out / "latest.md").write_text(report.markdown(result))
    print((args.out / "latest.md").read_text())
    return 0


def _ratio(
    result: dict[str, Any], workload: str, peer: str, ours: str = report.OURS, *, p99: bool = False
) -> float | None:
    """ours / peer on throughput (rows/s where both have it), or on p99 latency with ``p99``."""
    for r in result.get("ratios", []):
        if r["workload"] == workload and r["peer"] == peer and r.get("ours", report.OURS) == ours:
            value: float | None = r["p99_ratio"] if p99 else r["ratio"]
            return value
    return None


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    t = report.target
    out = [
        t(
            "1-row v2 req/s, ours / mlserver",
            _ratio(result, "a: 1-row v2", "mlserver"),
            1.0,
            higher_is_better=True,
            why="HAProxy -> replica (direct ingress) is one hop, but the replica is a Ray actor "
            "sharing the cores with HAProxy, the controller and the raylet",
        ),
        t(
            "1-row v2 p99, ours / mlserver",
            _ratio(result, "a: 1-row v2", "mlserver", p99=True),
            1.0,
            higher_is_better=False,
            why="as above",
        ),
        t(
            "1-row v2 req/s, ours / ours-2hop (before)",
            _ratio(result, "a: 1-row v2", "ours-2hop"),
            1.0,
            higher_is_better=True,
            why="the fast path should beat the two-hop path it replaced",
        ),
    ]
    for n in (1, 2):
        for workload in ("a: 1-row v2", "a: 1-row v2, every output"):
            rows = [
                r
                for r in result.get("equal_cpu", [])
                if r["n"] == n
                and r["workload"] == workload
                and r["anchor"]
                and r["ratio"] is not None
                and not r["errors"]
            ]
            worst = min(rows, key=lambda r: r["ratio"], default=None)
            slowest = max(rows, key=lambda r: r["p99_ratio"] or 0.0, default=None)
            best = f"best of {', '.join(r['peer'] for r in rows)}" if rows else "best anchor"
            out.append(
                t(
                    f"{workload[3:]} req/s at equal CPU, ours-x{n} / {best} ({n} against {n})",
                    worst["ratio"] if worst else None,
                    1.0,
                    higher_is_better=True,
                    why="the Ray replica's request path (direct ingress, the user-code thread hop, "
                    "Ray's metrics) against one process per peer",
                )
            )
            out.append(
                t(
                    f"{workload[3:]} p99 at equal CPU, ours-x{n} / the anchors' ({n} against {n})",
                    slowest["p99_ratio"] if slowest else None,
                    1.0,
                    higher_is_better=False,
                )
            )
    for peer, goal in (("mlserver", 1.3), ("starlette", 1.0)):
        out.append(
            t(
                f"1-row v2 req/s, ours-standalone / {peer}",
                _ratio(result, "a: 1-row v2", peer, ours=STANDALONE),
                goal,
                higher_is_better=True,
                why="decode + predict + encode of ModelService (predict, predict_proba and "
                "decision_function outputs) against a bare predict",
            )
        )
    for ours, off in ((report.OURS, OURS_IN_PROCESS), (STANDALONE, STANDALONE_IN_PROCESS)):
        for workload in ("a: 1-row v2", "b: 10,000 rows v2", "b: 10,000 rows v2 binary"):
            out.append(
                t(
                    f"{workload[3:]} req/s, {ours} / {off} (model workers on / off)",
                    _ratio(result, workload, off, ours=ours),
                    0.9,
                    higher_is_better=True,
                    why="what predicting in a model worker costs: tensors through shared memory, "
                    "a socket round trip, and a thread hop off the event loop",
                )
            )
    for ours in (report.OURS, STANDALONE):
        out.append(
            t(
                f"10,000 rows/s binary, {ours} / in-process Predictor.predict",
                _ratio(result, "b: 10,000 rows v2 binary", "in-process Predictor.predict", ours=ours),
                0.5,
                higher_is_better=True,
                why="the 320 kB body crossing HTTP (and HAProxy) plus the binary codec",
            )
        )
    for n in ("1,000", "10,000"):
        out.append(
            t(
                f"{n} rows/s JSON, ours / in-process predict",
                _ratio(result, f"b: {n} rows v2", "in-process predict"),
                0.5,
                higher_is_better=True,
                why="JSON decode/encode of the rows (use binary tensors for bulk)",
            )
        )
    swap = result.get("swap")
    if swap:
        out.append(
            t("errors during swaps", float(swap["errors"]), 0, higher_is_better=False, why="see swap notes")
        )
        out.append(
            t(
                "p99 during swap / steady p99",
                swap["ratio_p99_during_over_steady"],
                1.5,
                higher_is_better=False,
                why="the new version's isolated first load (niceness 10) and its load and warm-up "
                "in the replica share the node's CPU with requests",
            )
        )
    hit = result.get("cache_hit")
    if hit:
        for row in hit["rows"]:
            out.append(
                t(
                    f"cache-hit load / raw load ({row['case']})",
                    row["ratio_cache_hit_raw_over_raw"],
                    1.2,
                    higher_is_better=False,
                    why="alias + manifest round trips to the store before a hit",
                )
            )
    cold = result.get("cold_start")
    if cold:
        out.append(
            t(
                "cache-miss pull / raw boto3 download",
                cold["ratio_cache_miss_over_raw_download"],
                1.1,
                higher_is_better=False,
                why="sha256 while streaming and the extra alias/manifest GETs",
            )
        )
    rss = result.get("swap_rss")
    if rss:
        out.append(
            t(
                "swap peak RSS / (2 x model RSS)",
                rss["ratio_peak_over_twice_model"],
                1.1,
                higher_is_better=False,
                why="unpickling holds transient copies of the arrays",
            )
        )
    return out


def tuning(records: list[dict[str, Any]]) -> list[str]:
    """Before/after ratios of the tuning variants measured in this run."""
    by = {(r["workload"], r["system"]): r for r in records}
    out = []
    for wl in dict.fromkeys(r["workload"] for r in records):
        fast, before = by.get((wl, "ours")), by.get((wl, "ours-2hop"))
        if fast and before and before["requests_per_s"]:
            out.append(
                f"{wl}: HAProxy + single hop / Python proxy + two hops = "
                f"{fast['requests_per_s'] / before['requests_per_s']:.2f} "
                f"(p99 {fast['p99_ms']:.1f} vs {before['p99_ms']:.1f} ms)"
            )
        unb, bat = by.get((wl, "ours")), by.get((wl, "ours+batch"))
        if unb and bat and unb["requests_per_s"]:
            out.append(
                f"{wl}: @serve.batch / unbatched = {bat['requests_per_s'] / unb['requests_per_s']:.2f}"
            )
    return out


if __name__ == "__main__":
    sys.exit(main())
