"""Codec cost of bulk rows, in process: JSON vs the OIP binary tensor extension.

For 1,000 and 10,000 iris rows (FP64, shape [n, 4]) this times, with no HTTP and
no Ray:

- ``sklearn predict``: the estimator's ``predict`` alone (what bench/run.py calls
  "in-process predict");
- ``Predictor.predict``: the served predictor, which computes every output the
  model declares (``predict`` and ``predict_proba``): the same model work as a
  request, so ``infer_v2 / Predictor.predict`` is the codec's share;
- ``infer_v2 JSON``: ``ModelService.infer_v2`` on a JSON body (decode, predict, encode);
- ``infer_v2 binary``: the same with binary inputs and binary outputs;
- ``infer_v2 binary in, JSON out``: binary inputs, JSON outputs.

Run: ``.venv/bin/python -m bench.codec`` (writes bench/results/codec.json).
``--before FILE`` embeds an earlier run's records and reports after/before
per (rows, system), both in milliseconds and over each run's own
``Predictor.predict`` (the figure that survives a busier machine in one run).
To time older code, run this file against an exported tree of it::

    git archive <rev> serving | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before .venv/bin/python bench/codec.py --out /tmp/before.json
    .venv/bin/python -m bench.codec --before /tmp/before.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results" / "codec.json"
HEADER = "Inference-Header-Content-Length"
SIZES = (1000, 10_000)
PREDICTOR = "Predictor.predict"


def rest_infer(service: Any, body: bytes, headers: Mapping[str, str] | None = None) -> Any:
    """``POST /v2/models/{name}/infer`` on ``service`` in this thread, with no server; returns the reply.

    The request path's codec work: decode, predict, encode. On a tree from before the
    data plane it calls ``ModelService.infer_v2``, which did the same, so runs compare.
    """
    if hasattr(service, "infer_v2"):
        return service.infer_v2(body, headers=headers) if headers is not None else service.infer_v2(body)
    from serving.protocol import rest

    lowered = {k.lower(): v for k, v in (headers or {}).items()}
    try:
        payload, binary = rest.split_body(
            body, service.app.max_body_bytes, lowered.get(rest.INFERENCE_HEADER.lower())
        )
        request = rest.decode_v2(payload, binary, model=service.config.name)
        return rest.encode_v2(service.infer(request), request)
    except Exception as exc:
        return rest.error_reply(exc)


def iris_rows(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    return np.round(rng.uniform([4.3, 2.0, 1.0, 0.1], [7.9, 4.4, 6.9, 2.5], size=(n, 4)), 1)


def json_body(rows: np.ndarray) -> bytes:
    tensor = {
        "name": "input-0",
        "shape": list(rows.shape),
        "datatype": "FP64",
        "data": rows.reshape(-1).tolist(),
    }
    return json.dumps({"inputs": [tensor]}).encode()


def binary_body(rows: np.ndarray, binary_out: bool) -> tuple[bytes, dict[str, str]]:
    raw = np.ascontiguousarray(rows, dtype="<f8").tobytes()
    tensor = {
        "name": "input-0",
        "shape": list(rows.shape),
        "datatype": "FP64",
        "parameters": {"binary_data_size": len(raw)},
    }
    doc: dict[str, Any] = {"inputs": [tensor]}
    if binary_out:
        doc["parameters"] = {"binary_data_output": True}
    head = json.dumps(doc).encode()
    return head + raw, {HEADER: str(len(head))}


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Seconds per call of each function, called round-robin so machine noise hits all alike."""
    for fn in fns.values():
        fn()  # warm
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return times


def publish_iris(root: Path) -> tuple[str, Any]:
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from serving.manifest import TensorSpec
    from serving.publish import publish_path
    from serving.repository import Repository
    from serving.settings import Settings
    from serving.store import open_store

    x, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=300).fit(x, y)
    path = root / "iris.joblib"
    joblib.dump(model, path)
    store = str(root / "store")
    repo = Repository(open_store(store, Settings(store=store)))
    publish_path(
        repo,
        path,
        "iris",
        version="1",
        format="sklearn",
        inputs=[TensorSpec(name="input-0", datatype="FP64", shape=[-1, 4])],
        outputs=[
            TensorSpec(name="predict", datatype="INT64", shape=[-1]),
            TensorSpec(name="predict_proba", datatype="FP64", shape=[-1, 3]),
        ],
    )
    return store, model


def systems(service: Any, model: Any, rows: np.ndarray) -> dict[str, Callable[[], object]]:
    predictor = service.slot.live.predictor
    inputs = {"input-0": rows}
    body = json_body(rows)
    out: dict[str, Callable[[], object]] = {
        "sklearn predict": lambda: model.predict(rows),
        "Predictor.predict": lambda: predictor.predict(inputs),
        "infer_v2 JSON": lambda: _check(rest_infer(service, body)),
    }
    try:
        rest_infer(service, body, headers={})
    except TypeError:
        return out  # NOTE: code from before the binary extension: JSON only
    for label, binary_out in (("infer_v2 binary", True), ("infer_v2 binary in, JSON out", False)):
        bbody, headers = binary_body(rows, binary_out)
        out[label] = lambda bbody=bbody, headers=headers: _check(rest_infer(service, bbody, headers))
    return out


