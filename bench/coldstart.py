"""Cold start of a large model from an S3 alias: cache miss vs a raw boto3 download, both on moto.

- ``cache_miss_pull``: ``LoaderCache.resolve`` (alias + manifest GETs) + ``fetch`` into an empty
  cache (streams, hashes, hard-links the version dir);
- ``raw_download``: ``boto3`` ``download_file`` of the same object to a file;
- ``first_prediction``: the above plus ``load_predictor`` + one predict, versus the raw download
  plus ``joblib.load`` + one predict.

The cache-hit side (resolve + hit + load vs the raw framework load) is :mod:`bench.cache_load`.
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def make_model(path: Path, megabytes: int) -> None:
    import joblib
    import numpy as np
    from sklearn.linear_model import LinearRegression

    cols = 12_500
    targets = max(1, megabytes * 1_000_000 // (8 * cols))
    rng = np.random.default_rng(0)
    model = LinearRegression().fit(rng.standard_normal((32, cols)), rng.standard_normal((32, targets)))
    joblib.dump(model, path)


def main(megabytes: int = 200, rounds: int = 3) -> dict[str, Any]:
    import boto3
    import joblib
    import numpy as np

    from serving.cache import LoaderCache
    from serving.formats import LoadPolicy, load_predictor
    from serving.publish import publish_path
    from serving.repository import Repository
    from serving.settings import Settings
    from serving.store.factory import open_store
    from serving.testing import MotoS3

    with MotoS3() as server, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.update(server.env())
        server.client().create_bucket(Bucket="cold")
        settings = Settings(store="s3://cold/models", s3_addressing_style="path", cache_dir=work / "unused")
        repo = Repository(open_store(settings.store, settings))
        src = work / "src" / "model.joblib"
        src.parent.mkdir()
        make_model(src, megabytes)
        publish_path(repo, src, "big", format="sklearn", alias="production")
        size = src.stat().st_size
        key = f"models/{repo.version_prefix('big', '1')}model.joblib"
        client = boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1")
        client.head_object(Bucket="cold", Key=key)  # fails loudly if the layout changed
        x = np.zeros((1, 12_500))

        times: dict[str, list[float]] = {
            k: []
            for k in ("cache_miss_pull", "raw_download", "miss_first_prediction", "raw_first_prediction")
        }
        for i in range(rounds):
            gc.collect()
            cache = LoaderCache(work / f"cache-{i}", max_bytes=4 * size)
            t0 = time.perf_counter()
            resolved, _ = cache.resolve(repo, "big@production")
            cached = cache.fetch(repo, resolved)
            t1 = time.perf_counter()
            load_predictor(cached.path, cached.manifest, LoadPolicy()).predict(
                {cached.manifest.inputs[0].name: x} if cached.manifest.inputs else {"input-0": x}
            )
            t2 = time.perf_counter()
            assert not cached.hit
            times["cache_miss_pull"].append(t1 - t0)
            times["miss_first_prediction"].append(t2 - t0)
            gc.collect()
            dest = work / f"raw-{i}.joblib"
            t0 = time.perf_counter()
            client.download_file("cold", key, str(dest))
            t1 = time.perf_counter()
            joblib.load(dest).predict(x)
            t2 = time.perf_counter()
            times["raw_download"].append(t1 - t0)
            times["raw_first_prediction"].append(t2 - t0)
            dest.unlink()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model_bytes": size,
        "rounds": rounds,
        "median_seconds": med,
        "all_seconds": times,
        "ratio_cache_miss_over_raw_download": med["cache_miss_pull"] / med["raw_download"],
        "ratio_first_prediction_miss_over_raw": med["miss_first_prediction"] / med["raw_first_prediction"],
        "notes": "moto S3 in this process on loopback; the cache hashes (sha256) while "
        "streaming, boto3 does not",
    }


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2))
