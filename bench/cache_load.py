"""Cache-hit load time vs the raw framework load of the same ~100 MB file.

Two models of about 100 MB: an sklearn LinearRegression (joblib, a 1000x12500
float64 ``coef_``) and a torch ``nn.Linear(5000, 5000)`` state dict (float32).
Both are published to a moto S3 server on loopback, pulled once into a
``LoaderCache``, then timed in alternating rounds:

- ``raw``: the framework load of the original file
  (``joblib.load`` / ``torch.load(weights_only=True)``);
- ``cache_hit_raw``: ``LoaderCache.resolve`` (alias GET + manifest GET on S3)
  + ``fetch`` (a hit) + the same framework load from the cached path;
- ``raw_full`` / ``cache_hit_predictor``: the whole load as serving does it,
  ``load_predictor`` (restricted unpickler for joblib; module construction +
  ``load_state_dict`` for torch) versus those same steps by hand on the original file.

Ratios are medians of the cache path over medians of the raw path.

``fetch_hit_only`` is the verified hit: the manifest read and its digest, then
each file's size, mtime and inode against the stamp recorded when its bytes were
hashed. ``get_only`` is the manifest check alone (what a hit cost before hits
were verified) and ``rehash_only`` is a full re-hash (what a changed stamp, or
the ``SERVING_CACHE_REVERIFY_S`` schedule, costs).

Run: ``.venv/bin/python -m bench.cache_load`` (writes bench/results/cache_load.json).
``BENCH_CACHE_MB`` (default 100), ``BENCH_CACHE_ROUNDS`` (default 9) and
``BENCH_CACHE_OUT`` shrink it for a quick look on a shared machine.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MB = float(os.environ.get("BENCH_CACHE_MB", "100"))
ROUNDS = int(os.environ.get("BENCH_CACHE_ROUNDS", "9"))
_SIDE = max(10, int(5000 * (MB / 100) ** 0.5))
LINEAR = {"in_features": _SIDE, "out_features": _SIDE}
RESULTS = Path(os.environ.get("BENCH_CACHE_OUT", Path(__file__).parent / "results" / "cache_load.json"))


def timed(fn: Callable[[], Any]) -> float:
    gc.collect()
    started = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - started
    del out
    return elapsed


def make_sklearn(path: Path) -> None:
    import joblib
    import numpy as np
    from sklearn.linear_model import LinearRegression

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, max(10, int(125 * MB))))
    y = rng.standard_normal((64, 1_000))
    model = LinearRegression().fit(x, y)  # coef_: 1000 x 12500 float64 = 100 MB
    joblib.dump(model, path)


def make_torch(path: Path) -> None:
    import torch

    torch.manual_seed(0)
    torch.save(torch.nn.Linear(_SIDE, _SIDE).state_dict(), path)  # 5000 x 5000 float32 = 100 MB


def run_case(
    case: str,
    repo: Any,
    cache: Any,
    ref: str,
    source: Path,
    raw_load: Callable[[Path], Any],
    raw_full: Callable[[Path], Any],
    server: Any,
) -> dict[str, Any]:
    from serving.formats import LoadPolicy, load_predictor

    def cache_hit(load: Callable[[Any], Any]) -> Callable[[], Any]:
        def go() -> Any:
            resolved, _ = cache.resolve(repo, ref)
            cached = cache.fetch(repo, resolved)
            assert cached.hit
            return load(cached)

        return go

    primary = lambda cached: cached.path / cached.manifest.files[0].path  # noqa: E731
    variants: dict[str, Callable[[], Any]] = {
        "raw": lambda: raw_load(source),
        "cache_hit_raw": cache_hit(lambda c: raw_load(primary(c))),
        "raw_full": lambda: raw_full(source),
        "cache_hit_predictor": cache_hit(lambda c: load_predictor(c.path, c.manifest, LoadPolicy())),
        "resolve_only": lambda: cache.resolve(repo, ref),
        "fetch_hit_only": lambda: cache.fetch(repo, resolved),
        "get_only": lambda: cache.get(resolved.name, resolved.version, resolved.manifest_sha256),
        "rehash_only": lambda: cache.verify(first),
    }
    started = time.perf_counter()
    resolved, _ = cache.resolve(repo, ref)
    first = cache.fetch(repo, resolved)  # the one download
    miss_s = time.perf_counter() - started
    assert not first.hit
    for fn in variants.values():  # warm the page cache and imports
        timed(fn)
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for i in range(ROUNDS):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(timed(variants[name]))
    server.reset_counts()
    timed(variants["cache_hit_raw"])
    hit_requests = [(r.method, r.key, r.status) for r in server.requests]
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    return {
        "case": case,
        "file_bytes": source.stat().st_size,
        "first_pull_seconds": miss_s,
        "median_seconds": med,
        "min_seconds": best,
        "all_seconds": times,
        "ratio_cache_hit_raw_over_raw": med["cache_hit_raw"] / med["raw"],
        "ratio_cache_hit_predictor_over_raw_full": med["cache_hit_predictor"] / med["raw_full"],
        "min_ratio_cache_hit_raw_over_raw": best["cache_hit_raw"] / best["raw"],
        "min_ratio_cache_hit_predictor_over_raw_full": best["cache_hit_predictor"] / best["raw_full"],
        "overhead_seconds": med["cache_hit_raw"] - med["raw"],
        "store_requests_per_cache_hit": hit_requests,
    }


def main() -> dict[str, Any]:
    import joblib
    import torch

    from serving.cache import LoaderCache
    from serving.formats.pytorch import import_module_class
    from serving.publish import publish_path
    from serving.repository import Repository
    from serving.settings import Settings
    from serving.store.factory import open_store
    from serving.testing import MotoS3

    def torch_full(path: Path) -> Any:
        state = torch.load(path, map_location="cpu", weights_only=True)
        module = import_module_class("torch.nn:Linear")(**LINEAR)
        module.load_state_dict(state, strict=True)
        return module.eval()

    with MotoS3() as server, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.update(server.env())
        server.client().create_bucket(Bucket="bench")
        settings = Settings(store="s3://bench/models", s3_addressing_style="path", cache_dir=work / "cache")
        repo = Repository(open_store(settings.store, settings))
        cache = LoaderCache(work / "cache", max_bytes=2 * 1024**3)

        (work / "sk").mkdir()
        sk_path = work / "sk" / "model.joblib"
        make_sklearn(sk_path)
        publish_path(repo, sk_path, "sk", format="sklearn", alias="production")
        (work / "pt").mkdir()
        pt_path = work / "pt" / "model.pt"
        make_torch(pt_path)
        publish_path(
            repo,
            pt_path,
            "pt",
            format="torch-state-dict",
            alias="production",
            options={"class_path": "torch.nn:Linear", "init_kwargs": LINEAR},
        )

        rows = [
            run_case(
                "sklearn joblib", repo, cache, "sk@production", sk_path, joblib.load, joblib.load, server
            ),
            run_case(
                "torch state_dict",
                repo,
                cache,
                "pt@production",
                pt_path,
                lambda p: torch.load(p, map_location="cpu", weights_only=True),
                torch_full,
                server,
            ),
        ]
    result = {
        "what": "cache-hit load (resolve + fetch hit + load from the cached path) vs raw framework load",
        "rounds": ROUNDS,
        "statistic": "median of alternating rounds, after one warm-up of each variant",
        "store": "moto S3 server on loopback (resolve = alias GET + manifest GET)",
        "load_predictor_used": True,
        "notes": [
            "raw_full for sklearn is plain joblib.load (unrestricted); serving loads through its restricted "
            "unpickler, so ratio_cache_hit_predictor_over_raw_full includes the allowlist's cost",
            "raw_full for torch is torch.load(weights_only=True) + nn.Linear(5000, 5000) + load_state_dict",
            "files are in the page cache for both paths; a cold disk would add the same read time to both",
            "the moto server runs in this process, so resolve's two GETs also pay for its share of the GIL; "
            "on a 2-core machine shared with other work the medians are noisy (see all_seconds)",
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
        f"{'case':18} {'MB':>5} {'raw s':>7} {'hit s':>7} {'ratio':>6} "
        f"{'raw_full s':>10} {'predictor s':>11} {'ratio':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        m = r["median_seconds"]
        print(
            f"{r['case']:18} {r['file_bytes'] / 1e6:5.0f} {m['raw']:7.3f} {m['cache_hit_raw']:7.3f} "
            f"{r['ratio_cache_hit_raw_over_raw']:6.2f} {m['raw_full']:10.3f} "
            f"{m['cache_hit_predictor']:11.3f} {r['ratio_cache_hit_predictor_over_raw_full']:6.2f}"
        )
        print(
            f"{'':18} best of {result['rounds']}: ratio {r['min_ratio_cache_hit_raw_over_raw']:.2f} "
            f"(raw {r['min_seconds']['raw']:.3f} s), predictor ratio "
            f"{r['min_ratio_cache_hit_predictor_over_raw_full']:.2f}"
        )
        print(
            f"{'':18} of which resolve {m['resolve_only'] * 1000:.1f} ms, verified fetch (hit) "
            f"{m['fetch_hit_only'] * 1000:.2f} ms (manifest check alone {m['get_only'] * 1000:.2f} ms, "
            f"full re-hash {m['rehash_only'] * 1000:.1f} ms); first pull {r['first_pull_seconds']:.2f} s; "
            f"store requests per hit: {len(r['store_requests_per_cache_hit'])}"
        )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    print_table(main())
