"""What ``serving convert --to onnx`` buys: the source version against its ONNX version.

For each model (an iris ``LogisticRegression``, a 100-tree ``RandomForestClassifier``,
a ``StandardScaler`` + ``LogisticRegression`` pipeline, and a torch MLP 4-256-256-3),
the source is published, converted with :func:`serving.convert.convert`, and both
versions are timed side by side, in alternating rounds, on 1 row and on 10,000 rows:

- ``inproc``: ``Predictor.predict`` of each version loaded in this process (the model
  alone: ``load_predictor``, as ``isolation: none`` serves it);
- ``served``: ``ModelService.infer`` of a request that names the version, through the
  default path (conform, a model worker, the reply), as every transport reaches it.

The torch MLP's ONNX version is also quantized (``int8``, ``fp16``, with
:func:`serving.convert.quantize`): the accuracy drop, score change, size and latency
ratios it records, and its in-process predict time against the float32 version.

Each figure is the median over rounds of the mean time per call in a round. Ratios are
ONNX over source (below 1: the ONNX version is faster). Also recorded: both artifacts'
stored bytes, and the conversion's measured score difference.

Run: ``.venv/bin/python -m bench.convert`` (writes bench/results/convert.json; about
2 minutes on 2 cores). ``BENCH_CONVERT_ROUNDS`` (default 5) shrinks it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROUNDS = int(os.environ.get("BENCH_CONVERT_ROUNDS", "5"))
RESULTS = Path(__file__).parent / "results" / "convert.json"
BUDGET_S = 0.4
"""Seconds of calls per measurement in a round."""


def models() -> dict[str, tuple[Any, dict[str, Any]]]:
    import torch
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from bench.baselines.mlp import MLP

    x, y = load_iris(return_X_y=True)
    torch.manual_seed(0)
    return {
        "logistic": (LogisticRegression(max_iter=1000).fit(x, y), {}),
        "forest-100": (RandomForestClassifier(n_estimators=100, random_state=0).fit(x, y), {}),
        "scaled-pipeline": (make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y), {}),
        "torch-mlp": (MLP(4, 256, 3).eval(), {"init_kwargs": {"inputs": 4, "hidden": 256, "outputs": 3}}),
    }


def per_call(fn: Callable[[], Any]) -> float:
    """Mean seconds per call over about BUDGET_S of calls."""
    fn()
    calls = 0
    started = time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= BUDGET_S:
            return elapsed / calls


def quantized(
    repo: Any,
    cache: Any,
    settings: Any,
    name: str,
    version: str,
    validation: np.ndarray,
    rows: dict[str, np.ndarray],
) -> dict[str, Any]:
    """int8 and fp16 copies of ONNX version ``version``: what ``serving convert --quantize``
    measured (accuracy drop, largest score change, size and latency ratios through the
    workers), and the in-process predict time of each against the float32 version."""
    from serving.convert import quantize
    from serving.formats import load_predictor
    from serving.formats.base import LoadPolicy
    from serving.manifest import ModelRef

    out: dict[str, Any] = {}
    for how in ("int8", "fp16"):
        # NOTE: max_accuracy_drop=1: the bench measures what a gate would decide on.
        manifest, derived = quantize(
            repo, cache, settings, f"{name}:{version}", how, validation=validation, max_accuracy_drop=1.0
        )
        loaded = {}
        for role, v in (("fp32", version), (how, manifest.version)):
            cached = cache.fetch(repo, repo.resolve(ModelRef.parse(f"{name}:{v}")))
            loaded[role] = load_predictor(cached.path, cached.manifest, LoadPolicy())
        timing: dict[str, list[float]] = {}
        for _ in range(ROUNDS):
            for label, batch in rows.items():
                for role, predictor in loaded.items():
                    inputs = {predictor.inputs[0].name: batch.astype(np.float32)}
                    timing.setdefault(f"{label} {role}", []).append(
                        per_call(lambda p=predictor, i=inputs: p.predict(i))
                    )
        for predictor in loaded.values():
            predictor.close()
        medians = {k: statistics.median(v) for k, v in timing.items()}
        out[how] = {
            **{
                k: derived.measured[k]
                for k in ("accuracy_drop", "max_score_change", "size_ratio", "latency_ratio")
            },
            **{
                f"inproc {label} / fp32": medians[f"{label} {how}"] / medians[f"{label} fp32"]
                for label in rows
            },
        }
    return out


def main() -> None:
    from serving.cache import LoaderCache
    from serving.config import AppConfig
    from serving.convert import convert
    from serving.formats import load_predictor
    from serving.formats.base import LoadPolicy
    from serving.manifest import ModelRef
    from serving.protocol.types import InferRequest
    from serving.repository import Repository
    from serving.runtime.service import ModelService
    from serving.save import save
    from serving.settings import Settings
    from serving.store.local import LocalStore

    rng = np.random.default_rng(0)
    rows = {"1 row": rng.normal(5, 2, size=(1, 4)), "10,000 rows": rng.normal(5, 2, size=(10_000, 4))}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        root = Path(tmp)
        repo = Repository(LocalStore(str(root / "store")))
        cache = LoaderCache(root / "cache", max_bytes=1 << 32)
        settings = Settings(store=str(root / "store"), cache_dir=root / "cache")
        for name, (model, options) in models().items():
            is_torch = name.startswith("torch")
            dtype = np.float32 if is_torch else np.float64
            save(model, name, store=repo, example=rows["1 row"].astype(dtype).tolist(), **options)
            validation = rng.normal(5, 2, size=(2000, 4)).astype(dtype)
            onnx_manifest, derived = convert(repo, cache, settings, f"{name}:1", validation=validation)
            versions = {"source": "1", "onnx": onnx_manifest.version}
            loaded = {}
            for role, version in versions.items():
                cached = cache.fetch(repo, repo.resolve(ModelRef.parse(f"{name}:{version}")))
                loaded[role] = (load_predictor(cached.path, cached.manifest, LoadPolicy()), cached.manifest)
            app = AppConfig.model_validate(
                {
                    "store": str(root / "store"),
                    "cache_dir": str(root / "cache"),
                    "models": [{"name": name, "version": "1", "alias": None}],
                }
            )
            service = ModelService(app.models[0], app, settings)
            service.start()
            samples: dict[str, list[float]] = {}
            try:
                for rnd in range(ROUNDS):
                    order = list(versions.items()) if rnd % 2 == 0 else list(versions.items())[::-1]
                    for label, batch in rows.items():
                        data = batch.astype(dtype)
                        for role, version in order:
                            predictor = loaded[role][0]
                            inputs = {predictor.inputs[0].name: data}
                            samples.setdefault(f"inproc {label} {role}", []).append(
                                per_call(lambda p=predictor, i=inputs: p.predict(i))
                            )
                            request = InferRequest(name, {"input-0": data}, version=version)
                            samples.setdefault(f"served {label} {role}", []).append(
                                per_call(lambda r=request, s=service: s.infer(r))
                            )
            finally:
                service.close()
                for predictor, _ in loaded.values():
                    predictor.close()
            medians = {key: statistics.median(values) for key, values in samples.items()}
            ratios = {
                f"{where} {label}": medians[f"{where} {label} onnx"] / medians[f"{where} {label} source"]
                for where in ("inproc", "served")
                for label in rows
            }
            results[name] = {
                "seconds_per_call": medians,
                "onnx_over_source": ratios,
                "bytes": {role: manifest.total_bytes for role, (_, manifest) in loaded.items()},
                "max_error": derived.measured["max_error"],
                "converter": f"{derived.converter} {derived.converter_version}",
                "left_out": derived.measured["left_out"],
            }
            print(name, json.dumps({k: round(v, 3) for k, v in ratios.items()}), flush=True)
            if is_torch:
                results[name]["quantized"] = quantized(
                    repo, cache, settings, name, onnx_manifest.version, validation, rows
                )
                print(name, "quantized", json.dumps(results[name]["quantized"]), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "rounds": ROUNDS,
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "models": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
