"""OIP over gRPC against REST, and against MLServer's gRPC, in one run: 1-row and 10,000-row iris.

Systems (127.0.0.1, started here, stopped at the end): ``ours-standalone``
(``serving serve --standalone``: uvicorn and a grpc.aio server on one loop),
``ours`` (``serving serve``: Ray Serve, HAProxy to the replicas' own HTTP and gRPC
servers) and ``mlserver`` (Seldon MLServer's sklearn runtime, bench/.venvs/mlserver).

Workloads, each a closed loop of ``--concurrency`` clients for ``--seconds``:

- ``grpc``: ``ModelInfer`` with ``raw_input_contents`` (one gRPC channel per client);
- ``rest``: ``POST /v2/models/iris/infer`` with JSON ``data``;
- ``rest-binary``: the same with the binary tensor extension (ours only: MLServer's REST
  does not speak it).

Every request asks for the ``predict`` output only, so every system returns the same
bytes. Requests are serialized once and replies are not decoded in the loop (the first
reply of each pair is checked), so the Python client costs each transport about the same.
Rounds alternate the order of the systems and each figure is the median over rounds.
The client shares the machine with the servers: on 2 cores, treat ratios, not absolute
rates, as the result.

Run: ``.venv/bin/python -m bench.grpc`` (about 6 min; ``--seconds 0.5 --rounds 1`` to smoke-test).
Writes bench/results/grpc.json and grpc.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

from bench import load
from bench.systems import Processes, System, install_mlserver, start_mlserver, start_serve, start_standalone

RESULTS = Path(__file__).parent / "results"
ROW = [5.1, 3.5, 1.4, 0.2]
ROWS = (1, 10_000)
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def iris_rows(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    return np.round(rng.uniform([4.3, 2.0, 1.0, 0.1], [7.9, 4.4, 6.9, 2.5], size=(n, 4)), 1)


def rest_body(rows: np.ndarray) -> bytes:
    doc = {
        "inputs": [{"name": "input-0", "shape": list(rows.shape), "datatype": "FP64", "data": rows.tolist()}],
        "outputs": [{"name": "predict"}],
    }
    return json.dumps(doc).encode()


def rest_binary_body(rows: np.ndarray) -> tuple[bytes, dict[str, str]]:
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
            "outputs": [{"name": "predict", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def grpc_request(rows: np.ndarray) -> bytes:
    request = pb.ModelInferRequest(model_name="iris")
    request.inputs.add(name="input-0", datatype="FP64", shape=list(rows.shape))
    request.outputs.add(name="predict")
    request.raw_input_contents.append(rows.astype("<f8").tobytes())
    serialized: bytes = request.SerializeToString()
    return serialized


def check_grpc(address: str, body: bytes, rows: int) -> str | None:
    """None when one ModelInfer answers ``rows`` predictions, else what went wrong."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
        try:
            reply = pb.ModelInferResponse.FromString(call(body, timeout=30))
        except grpc.RpcError as exc:
            return f"{exc.code()}: {exc.details()}"
    if not reply.raw_output_contents or len(reply.raw_output_contents[0]) != rows * 8:
        return f"unexpected reply: {[(o.name, list(o.shape)) for o in reply.outputs]}"
    return None


async def _grpc_load(address: str, body: bytes, concurrency: int, seconds: float) -> load.LoadResult:
    latencies: list[float] = []
    errors = 0
    channels = [grpc.aio.insecure_channel(address) for _ in range(concurrency)]
    started = time.perf_counter()
    deadline = started + seconds

    async def worker(channel: grpc.aio.Channel) -> None:
        nonlocal errors
        call = channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                await call(body, timeout=30)
            except grpc.RpcError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)

    try:
        await asyncio.gather(*(worker(c) for c in channels))
    finally:
        for channel in channels:
            await channel.close()
    return load.LoadResult(
        requests=len(latencies) + errors,
        seconds=time.perf_counter() - started,
        errors=errors,
        p50_ms=load.percentile(latencies, 50) * 1000,
        p99_ms=load.percentile(latencies, 99) * 1000,
        tool="grpc.aio client, pre-serialized requests",
    )


def grpc_load(address: str, body: bytes, concurrency: int, seconds: float) -> load.LoadResult:
    """Closed-loop ModelInfer load from ``concurrency`` clients for ``seconds``."""
    return asyncio.run(_grpc_load(address, body, concurrency, seconds))


def start(procs: Processes, work: Path, notes: list[str]) -> dict[str, System]:
    from serving import demo

    store = str(work / "store")
    demo.publish(store, version="1", alias="production", c=1.0)
    one = rest_body(np.array([ROW]))
    args: dict[str, Any] = {
        "store": store,
        "cache_dir": str(work / "cache"),
        "poll_interval_s": 5.0,
        "models": [{"name": "iris", "alias": "production"}],
    }
    systems = {"ours-standalone": start_standalone(procs, args, work, one)}
    ray_args = {
        **args,
        "models": [{"name": "iris", "alias": "production", "ray_actor_options": {"num_cpus": 0.25}}],
        "ingress": {"ray_actor_options": {"num_cpus": 0.5}},
    }
    (work / "ray").mkdir()
    systems["ours"] = start_serve(procs, ray_args, work / "ray", one)
    why = install_mlserver()
    if why is None:
        try:
            systems["mlserver"] = start_mlserver(procs, work, one)
        except RuntimeError as exc:
            notes.append(f"MLServer installed but did not run: {exc}")
    else:
        notes.append(f"MLServer not measured: {why}")
    return systems