def _check(reply: Any) -> Any:
    if reply.status != 200:
        raise RuntimeError(f"infer_v2 answered {reply.status}: {reply.body[:200]!r}")
    return reply


def check_same_predictions(service: Any, rows: np.ndarray) -> bool:
    """The binary reply's predictions equal the JSON reply's (the bench measures equal work)."""
    as_json = json.loads(rest_infer(service, json_body(rows)).body)
    want = {o["name"]: o["data"] for o in as_json["outputs"]}
    bbody, headers = binary_body(rows, True)
    reply = rest_infer(service, bbody, headers)
    size = int(reply.headers[HEADER])
    head = json.loads(reply.body[:size])
    offset = size
    for o in head["outputs"]:
        k = o["parameters"]["binary_data_size"]
        dtype = {"INT64": "<i8", "FP64": "<f8"}[o["datatype"]]
        got = np.frombuffer(reply.body[offset : offset + k], dtype=dtype).tolist()
        offset += k
        if got != want[o["name"]]:
            return False
    return True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--before", type=Path, help="an earlier codec.json to compare with")
    parser.add_argument("--reps", type=int, default=0, help="timed calls per system (default: by size)")
    args = parser.parse_args(argv)

    from serving.config import AppConfig
    from serving.settings import get_settings

    try:
        from serving.runtime.service import ModelService
    except ImportError:  # NOTE: a tree from before serving/runtime (see the module docstring)
        from serving.service import ModelService  # type: ignore[no-redef]

    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        store, model = publish_iris(Path(tmp))
        app = AppConfig.model_validate(
            {
                "store": store,
                "cache_dir": str(Path(tmp) / "cache"),
                "models": [{"name": "iris", "version": "1"}],
            }
        )
        service = ModelService(app.models[0], app, get_settings())
        service.start()
        same: dict[int, bool] = {}
        for n in SIZES:
            rows = iris_rows(n)
            fns = systems(service, model, rows)
            if "infer_v2 binary" in fns:
                same[n] = check_same_predictions(service, rows)
            reps = args.reps or max(100, 300_000 // n)
            for system, times in interleaved(fns, reps).items():
                med = statistics.median(times)
                records.append(
                    {
                        "rows": n,
                        "system": system,
                        "median_ms": med * 1000,
                        "min_ms": min(times) * 1000,
                        "p99_ms": sorted(times)[max(0, int(0.99 * len(times)) - 1)] * 1000,
                        "rows_per_s": n / med,
                        "reps": reps,
                    }
                )
        service.slot.close()

    ratios = []
    by = {(r["rows"], r["system"]): r for r in records}
    for (n, system), rec in by.items():
        if not system.startswith("infer_v2"):
            continue
        for base in ("Predictor.predict", "sklearn predict"):
            ratios.append(
                {
                    "rows": n,
                    "system": system,
                    "vs": base,
                    "rows_per_s_ratio": rec["rows_per_s"] / by[(n, base)]["rows_per_s"],
                }
            )
        if system != "infer_v2 JSON":
            ratios.append(
                {
                    "rows": n,
                    "system": system,
                    "vs": "infer_v2 JSON",
                    "rows_per_s_ratio": rec["rows_per_s"] / by[(n, "infer_v2 JSON")]["rows_per_s"],
                }
            )
    result: dict[str, Any] = {
        "environment": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "cpus": _cpus(),
            "note": "in process, no HTTP, no Ray; medians; shared 2-core dev box",
        },
        "records": records,
        "ratios": ratios,
        "binary_predictions_equal_json": same,
    }
    if args.before:
        before = json.loads(args.before.read_text())
        old = {(r["rows"], r["system"]): r for r in before["records"]}
        result["before"] = before["records"]
        result["after_vs_before"] = [
            {
                "rows": key[0],
                "system": key[1],
                "before_ms": old[key]["median_ms"],
                "after_ms": rec["median_ms"],
                "speedup": old[key]["median_ms"] / rec["median_ms"],
                # NOTE: each run's time over its own Predictor.predict: robust to the
                # machine being busier in one run than in the other.
                "before_over_predictor": old[key]["median_ms"] / old[(key[0], PREDICTOR)]["median_ms"],
                "after_over_predictor": rec["median_ms"] / by[(key[0], PREDICTOR)]["median_ms"],
            }
            for key, rec in by.items()
            if key in old and key[1].startswith("infer_v2")
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _print(result)
    return result


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def _print(result: dict[str, Any]) -> None:
    for r in result["records"]:
        print(f"{r['rows']:>6} {r['system']:<30} {r['median_ms']:8.3f} ms  {r['rows_per_s']:>12,.0f} rows/s")
    for r in result["ratios"]:
        print(f"{r['rows']:>6} {r['system']:<30} / {r['vs']:<18} {r['rows_per_s_ratio']:.2f}")
    for r in result.get("after_vs_before", []):
        print(
            f"{r['rows']:>6} {r['system']:<30} before {r['before_ms']:.3f} ms "
            f"after {r['after_ms']:.3f} ms x{r['speedup']:.2f}; over predict "
            f"{r['before_over_predictor']:.2f} -> {r['after_over_predictor']:.2f}"
        )


if __name__ == "__main__":
    main()