def rest_load(
    url: str, body: bytes, headers: dict[str, str], concurrency: int, seconds: float
) -> load.LoadResult:
    """Closed-loop REST infer load (JSON, or the binary extension with its header)."""
    content_type = "application/octet-stream" if headers else "application/json"
    return load.run_async(
        url, body, connections=concurrency, seconds=seconds, content_type=content_type, headers=headers
    )


Runner = Callable[[float], load.LoadResult]
"""One (system, transport, rows) case: a closed loop for the given seconds."""


def cases_for(
    systems: dict[str, System], concurrency: int, notes: list[str]
) -> list[tuple[str, str, int, Runner]]:
    cases: list[tuple[str, str, int, Runner]] = []
    for n in ROWS:
        rows = iris_rows(n)
        json_body = rest_body(rows)
        binary, headers = rest_binary_body(rows)
        request = grpc_request(rows)
        for name, system in systems.items():
            problem = check_grpc(system.grpc, request, n) if system.grpc else "no gRPC"
            if problem is None:
                cases.append((name, "grpc", n, partial(grpc_load, system.grpc, request, concurrency)))
            else:
                notes.append(f"{name} gRPC, {n} rows: not measured ({problem})")
            url = system.base + "/v2/models/iris/infer"
            cases.append((name, "rest", n, partial(rest_load, url, json_body, {}, concurrency)))
            if name.startswith("ours"):
                cases.append((name, "rest-binary", n, partial(rest_load, url, binary, headers, concurrency)))
    return cases


def measure(
    systems: dict[str, System], rounds: int, seconds: float, concurrency: int, notes: list[str]
) -> list[dict[str, Any]]:
    cases = cases_for(systems, concurrency, notes)
    for _name, _transport, _n, run in cases:
        run(min(1.0, seconds))  # NOTE: warm-up: connections, caches, the server's first requests
    samples: dict[tuple[str, str, int], list[load.LoadResult]] = {}
    for r in range(rounds):
        for name, transport, n, run in cases if r % 2 == 0 else list(reversed(cases)):
            result = run(seconds)
            samples.setdefault((name, transport, n), []).append(result)
            print(
                f"round {r + 1}/{rounds} {name:16s} {transport:11s} {n:>6} rows: "
                f"{result.requests_per_s:8.1f} req/s  p50 {result.p50_ms:7.2f} ms  "
                f"p99 {result.p99_ms:7.2f} ms  errors {result.errors}",
                flush=True,
            )
    return [
        {
            "system": name,
            "transport": transport,
            "rows": n,
            "requests_per_s": statistics.median(x.requests_per_s for x in results),
            "p50_ms": statistics.median(x.p50_ms for x in results),
            "p99_ms": statistics.median(x.p99_ms for x in results),
            "errors": sum(x.errors for x in results),
            "rounds": len(results),
            "tool": results[0].tool,
        }
        for (name, transport, n), results in samples.items()
    ]


def ratios(records: list[dict[str, Any]]) -> list[str]:
    rate = {(r["system"], r["transport"], r["rows"]): r["requests_per_s"] for r in records}
    lines = []
    for n in ROWS:
        for system in ("ours-standalone", "ours"):
            for other in ("rest", "rest-binary"):
                a, b = rate.get((system, "grpc", n)), rate.get((system, other, n))
                if a and b:
                    lines.append(f"{system} {n} rows: gRPC / {other} = {a / b:.2f}x")
            m = rate.get(("mlserver", "grpc", n))
            a = rate.get((system, "grpc", n))
            if a and m:
                lines.append(f"{system} {n} rows: gRPC / MLServer gRPC = {a / m:.2f}x")
    return lines


def markdown(records: list[dict[str, Any]], notes: list[str], meta: dict[str, Any]) -> str:
    out = [
        "# OIP over gRPC vs REST vs MLServer (bench/grpc.py)",
        "",
        f"{meta['machine']}; {meta['rounds']} round(s) of {meta['seconds']} s, "
        f"{meta['concurrency']} concurrent clients; median of rounds.",
        "",
        "| system | transport | rows | req/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["rows"], r["system"], r["transport"])):
        out.append(
            f"| {r['system']} | {r['transport']} | {r['rows']} | {r['requests_per_s']:.1f} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} |"
        )
    out += ["", *[f"- {line}" for line in ratios(records)], *[f"- note: {n}" for n in notes], ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per measured run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "grpc")
    args = parser.parse_args(argv)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-grpc-") as tmp:
        work = Path(tmp)
        procs = Processes(work)
        try:
            systems = start(procs, work, notes)
            records = measure(systems, args.rounds, args.seconds, args.concurrency, notes)
        finally:
            procs.stop_all()
    meta = {
        "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
        "rounds": args.rounds,
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "systems": {name: s.note for name, s in systems.items()},
        "command": " ".join([Path(sys.executable).name, "-m", "bench.grpc", *(argv or sys.argv[1:])]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "records": records, "notes": notes, "ratios": ratios(records)}, indent=2)
    )
    text = markdown(records, notes, meta)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
